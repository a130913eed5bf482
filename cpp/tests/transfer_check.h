// A tiny assertion helper for the transfer engine's C++ tests (kept apart from the cache tests'
// check.h so the two components do not share test scaffolding).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace transfer_check {

inline int& failures() {
  static int n = 0;
  return n;
}

inline std::vector<std::pair<std::string, std::function<void()>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void()>>> tests;
  return tests;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().emplace_back(name, fn); }
};

// Runs every registered test; returns the process exit code.
inline int run_all() {
  for (auto& [name, fn] : registry()) {
    int before = failures();
    try {
      fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "  unexpected exception: %s\n", e.what());
      ++failures();
    }
    std::printf("%s %s\n", failures() == before ? "ok  " : "FAIL", name.c_str());
  }
  std::printf("%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace transfer_check

#define TRANSFER_TEST(name)                                         \
  static void name();                                               \
  static transfer_check::Register name##_registration(#name, name); \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      std::fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++transfer_check::failures();                                                   \
    }                                                                                 \
  } while (0)

#define CHECK_THROWS(expr, type)                                                                \
  do {                                                                                          \
    bool thrown = false;                                                                        \
    try {                                                                                       \
      expr;                                                                                     \
    } catch (const type&) {                                                                     \
      thrown = true;                                                                            \
    }                                                                                           \
    if (!thrown) {                                                                              \
      std::fprintf(stderr, "  %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #type); \
      ++transfer_check::failures();                                                             \
    }                                                                                           \
  } while (0)
