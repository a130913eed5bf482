// Radix tree over token ids at block granularity: the prefix cache of one instance. It maps
// prompts to cached KV blocks in the GPU and HOST pools, keeps LRU order for eviction, moves nodes
// between tiers through two-step tickets, and logs every change as CacheEvents.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "pdserve/block_pool.h"
#include "pdserve/cache_events.h"

namespace pdserve {

// Opaque handles: plain ids, never reused, so a stale handle is detected instead of dereferenced.
using NodeHandle = uint64_t;  // 0 is the root (an empty match)
using LockHandle = uint64_t;
using TicketId = uint64_t;

struct MatchResult {
  int32_t num_tokens = 0;          // matched tokens, a multiple of block_size
  std::vector<BlockId> block_ids;  // one per matched block, in its tier's id space
  std::vector<Tier> tiers;         // tier of each matched block
  NodeHandle node = 0;             // deepest matched node (for lock() / begin_promote())
};

struct InsertResult {
  int32_t num_adopted = 0;
  std::vector<BlockId> adopted_block_ids;    // now owned by the tree
  std::vector<BlockId> duplicate_block_ids;  // the tree already caches these positions
};

enum class TicketKind : int32_t { kDemote = 0, kPromote = 1 };

// A pending copy between tiers: the caller copies src_block_ids[i] (in src_tier) to
// dst_block_ids[i] (in dst_tier), then calls commit(ticket_id, ok).
struct Ticket {
  TicketId ticket_id = 0;
  TicketKind kind = TicketKind::kDemote;
  Tier src_tier = Tier::kGpu;
  Tier dst_tier = Tier::kHost;
  std::vector<BlockId> src_block_ids;
  std::vector<BlockId> dst_block_ids;
};

// The tree. Nodes hold runs of whole blocks; children are keyed by their first block's tokens.
//
// LRU: a logical clock advances once per match_prefix / insert; every node on the touched path
// gets the new time (so a parent is never older than its child). Eviction and demotion take the
// candidate with the smallest (last_access, insertion order, node id) first.
//   evict candidates of tier T:  tier T, no children, not locked, not in a ticket, and every
//                                block's ref_count 0 (checked when it comes up; skipped otherwise);
//   demote candidates:           GPU, no GPU children, not locked, not in a ticket, ref_count 0.
// Locks: lock() adds one pool reference to every block on the root->node path and a lock count
// to each node; locked nodes are never evicted, demoted or dropped.
// Tickets pin their nodes (not evictable, not demotable again) until commit(); the nodes stay
// matchable in their source tier meanwhile. A commit that fails leaves the tree as before.
// A demote commit skips nodes that were locked after begin_demote (their copies are dropped).
// Tiers may interleave along a path (GPU blocks inserted below a demoted prefix stay on the GPU),
// which is why MatchResult carries a tier per block.
//
// Thread safety: every public method takes the tree's mutex, then calls the pools (lock order
// tree -> pool). The pools may be used directly from other threads at the same time.
// Errors: std::invalid_argument naming the bad value (wrong token/block counts, unknown handle
// or ticket, block id problems reported by the pool); std::runtime_error from check_invariants().
class RadixTree {
 public:
  // block_size > 0 tokens per block. gpu_pool must have tier GPU and host_pool (optional) tier
  // HOST; the tree shares ownership of both. record_events=false skips hashing and the event log.
  RadixTree(int32_t block_size, std::shared_ptr<BlockPool> gpu_pool,
            std::shared_ptr<BlockPool> host_pool = nullptr, bool record_events = true);
  // Releases every lock, fails every open ticket and disowns all cached blocks, so the pools
  // (which may outlive the tree) get their blocks back.
  ~RadixTree();
  RadixTree(const RadixTree&) = delete;
  RadixTree& operator=(const RadixTree&) = delete;

  int32_t block_size() const;
  bool has_host_tier() const;
  const std::shared_ptr<BlockPool>& gpu_pool() const;
  const std::shared_ptr<BlockPool>& host_pool() const;  // null without a host tier

  // Longest cached prefix of tokens[0, num_tokens) in whole blocks. Fills *out (its vectors are
  // cleared, capacity kept). Touches the matched path; splits a node if the match ends inside it
  // so that out->node names exactly the matched prefix. The returned block ids stay valid only
  // while locked (lock(out->node)) or while no one evicts.
  void match_prefix(const int32_t* tokens, size_t num_tokens, MatchResult* out);
  MatchResult match_prefix(const std::vector<int32_t>& tokens);

  // Caches the whole blocks of tokens: block_ids[i] holds tokens [i*bs, (i+1)*bs) in the GPU
  // pool. num_block_ids must be num_tokens / bs, or that plus one when the last block is partial
  // (that id is ignored). Positions already cached with a different id are duplicates (caller
  // drops its reference); new positions are adopted (tree-owned, cached once their ref count
  // reaches 0); a position cached with the same id is neither. The caller keeps its references
  // either way. Touches the path. Checks first: on error nothing changes.
  void insert(const int32_t* tokens, size_t num_tokens, const BlockId* block_ids,
              size_t num_block_ids, InsertResult* out);
  InsertResult insert(const std::vector<int32_t>& tokens, const std::vector<BlockId>& block_ids);

  // Pins the root->node path (see class comment). Returns a handle for unlock(). Throws for an
  // unknown or evicted node. Locking the root (0) is allowed and pins nothing. match_prefix() then
  // lock() are two calls: with other threads evicting, the node may be gone in between (lock
  // throws std::invalid_argument; match again).
  LockHandle lock(NodeHandle node);
  // Releases a lock. Throws for an unknown or already released handle.
  void unlock(LockHandle handle);

  // Frees at least num_blocks blocks of `tier` by removing LRU candidates (whole nodes), or fewer
  // if nothing else is evictable. Appends the freed ids, in eviction order, to *out.
  void evict(int32_t num_blocks, Tier tier, std::vector<BlockId>* out);
  std::vector<BlockId> evict(int32_t num_blocks, Tier tier);

  // Picks LRU demote candidates covering at least num_blocks GPU blocks (whole nodes, stopping
  // at the first that does not fit into the free HOST blocks) and allocates their HOST copies.
  // Throws without a host tier. The ticket may list no copies.
  Ticket begin_demote(int32_t num_blocks);
  // Allocates GPU blocks for every HOST node on the root->node path not already in a ticket.
  // Throws (taking nothing) when the GPU pool lacks the blocks, or for an unknown node.
  Ticket begin_promote(NodeHandle node);
  // ok: the copied nodes switch tier and their source blocks are freed. !ok: the destination
  // blocks are freed and the tree is as before. Throws for an unknown ticket id.
  void commit(TicketId ticket_id, bool ok);

  // Returns and clears the events logged since the last call (empty if record_events=false).
  std::vector<CacheEvent> drain_events();

  int32_t num_nodes() const;                  // excluding the root
  int32_t num_tree_blocks(Tier tier) const;   // blocks the tree owns in that tier
  int32_t num_pending_demote_blocks() const;  // GPU blocks in open demote tickets
  int32_t num_locks() const;                  // live lock handles

  // Checks the tree's structure, lock counts, candidate sets and the ownership flags in both
  // pools, then both pools' invariants. Throws std::runtime_error describing the first problem.
  void check_invariants() const;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pdserve
