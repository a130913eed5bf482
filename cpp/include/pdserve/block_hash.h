// Chained block hashes: the prefix identity of a cached block, shared by the radix tree's event
// log and the scheduler's mirror of it (which computes the same values through hash_blocks()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace pdserve {

// Hash of one block given the hash of the block before it (0 for the first block):
//   h = parent_hash
//   for each token t (as uint32):  h = (h ^ t) * 0x9E3779B97F4A7C15 (mod 2^64);  h ^= h >> 29
//   h ^= h >> 32;  h *= 0xD6E8FEB86659FD93 (mod 2^64);  h ^= h >> 32
// The Python reference model (pdserve.cache.reference.hash_block) spells out the same formula.
uint64_t hash_block(uint64_t parent_hash, const int32_t* tokens, size_t num_tokens);

// Appends the chained hashes of the whole blocks of tokens[0, num_tokens) to *out (num_tokens /
// block_size values; a trailing partial block is ignored), starting from parent_hash.
void hash_blocks(const int32_t* tokens, size_t num_tokens, size_t block_size, uint64_t parent_hash,
                 std::vector<uint64_t>* out);

}  // namespace pdserve
