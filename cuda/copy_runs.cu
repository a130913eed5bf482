// One kernel for many variable-size copies (see copy_runs.h): the run table travels as the kernel's
// parameter (12 KiB; CUDA 12.1+ allows 32 KiB of parameters), so a launch needs no device buffer
// and no host-to-device copy of its own. blockIdx.y picks the run, blockIdx.x strides over its
// tiles.
#include <cuda_runtime.h>

#include <algorithm>

#include "copy_runs.h"

namespace pdserve {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // 16-byte vectors in flight per thread (16 KiB per CTA tile)

struct RunTable {
  uint64_t dst[kMaxCopyRuns];
  uint64_t src[kMaxCopyRuns];
  uint64_t nbytes[kMaxCopyRuns];
};

__global__ void copy_runs_kernel(const __grid_constant__ RunTable t) {
  const uint64_t run = blockIdx.y;
  const char* src = reinterpret_cast<const char*>(t.src[run]);
  char* dst = reinterpret_cast<char*>(t.dst[run]);
  const uint64_t nbytes = t.nbytes[run];
  const bool aligned = ((t.src[run] | t.dst[run]) & 15) == 0;
  // 16-byte vectors over the aligned prefix; bytes for the tail (and for unaligned runs).
  const uint64_t num_vecs = aligned ? nbytes / 16 : 0;
  const uint64_t tile = static_cast<uint64_t>(kThreads) * kUnroll;
  for (uint64_t base = blockIdx.x * tile; base < num_vecs; base += gridDim.x * tile) {
    uint4 regs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t i = base + u * kThreads + threadIdx.x;
      if (i < num_vecs) regs[u] = __ldcs(reinterpret_cast<const uint4*>(src) + i);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint64_t i = base + u * kThreads + threadIdx.x;
      if (i < num_vecs) __stcs(reinterpret_cast<uint4*>(dst) + i, regs[u]);
    }
  }
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * kThreads;
  for (uint64_t i = num_vecs * 16 + blockIdx.x * kThreads + threadIdx.x; i < nbytes; i += stride) {
    dst[i] = src[i];
  }
}

}  // namespace
}  // namespace cuda
}  // namespace pdserve

extern "C" int pdserve_copy_runs(const uint64_t* dsts, const uint64_t* srcs, const uint64_t* sizes,
                                 size_t count, void* stream) {
  using namespace pdserve::cuda;
  static thread_local RunTable table;  // 12 KiB: not on the caller's stack
  constexpr uint64_t kTileBytes = 16ull * kThreads * kUnroll;
  for (size_t first = 0; first < count; first += kMaxCopyRuns) {
    const size_t n = std::min(count - first, kMaxCopyRuns);
    uint64_t max_nbytes = 0;
    for (size_t i = 0; i < n; ++i) {
      table.dst[i] = dsts[first + i];
      table.src[i] = srcs[first + i];
      table.nbytes[i] = sizes[first + i];
      max_nbytes = std::max(max_nbytes, sizes[first + i]);
    }
    // Enough CTAs per run to cover its tiles, and about 1,024 CTAs in all (a few waves of 132 SMs)
    // when runs are many and small.
    const uint64_t tiles = (max_nbytes + kTileBytes - 1) / kTileBytes;
    const uint64_t per_run = std::max<uint64_t>(1, std::min<uint64_t>(tiles, 1024 / n + 1));
    dim3 grid(static_cast<unsigned>(per_run), static_cast<unsigned>(n));
    copy_runs_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(table);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}
