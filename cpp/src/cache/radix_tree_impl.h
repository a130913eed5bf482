// Internal to the cache library: the node type and the RadixTree::Impl class shared by
// radix_tree.cpp (structure, match, insert, locks, eviction), radix_tree_tiers.cpp (demote /
// promote tickets) and radix_tree_check.cpp (invariants). Not installed, not part of the API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "pdserve/radix_tree.h"

namespace pdserve {
namespace detail {

constexpr size_t kIndexThreshold = 8;

struct Node;

// Orders candidates: least recently used first, then insertion order, then creation order.
struct NodeLess {
  bool operator()(const Node* a, const Node* b) const;
};
using CandidateSet = std::set<Node*, NodeLess>;

// Hash index of a node's children by child_key (content_key of the child's first block): open
// addressing with linear probing over a power-of-two table kept at most half full (tombstones
// included), so a lookup is one multiply, a shift and usually one probe, with no per-entry heap
// node. Keys may repeat (content_key collisions): callers verify candidates with memcmp.
class ChildIndex {
 public:
  size_t size() const { return size_; }
  void insert(uint64_t key, Node* child);
  // Removes the entry (key, child); no-op when absent.
  void erase(uint64_t key, const Node* child);
  // Points the entry (key, from) at `to`.
  void replace(uint64_t key, const Node* from, Node* to);
  // First entry with `key` for which matches(node) holds, or nullptr.
  template <typename Matches>
  Node* find(uint64_t key, Matches&& matches) const {
    if (slots_.empty()) return nullptr;
    for (size_t i = home(key);; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.node == nullptr && !s.erased) return nullptr;
      if (s.node != nullptr && s.key == key && matches(s.node)) return s.node;
    }
  }

 private:
  struct Slot {
    uint64_t key = 0;
    Node* node = nullptr;  // nullptr: empty, or erased when `erased`
    bool erased = false;
  };
  size_t home(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ULL) >> shift_; }
  void rehash(size_t capacity);

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  int shift_ = 64;
  size_t size_ = 0;  // live entries
  size_t used_ = 0;  // live + erased slots
};

struct Node {
  uint64_t id = 0;           // unique, never reused; the NodeHandle
  uint64_t seq = 0;          // insertion order (both halves of a split keep it)
  uint64_t last_access = 0;  // logical clock
  Node* parent = nullptr;
  size_t index_in_parent = 0;
  Tier tier = Tier::kGpu;
  int32_t lock_count = 0;
  TicketId ticket_id = 0;
  int32_t num_gpu_children = 0;
  std::vector<int32_t> tokens;  // num_blocks() * block_size
  std::vector<BlockId> block_ids;
  std::vector<BlockId> pending_block_ids;  // ticket destination blocks, parallel to block_ids
  std::vector<uint64_t> block_hashes;      // chained hashes (when recording events)
  std::vector<Node*> children;
  uint64_t child_key = 0;  // content_key() of the first block, the key in the parent's index
  std::unique_ptr<ChildIndex> child_index;
  // Membership in the candidate sets (at most one evict set plus the demote set).
  bool in_evict_set = false;
  bool in_demote_set = false;
  CandidateSet::iterator evict_it;
  CandidateSet::iterator demote_it;

  size_t num_blocks() const { return block_ids.size(); }
};

inline bool NodeLess::operator()(const Node* a, const Node* b) const {
  if (a->last_access != b->last_access) return a->last_access < b->last_access;
  if (a->seq != b->seq) return a->seq < b->seq;
  return a->id < b->id;
}

struct TicketState {
  TicketKind kind;
  std::vector<Node*> nodes;  // nodes pinned by this ticket (split halves are appended)
};

inline std::string handle_error(const char* what, uint64_t handle) {
  return std::string(what) + " " + std::to_string(handle);
}

}  // namespace detail

using detail::CandidateSet;
using detail::Node;
using detail::TicketState;

class RadixTree::Impl {
 public:
  Impl(int32_t block_size, std::shared_ptr<BlockPool> gpu_pool,
       std::shared_ptr<BlockPool> host_pool, bool record_events);

