// Chained block hash (see block_hash.h for the exact formula, mirrored in Python).
#include "pdserve/block_hash.h"

namespace pdserve {

uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, size_t num_tokens) {
  uint64_t h = parent_hash;
  for (size_t i = 0; i < num_tokens; ++i) {
    h = (h ^ static_cast<uint32_t>(tokens[i])) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
  }
  h ^= h >> 32;
  h *= 0xD6E8FEB86659FD93ULL;
  h ^= h >> 32;
  return h;
}

void hash_blocks(const int32_t* tokens, size_t num_tokens, size_t block_size, uint64_t parent_hash,
                 std::vector<uint64_t>* out) {
  if (block_size == 0) return;
  size_t num_blocks = num_tokens / block_size;
  out->reserve(out->size() + num_blocks);
  uint64_t h = parent_hash;
  for (size_t b = 0; b < num_blocks; ++b) {
    h = hash_block(h, tokens + b * block_size, block_size);
    out->push_back(h);
  }
}

}  // namespace pdserve
