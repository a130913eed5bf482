// RadixTree::check_invariants(): recomputes everything the tree maintains incrementally (links,
// GPU-child counts, lock counts, candidate sets, pool ownership, pending tickets) and compares.
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "radix_tree_impl.h"

namespace pdserve {

void RadixTree::Impl::fail(const std::string& msg) const {
  throw std::runtime_error("RadixTree::check_invariants: " + msg);
}

void RadixTree::Impl::check_invariants() const {
  std::unordered_map<const Node*, int32_t> expected_locks;
  locks_.for_each([&](uint64_t, const Node* target) {
    for (const Node* n = target; n != root_; n = n->parent) ++expected_locks[n];
  });
  int32_t pending_demote = 0;
  std::vector<const Node*> stack = {root_};
  size_t count = 0;
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    int32_t gpu_children = 0;
    for (size_t i = 0; i < n->children.size(); ++i) {
      const Node* c = n->children[i];
      if (c->parent != n || c->index_in_parent != i)
        fail("broken parent link at node " + std::to_string(c->id));
      if (c->tier == Tier::kGpu) ++gpu_children;
      if (c->last_access > n->last_access && n != root_) {
        fail("node " + std::to_string(c->id) + " is more recent than its parent");
      }
      stack.push_back(c);
    }
    if (gpu_children != n->num_gpu_children) {
      fail("node " + std::to_string(n->id) + " counts " + std::to_string(n->num_gpu_children) +
           " GPU children, has " + std::to_string(gpu_children));
    }
    if (n->child_index && n->child_index->size() != n->children.size()) {
      fail("child index of node " + std::to_string(n->id) + " is out of date");
    }
    if (n == root_) continue;
    ++count;
    if (n->block_ids.empty() || n->tokens.size() != n->block_ids.size() * bs_) {
      fail("node " + std::to_string(n->id) + " has " + std::to_string(n->tokens.size()) +
           " tokens for " + std::to_string(n->block_ids.size()) + " blocks");
    }
    if (record_events_ && n->block_hashes.size() != n->block_ids.size()) {
      fail("node " + std::to_string(n->id) + " lacks block hashes");
    }
    auto lk = expected_locks.find(n);
    int32_t want = lk == expected_locks.end() ? 0 : lk->second;
    if (want != n->lock_count) {
      fail("node " + std::to_string(n->id) + " lock_count " + std::to_string(n->lock_count) +
           ", live locks through it " + std::to_string(want));
    }
    const BlockPool& p = pool(n->tier);
    for (BlockId id : n->block_ids) {
      if (!p.is_owned(id)) fail("block " + std::to_string(id) + " is not marked owned");
      if (p.ref_count(id) < n->lock_count)
        fail("block " + std::to_string(id) + " has fewer refs than locks");
    }
    if (n->ticket_id != 0) {
      if (tickets_.count(n->ticket_id) == 0) fail("node in a committed ticket");
      if (n->pending_block_ids.size() != n->block_ids.size()) fail("pending size mismatch");
      if (tickets_.at(n->ticket_id).kind == TicketKind::kDemote) {
        pending_demote += static_cast<int32_t>(n->num_blocks());
      }
    } else if (!n->pending_block_ids.empty()) {
      fail("node " + std::to_string(n->id) + " has pending blocks without a ticket");
    }
    bool free_of_pins = n->lock_count == 0 && n->ticket_id == 0;
    bool want_evict = free_of_pins && n->children.empty();
    bool want_demote =
        free_of_pins && host_pool_ && n->tier == Tier::kGpu && n->num_gpu_children == 0;
    if (want_evict != n->in_evict_set || want_demote != n->in_demote_set) {
      fail("node " + std::to_string(n->id) + " candidate-set membership is stale");
    }
  }
  if (count != live_.size() - 1) fail("live node map size mismatch");
  if (pending_demote != pending_demote_blocks_) fail("pending demote count mismatch");
  gpu_pool_->check_invariants();
  if (host_pool_) host_pool_->check_invariants();
}

int32_t RadixTree::Impl::num_tree_blocks(Tier tier) const {
  int32_t total = 0;
  live_.for_each([&](uint64_t, const Node* n) {
    if (n != root_ && n->tier == tier) total += static_cast<int32_t>(n->num_blocks());
  });
  return total;
}

}  // namespace pdserve
