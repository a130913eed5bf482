// Copies of arbitrary runs (dst, src, nbytes) in one kernel launch, for the cuda_ipc transfer
// backend's receiver: a message's up to kMaxCopyRuns pieces of KV, each a separate cudaMemcpyAsync
// otherwise (a few microseconds each, so small pieces ran at a few GB/s). Declared with a C ABI so
// the transfer library, which is built without CUDA, calls it through a function pointer that
// Python hands over (pdserve._cuda.copy_runs_address()).
#pragma once

#include <cstddef>
#include <cstdint>

namespace pdserve {
namespace cuda {

constexpr size_t kMaxCopyRuns = 512;  // the transfer backend's pieces per message

}  // namespace cuda
}  // namespace pdserve

// Enqueues dsts[i] <- srcs[i] (sizes[i] bytes) for i < count on `stream` (a cudaStream_t) of the
// current device, in launches of at most kMaxCopyRuns runs; the arrays are read during the call
// only. Addresses are any the device can reach (its memory, CUDA-IPC mappings, mapped host memory);
// runs must not overlap. Returns 0 (cudaSuccess) once launched, else the cudaError_t of the launch.
extern "C" int pdserve_copy_runs(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                                 size_t count, void* stream);