  // ---------------------------------------------------------------- helpers
  BlockPool& pool(Tier tier) { return tier == Tier::kGpu ? *gpu_pool_ : *host_pool_; }
  const BlockPool& pool(Tier tier) const { return tier == Tier::kGpu ? *gpu_pool_ : *host_pool_; }
  Node* new_node();
  void recycle(Node* n);
  const int32_t* first_block(const Node* n) const { return n->tokens.data(); }

  // Hash-index key of a block's tokens (children are verified with memcmp, so this only has to
  // spread well): two independent multiply chains, cheaper than the chained block hash.
  uint64_t content_key(const int32_t* block) const;
  Node* find_child(const Node* n, const int32_t* block) const;
  void add_child(Node* parent, Node* child);
  void erase_from_index(Node* parent, Node* child);
  void remove_child(Node* parent, Node* child);

  // Candidate-set bookkeeping. A node's set key must not change while it is listed: callers
  // unlist() before changing last_access, or call relist() after any other state change
  // (erasing by iterator never compares keys).
  void unlist(Node* n);
  void relist(Node* n);

  // Moves a listed node to its new LRU position by re-linking its set nodes (no allocation).
  void touch(Node* n, uint64_t now);

  // Splits n after its first k blocks; returns the new upper node (n keeps the rest). Neither
  // half changes candidacy: the upper one has n as its child and the same tier.
  Node* split(Node* n, size_t k);

  // Read-only walk: fills path_ with the fully matched nodes and returns the number of matched
  // blocks; *partial / *partial_blocks describe a node matched only in its first blocks.
  size_t walk(const int32_t* tokens, size_t num_blocks, Node** partial, size_t* partial_blocks);
  void log_event(CacheEventKind kind, Tier tier, const Node* n, bool with_tokens);
  uint64_t parent_hash(const Node* n) const;

  // ---------------------------------------------------------------- operations
  void match_prefix(const int32_t* tokens, size_t num_tokens, MatchResult* out);
  void insert(const int32_t* tokens, size_t num_tokens, const BlockId* block_ids,
              size_t num_block_ids, InsertResult* out);
  uint64_t parent_hash_of(const Node* parent) const;
  Node* node_or_throw(NodeHandle handle, const char* what);
  LockHandle lock(NodeHandle handle);
  void unlock(LockHandle handle);
  void remove_node(Node* n);
  void check_tier(Tier tier, const char* what) const;
  void evict(int32_t num_blocks, Tier tier, std::vector<BlockId>* out);
  Ticket begin_demote(int32_t num_blocks);
  Ticket begin_promote(NodeHandle handle);
  void set_tier(Node* n, Tier tier);
  void commit(TicketId ticket_id, bool ok);

  // ---------------------------------------------------------------- checks
  [[noreturn]] void fail(const std::string& msg) const;
  void check_invariants() const;
  int32_t num_tree_blocks(Tier tier) const;

  // ---------------------------------------------------------------- state
  const int32_t bs_;
  std::shared_ptr<BlockPool> gpu_pool_;
  std::shared_ptr<BlockPool> host_pool_;
  const bool record_events_;
  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Node>> arena_;
  std::vector<Node*> spare_;
  std::unordered_map<uint64_t, Node*> live_;  // NodeHandle -> node (root is 0)
  Node* root_ = nullptr;
  uint64_t next_node_id_ = 0;
  uint64_t seq_ = 0;
  uint64_t clock_ = 0;
  CandidateSet evict_sets_[2];
  CandidateSet demote_set_;
  std::unordered_map<LockHandle, Node*> locks_;
  LockHandle next_lock_id_ = 1;
  std::unordered_map<TicketId, TicketState> tickets_;
  TicketId next_ticket_id_ = 1;
  int32_t pending_demote_blocks_ = 0;
  std::vector<CacheEvent> events_;
  std::vector<Node*> path_;     // scratch, reused across calls
  std::vector<Node*> skipped_;  // scratch
};

}  // namespace pdserve
