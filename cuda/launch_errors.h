// The exceptions every host-side launcher in cuda/ throws: std::invalid_argument for a bad argument
// ("op: what"), std::runtime_error for a CUDA error ("op: step failed: name (text)").
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace pdserve {
namespace cuda {

[[noreturn]] inline void fail_argument(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string(op) + ": " + what);
}

[[noreturn]] inline void fail_cuda(const char* op, const char* step, cudaError_t err) {
  std::ostringstream msg;
  msg << op << ": " << step << " failed: " << cudaGetErrorName(err) << " ("
      << cudaGetErrorString(err) << ")";
  throw std::runtime_error(msg.str());
}

}  // namespace cuda
}  // namespace pdserve
