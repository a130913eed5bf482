// KV piece copy kernel: the one bandwidth-bound loop behind gather, scatter and tier copies.
// A "piece" is piece_nbytes contiguous bytes (one block's K+V of one layer, or a whole block-major
// block); gather, scatter and copy differ only in which side is indexed by an id array.
#pragma once

#include <cstdint>

namespace pdserve {
namespace cuda {

// Raw-pointer description of one launch. Piece i is copied from
//   src_base + src_id(i) * src_stride_nbytes   to   dst_base + dst_id(i) * dst_stride_nbytes,
// where src_id(i) = src_ids ? src_ids[i] : i (likewise dst). All addresses are device-accessible
// (device memory or mapped pinned host memory reached through UVA).
struct PieceCopyParams {
  const char* src_base;       // [src_num_blocks, src_stride_nbytes] bytes; device or mapped host
  char* dst_base;             // [dst_num_blocks, dst_stride_nbytes] bytes; device or mapped host
  const int32_t* src_ids;     // [num_pieces] int32 on the device, or nullptr for ids 0..num_pieces-1
  const int32_t* dst_ids;     // [num_pieces] int32 on the device, or nullptr for ids 0..num_pieces-1
  int64_t src_stride_nbytes;  // bytes between consecutive source blocks (>= piece_nbytes)
  int64_t dst_stride_nbytes;  // bytes between consecutive destination blocks (>= piece_nbytes)
  int64_t piece_nbytes;       // bytes per piece; a multiple of the vector width of the instance
  int32_t src_num_blocks;     // valid source ids are [0, src_num_blocks)
  int32_t dst_num_blocks;     // valid destination ids are [0, dst_num_blocks)
  int32_t num_pieces;         // pieces to copy (length of the id arrays)
};

// Load/store flavours. kStreaming uses evict-first hints so a large copy does not flush the L2
// working set of kernels running beside it.
enum class CacheHint { kDefault, kStreaming };

template <typename Vec, CacheHint kHint>
__device__ __forceinline__ Vec load_vec(const Vec* p) {
  if constexpr (kHint == CacheHint::kStreaming) {
    return __ldcs(p);
  } else {
    return *p;
  }
}

template <typename Vec, CacheHint kHint>
__device__ __forceinline__ void store_vec(Vec* p, const Vec& v) {
  if constexpr (kHint == CacheHint::kStreaming) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// Work is split into tiles of blockDim.x * kUnroll vectors; tile t belongs to piece
// t / tiles_per_piece. Consecutive CTAs take consecutive tiles of the same piece (DRAM locality),
// and a grid-stride loop lets a grid of one resident wave cover any number of tiles.
// Each thread issues kUnroll independent loads before its first store, so that enough bytes are
// in flight to cover DRAM (or PCIe, for mapped host memory) latency.
// An id outside its pool is skipped (never dereferenced); the launcher's callers validate ids.
template <typename Vec, int kUnroll, CacheHint kHint>
__global__ void copy_pieces_kernel(const PieceCopyParams p) {
  const int64_t vecs_per_piece = p.piece_nbytes / static_cast<int64_t>(sizeof(Vec));
  const int64_t tile_vecs = static_cast<int64_t>(blockDim.x) * kUnroll;
  const int64_t tiles_per_piece = (vecs_per_piece + tile_vecs - 1) / tile_vecs;
  const int64_t num_tiles = tiles_per_piece * p.num_pieces;

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t piece = tile / tiles_per_piece;
    const int64_t tile_in_piece = tile - piece * tiles_per_piece;
    const int32_t src_id = p.src_ids ? p.src_ids[piece] : static_cast<int32_t>(piece);
    const int32_t dst_id = p.dst_ids ? p.dst_ids[piece] : static_cast<int32_t>(piece);
    // Uniform across the CTA: no divergence, and no barrier inside the loop to deadlock on.
    if (src_id < 0 || src_id >= p.src_num_blocks || dst_id < 0 || dst_id >= p.dst_num_blocks) {
      continue;
    }
    const Vec* src =
        reinterpret_cast<const Vec*>(p.src_base + static_cast<int64_t>(src_id) * p.src_stride_nbytes);
    Vec* dst = reinterpret_cast<Vec*>(p.dst_base + static_cast<int64_t>(dst_id) * p.dst_stride_nbytes);
    const int64_t first = tile_in_piece * tile_vecs + threadIdx.x;

    Vec regs[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = first + static_cast<int64_t>(u) * blockDim.x;
      if (idx < vecs_per_piece) regs[u] = load_vec<Vec, kHint>(src + idx);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = first + static_cast<int64_t>(u) * blockDim.x;
      if (idx < vecs_per_piece) store_vec<Vec, kHint>(dst + idx, regs[u]);
    }
  }
}

}  // namespace cuda
}  // namespace pdserve
