// Fixed-size pool of KV-cache block ids for one memory tier, with reference counts and per-request
// reservations. The radix tree and the engine's block manager both allocate through it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace pdserve {

// Memory tier of a block pool. Block ids are dense per tier and meaningless across tiers.
enum class Tier : int32_t { kGpu = 0, kHost = 1 };

using BlockId = int32_t;

// Human-readable tier name ("GPU" / "HOST") for error messages and events.
const char* tier_name(Tier tier);

// Reference-counted block ids 0..num_blocks-1 of one tier.
//
// Every block is in exactly one state (the invariant checked by check_invariants()):
//   free    - ref_count == 0, not owned by the radix tree, on the free list;
//   cached  - ref_count == 0, owned by the radix tree (reusable prefix, evictable);
//   in_use  - ref_count > 0 (owned by the tree or not).
// so that num_free + num_cached + num_in_use == num_total at all times.
// Reserved blocks (held for a request id) are a subset of in_use: the reservation holds one
// reference on each.
//
// The free list is a stack: allocate() pops from its top and a block that becomes free is pushed
// on top, so a fresh pool hands out 0, 1, 2, ... and recently freed blocks are reused first.
//
// Thread safety: every public method takes the pool's mutex; the pool never calls out while
// holding it. A RadixTree calls the pool while holding the tree's mutex (lock order tree -> pool).
// Errors: std::invalid_argument (bad id, double free, not enough free blocks, ...) with a message
// naming the offending value; std::runtime_error from check_invariants().
class BlockPool {
 public:
  // Creates num_blocks free blocks of `tier`. Throws std::invalid_argument if num_blocks < 0.
  BlockPool(int32_t num_blocks, Tier tier);
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;

  Tier tier() const { return tier_; }
  int32_t num_total() const { return num_total_; }
  int32_t num_free() const;
  int32_t num_cached() const;
  int32_t num_in_use() const;
  // Blocks held by reservations (a subset of num_in_use()).
  int32_t num_reserved() const;

  // True when allocate(num_blocks) would succeed (num_blocks <= num_free(); num_blocks >= 0).
  bool can_allocate(int32_t num_blocks) const;
  // Takes num_blocks blocks off the free list with ref_count 1 each and returns their ids; the
  // caller owns one reference on each. Throws (taking nothing) if !can_allocate(num_blocks).
  std::vector<BlockId> allocate(int32_t num_blocks);
  // Appends the allocated ids to *out instead of returning a new vector (no allocation when *out
  // has capacity). Same contract as allocate().
  void allocate_into(int32_t num_blocks, std::vector<BlockId>* out);

  // Adds one reference to each block; blocks may be in_use or cached, not free. Checks every id
  // first and changes nothing if one is invalid. The same id may appear several times.
  void incref(const BlockId* block_ids, size_t num_blocks);
  void incref(const std::vector<BlockId>& block_ids) { incref(block_ids.data(), block_ids.size()); }
  // Drops one reference from each block. A block reaching 0 returns to the free list unless the
  // radix tree owns it (then it becomes cached). Checks first (double free = ref_count already 0,
  // or a last reference held by a reservation): nothing changes on error.
  void decref(const BlockId* block_ids, size_t num_blocks);
  void decref(const std::vector<BlockId>& block_ids) { decref(block_ids.data(), block_ids.size()); }
  // Current reference count of one block. Throws on an unknown id.
  int32_t ref_count(BlockId block_id) const;
  // True when the radix tree owns the block. Throws on an unknown id.
  bool is_owned(BlockId block_id) const;

  // Allocates num_blocks blocks held for request_id (appended to any it already holds) and returns
  // the new ids. The reservation holds one reference on each. Throws (taking nothing) if
  // !can_allocate(num_blocks).
  std::vector<BlockId> reserve(const std::string& request_id, int32_t num_blocks);
  // Ids currently held for request_id, in reservation order (empty if none).
  std::vector<BlockId> reserved_blocks(const std::string& request_id) const;
  // Drops the reservation's reference on every block it still holds and forgets request_id.
  // Returns how many blocks it held; 0 for an unknown request id (idempotent on abort paths).
  int32_t release_reservation(const std::string& request_id);
  // Ends the reservation without dropping references: the caller takes over one reference on each
  // returned block. Throws std::invalid_argument for an unknown request id.
  std::vector<BlockId> transfer_reservation(const std::string& request_id);

  // Recomputes every count from the per-block state and throws std::runtime_error naming the
  // numbers if free + cached + in_use != total or any block's state is inconsistent.
  void check_invariants() const;

  // ---- Used by RadixTree (ownership of cached blocks). ----
  // Marks blocks as tree-owned. Each must be allocated (ref_count > 0) and not yet owned; checks
  // all first. The caller keeps its references.
  void adopt(const BlockId* block_ids, size_t num_blocks);
  // Ends tree ownership; a block with ref_count 0 goes back to the free list (pushed in order).
  void disown(const BlockId* block_ids, size_t num_blocks);
  // True when every listed block has ref_count 0 (no one but the tree holds it).
  bool all_unreferenced(const BlockId* block_ids, size_t num_blocks) const;
  // all_unreferenced() then disown(), under one lock: frees the blocks and returns true, or changes
  // nothing and returns false when one of them is still referenced.
  bool disown_if_unreferenced(const BlockId* block_ids, size_t num_blocks);

 private:
  struct BlockState {
    int32_t ref_count = 0;
    bool owned = false;     // owned by the radix tree
    bool reserved = false;  // held by a reservation (which holds one of ref_count)
  };

  void check_id_locked(BlockId block_id, const char* what) const {
    if (block_id < 0 || block_id >= num_total_) throw_unknown_id(block_id, what);
  }
  [[noreturn]] void throw_unknown_id(BlockId block_id, const char* what) const;
  void allocate_locked(int32_t num_blocks, std::vector<BlockId>* out);
  void check_can_allocate_locked(int32_t num_blocks) const;
  void decref_one_locked(BlockId block_id);

  const Tier tier_;
  const int32_t num_total_;
  mutable std::mutex mutex_;
  std::vector<BlockState> blocks_;   // indexed by block id
  std::vector<BlockId> free_stack_;  // top = back()
  int32_t num_in_use_ = 0;           // blocks with ref_count > 0
  int32_t num_cached_ = 0;           // owned blocks with ref_count == 0
  int32_t num_reserved_ = 0;         // sum of reservation sizes
  std::unordered_map<std::string, std::vector<BlockId>> reservations_;
};

}  // namespace pdserve
