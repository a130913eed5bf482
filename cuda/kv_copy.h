// Host-side launchers of the KV piece copy kernels, declared in plain C++ (no CUDA headers) so the
// pybind11 bindings compile with the host compiler. Addresses, sizes and the stream are raw integers.
#pragma once

#include <cstdint>
#include <string>

namespace pdserve {
namespace cuda {

// Kernel versions, side by side for the benchmark (bench/bench_kernels.py). kAuto picks
// kVec16Unroll4Stream when everything is 16-byte aligned (fastest or tied in every configuration
// measured on an H100, docs/PERFORMANCE.md), kNarrow otherwise.
enum KernelVersion : int {
  kAuto = 0,
  kVec16Unroll1 = 1,        // 16-byte vectors, 1 per thread per tile (4 KiB tiles)
  kVec16Unroll4 = 2,        // 16-byte vectors, 4 in flight per thread (16 KiB tiles)
  kVec16Unroll8 = 3,        // 16-byte vectors, 8 in flight per thread (32 KiB tiles)
  kVec16Unroll4Stream = 4,  // as kVec16Unroll4 with evict-first (streaming) cache hints
  kNarrow = 5,              // widest vector the alignment allows below 16 bytes (the fallback)
  kVec16Unroll8Stream = 6,  // as kVec16Unroll8 with streaming cache hints
  kNumKernelVersions = 7,
};

// Human-readable name of a kernel version ("vec16x4", ...); throws std::invalid_argument if unknown.
std::string kernel_version_name(int version);

// Packs pieces: piece i (piece_nbytes bytes at src_addr + block_ids[i] * block_stride_nbytes) goes
// to dst_addr + i * piece_nbytes. block_ids_addr: device int32[num_ids]; ids outside
// [0, src_num_blocks) are skipped by the kernel (callers validate them). Enqueued on `stream`
// (a cudaStream_t as an integer; 0 = the legacy default stream) of the current device; returns
// once launched. Throws std::invalid_argument for bad arguments, std::runtime_error for CUDA errors.
void gather_blocks(uint64_t src_addr, int64_t block_stride_nbytes, int64_t src_num_blocks,
                   uint64_t block_ids_addr, int64_t num_ids, uint64_t dst_addr,
                   int64_t piece_nbytes, uint64_t stream, int version);

// The inverse of gather_blocks: piece i at src_addr + i * piece_nbytes goes to
// dst_addr + block_ids[i] * block_stride_nbytes. Repeated ids race (callers keep them unique).
void scatter_blocks(uint64_t src_addr, uint64_t block_ids_addr, int64_t num_ids, uint64_t dst_addr,
                    int64_t block_stride_nbytes, int64_t dst_num_blocks, int64_t piece_nbytes,
                    uint64_t stream, int version);

// Copies piece src_ids[i] of the source pool to piece dst_ids[i] of the destination pool. Either
// pool may be pinned host memory (reached through UVA), the other device memory of the current
// device. src_ids_addr / dst_ids_addr: device int32[num_pairs].
void copy_blocks(uint64_t src_addr, int64_t src_stride_nbytes, int64_t src_num_blocks,
                 uint64_t dst_addr, int64_t dst_stride_nbytes, int64_t dst_num_blocks,
                 uint64_t src_ids_addr, uint64_t dst_ids_addr, int64_t num_pairs,
                 int64_t piece_nbytes, uint64_t stream, int version);

}  // namespace cuda
}  // namespace pdserve
