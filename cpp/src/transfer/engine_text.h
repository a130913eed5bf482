// Small text and time helpers shared by the engine's source files (error messages name ranges in
// hex with their size, so a refused write can be matched against the registered regions).
#pragma once

#include <chrono>
#include <cstdint>
#include <sstream>
#include <string>

namespace pdserve::transfer {

inline std::string hex(uint64_t v) {
  std::ostringstream out;
  out << "0x" << std::hex << v;
  return out.str();
}

inline std::string range_text(uint64_t addr, uint64_t nbytes) {
  return "[" + hex(addr) + ", " + hex(addr + nbytes) + ") (" + std::to_string(nbytes) + " B)";
}

inline double seconds_between(std::chrono::steady_clock::time_point a,
                              std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace pdserve::transfer
