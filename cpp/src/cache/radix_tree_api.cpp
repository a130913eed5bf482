// RadixTree's public API: each method takes the tree's mutex and forwards to RadixTree::Impl
// (radix_tree.cpp, radix_tree_tiers.cpp, radix_tree_check.cpp).
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "pdserve/radix_tree.h"
#include "radix_tree_impl.h"

namespace pdserve {

// -------------------------------------------------------------------- public API
RadixTree::RadixTree(int32_t block_size, std::shared_ptr<BlockPool> gpu_pool,
                     std::shared_ptr<BlockPool> host_pool, bool record_events)
    : impl_(std::make_unique<Impl>(block_size, std::move(gpu_pool), std::move(host_pool),
                                   record_events)) {}
// The pools may outlive the tree: give back every reference the tree holds (locks, open tickets,
// ownership) so that its blocks return to the free lists.
RadixTree::~RadixTree() {
  Impl& impl = *impl_;
  std::lock_guard<std::mutex> lock(impl.mutex_);
  try {
    std::vector<LockHandle> handles;
    impl.locks_.for_each([&](uint64_t h, Node*) { handles.push_back(h); });
    for (LockHandle h : handles) impl.unlock(h);
    std::vector<TicketId> tickets;
    for (const auto& kv : impl.tickets_) tickets.push_back(kv.first);
    for (TicketId t : tickets) impl.commit(t, false);
    impl.live_.for_each([&](uint64_t, Node* n) {
      if (n != impl.root_) impl.pool(n->tier).disown(n->block_ids.data(), n->num_blocks());
    });
  } catch (...) {
    // Never throw from a destructor; a failure here leaves blocks marked as cached.
  }
}

int32_t RadixTree::block_size() const { return impl_->bs_; }
bool RadixTree::has_host_tier() const { return impl_->host_pool_ != nullptr; }
const std::shared_ptr<BlockPool>& RadixTree::gpu_pool() const { return impl_->gpu_pool_; }
const std::shared_ptr<BlockPool>& RadixTree::host_pool() const { return impl_->host_pool_; }

void RadixTree::match_prefix(const int32_t* tokens, size_t num_tokens, MatchResult* out) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->match_prefix(tokens, num_tokens, out);
}
MatchResult RadixTree::match_prefix(const std::vector<int32_t>& tokens) {
  MatchResult out;
  match_prefix(tokens.data(), tokens.size(), &out);
  return out;
}

void RadixTree::insert(const int32_t* tokens, size_t num_tokens, const BlockId* block_ids,
                       size_t num_block_ids, InsertResult* out) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->insert(tokens, num_tokens, block_ids, num_block_ids, out);
}
InsertResult RadixTree::insert(const std::vector<int32_t>& tokens,
                               const std::vector<BlockId>& block_ids) {
  InsertResult out;
  insert(tokens.data(), tokens.size(), block_ids.data(), block_ids.size(), &out);
  return out;
}

LockHandle RadixTree::lock(NodeHandle node) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return impl_->lock(node);
}
void RadixTree::unlock(LockHandle handle) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->unlock(handle);
}

void RadixTree::evict(int32_t num_blocks, Tier tier, std::vector<BlockId>* out) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->evict(num_blocks, tier, out);
}
std::vector<BlockId> RadixTree::evict(int32_t num_blocks, Tier tier) {
  std::vector<BlockId> out;
  evict(num_blocks, tier, &out);
  return out;
}

Ticket RadixTree::begin_demote(int32_t num_blocks) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return impl_->begin_demote(num_blocks);
}
Ticket RadixTree::begin_promote(NodeHandle node) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return impl_->begin_promote(node);
}
void RadixTree::commit(TicketId ticket_id, bool ok) {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->commit(ticket_id, ok);
}

std::vector<CacheEvent> RadixTree::drain_events() {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  std::vector<CacheEvent> out;
  out.swap(impl_->events_);
  return out;
}

int32_t RadixTree::num_nodes() const {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return static_cast<int32_t>(impl_->live_.size()) - 1;
}
int32_t RadixTree::num_tree_blocks(Tier tier) const {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return impl_->num_tree_blocks(tier);
}
int32_t RadixTree::num_pending_demote_blocks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return impl_->pending_demote_blocks_;
}
int32_t RadixTree::num_locks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  return static_cast<int32_t>(impl_->locks_.size());
}
void RadixTree::check_invariants() const {
  std::lock_guard<std::mutex> lock(impl_->mutex_);
  impl_->check_invariants();
}

}  // namespace pdserve
