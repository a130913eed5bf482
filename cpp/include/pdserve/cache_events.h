// Cache events: what a radix tree changed, with enough prefix identity (chained block hashes) for
// an exact mirror elsewhere (the global scheduler's per-instance prompt trees).
#pragma once

#include <cstdint>
#include <vector>

#include "pdserve/block_pool.h"

namespace pdserve {

enum class CacheEventKind : int32_t { kInserted = 0, kEvicted = 1, kDemoted = 2, kPromoted = 3 };

// One event per tree node touched by the change. `tier` is where the blocks are after the event
// (inserted: GPU; evicted: the tier they were freed from; demoted: HOST; promoted: GPU).
// block_hashes[i] = hash_block(i == 0 ? parent_hash : block_hashes[i-1], tokens of block i).
// token_ids holds the blocks' tokens for kInserted and is empty otherwise.
struct CacheEvent {
  CacheEventKind kind;
  Tier tier;
  uint64_t parent_hash;  // hash of the block before the first one (0 at the root)
  std::vector<uint64_t> block_hashes;
  std::vector<int32_t> token_ids;
};

}  // namespace pdserve
