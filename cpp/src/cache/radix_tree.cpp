// RadixTree implementation: node structure (recycled arena; children found by a linear scan of a
// small vector or, past kIndexThreshold children, a hash index on the first block's tokens),
// match / insert / locks / eviction, and the public API's forwarding under the tree's mutex.
// Eviction and demotion candidates live in ordered sets, so a victim is found in O(log n).
#include "pdserve/radix_tree.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "pdserve/block_hash.h"
#include "radix_tree_impl.h"

namespace pdserve {
using detail::handle_error;
using detail::kIndexThreshold;

RadixTree::Impl::Impl(int32_t block_size, std::shared_ptr<BlockPool> gpu_pool,
                      std::shared_ptr<BlockPool> host_pool, bool record_events)
    : bs_(block_size),
      gpu_pool_(std::move(gpu_pool)),
      host_pool_(std::move(host_pool)),
      record_events_(record_events) {
  if (block_size <= 0) {
    throw std::invalid_argument("block_size must be > 0, got " + std::to_string(block_size));
  }
  if (!gpu_pool_) throw std::invalid_argument("gpu_pool must not be null");
  if (gpu_pool_->tier() != Tier::kGpu) {
    throw std::invalid_argument("gpu_pool has tier HOST; expected a GPU pool");
  }
  if (host_pool_ && host_pool_->tier() != Tier::kHost) {
    throw std::invalid_argument("host_pool has tier GPU; expected a HOST pool");
  }
  root_ = new_node();
  root_->id = 0;
  live_.clear();
  live_[0] = root_;
  next_node_id_ = 1;
}

Node* RadixTree::Impl::new_node() {
  Node* n;
  if (!spare_.empty()) {
    n = spare_.back();
    spare_.pop_back();
  } else {
    arena_.push_back(std::make_unique<Node>());
    n = arena_.back().get();
  }
  n->id = next_node_id_++;
  live_[n->id] = n;
  return n;
}

void RadixTree::Impl::recycle(Node* n) {
  live_.erase(n->id);
  n->parent = nullptr;
  n->lock_count = 0;
  n->ticket_id = 0;
  n->num_gpu_children = 0;
  n->tokens.clear();
  n->block_ids.clear();
  n->pending_block_ids.clear();
  n->block_hashes.clear();
  n->children.clear();
  n->child_index.reset();
  spare_.push_back(n);
}

uint64_t RadixTree::Impl::content_key(const int32_t* block) const {
  uint64_t a = 0x243F6A8885A308D3ULL, b = 0x13198A2E03707344ULL;
  int32_t i = 0;
  for (; i + 1 < bs_; i += 2) {
    a = (a ^ static_cast<uint32_t>(block[i])) * 0x9E3779B97F4A7C15ULL;
    b = (b ^ static_cast<uint32_t>(block[i + 1])) * 0xC2B2AE3D27D4EB4FULL;
  }
  if (i < bs_) a = (a ^ static_cast<uint32_t>(block[i])) * 0x9E3779B97F4A7C15ULL;
  uint64_t h = a ^ ((b << 31) | (b >> 33));
  return h ^ (h >> 29);
}

void detail::ChildIndex::insert(uint64_t key, Node* child) {
  if ((used_ + 1) * 2 > slots_.size()) rehash(std::max<size_t>(16, (size_ + 1) * 4));
  size_t i = home(key);
  while (slots_[i].node != nullptr) i = (i + 1) & mask_;
  if (!slots_[i].erased) ++used_;
  slots_[i] = Slot{key, child, false};
  ++size_;
}

void detail::ChildIndex::erase(uint64_t key, const Node* child) {
  if (slots_.empty()) return;
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.node == nullptr && !s.erased) return;
    if (s.node == child) {
      s.node = nullptr;
      s.erased = true;
      --size_;
      return;
    }
  }
}

void detail::ChildIndex::replace(uint64_t key, const Node* from, Node* to) {
  if (slots_.empty()) return;
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.node == nullptr && !s.erased) return;
    if (s.node == from) {
      s.node = to;
      return;
    }
  }
}

void detail::ChildIndex::rehash(size_t capacity) {
  size_t cap = 16;
  int bits = 4;
  while (cap < capacity) {
    cap <<= 1;
    ++bits;
  }
  std::vector<Slot> old;
  old.swap(slots_);
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  shift_ = 64 - bits;
  size_ = 0;
  used_ = 0;
  for (const Slot& s : old) {
    if (s.node != nullptr) insert(s.key, s.node);
  }
}

Node* RadixTree::Impl::find_child(const Node* n, const int32_t* block) const {
  const size_t nbytes = sizeof(int32_t) * bs_;
  if (n->child_index) {
    return n->child_index->find(content_key(block), [&](const Node* c) {
      return std::memcmp(first_block(c), block, nbytes) == 0;
    });
  }
  for (Node* c : n->children) {
    if (c->tokens[0] == block[0] && std::memcmp(first_block(c), block, nbytes) == 0) return c;
  }
  return nullptr;
}

void RadixTree::Impl::add_child(Node* parent, Node* child) {
  child->parent = parent;
  child->child_key = content_key(first_block(child));
  child->index_in_parent = parent->children.size();
  parent->children.push_back(child);
  if (child->tier == Tier::kGpu) ++parent->num_gpu_children;
  if (parent->child_index) {
    parent->child_index->insert(child->child_key, child);
  } else if (parent->children.size() > kIndexThreshold) {
    parent->child_index = std::make_unique<detail::ChildIndex>();
    for (Node* c : parent->children) {
      parent->child_index->insert(c->child_key, c);
    }
  }
}

void RadixTree::Impl::erase_from_index(Node* parent, Node* child) {
  parent->child_index->erase(child->child_key, child);
}

void RadixTree::Impl::remove_child(Node* parent, Node* child) {
  size_t i = child->index_in_parent;
  Node* last = parent->children.back();
  parent->children[i] = last;
  last->index_in_parent = i;
  parent->children.pop_back();
  if (child->tier == Tier::kGpu) --parent->num_gpu_children;
  if (parent->child_index) erase_from_index(parent, child);
}

void RadixTree::Impl::unlist(Node* n) {
  if (n->in_evict_set) {
    evict_sets_[static_cast<int>(n->tier)].erase(n->evict_it);
    n->in_evict_set = false;
  }
  if (n->in_demote_set) {
    demote_set_.erase(n->demote_it);
    n->in_demote_set = false;
  }
}

void RadixTree::Impl::relist(Node* n) {
  unlist(n);
  if (n == root_ || n->lock_count > 0 || n->ticket_id != 0) return;
  if (n->children.empty()) {
    n->evict_it = evict_sets_[static_cast<int>(n->tier)].insert(n).first;
    n->in_evict_set = true;
  }
  if (host_pool_ && n->tier == Tier::kGpu && n->num_gpu_children == 0) {
    n->demote_it = demote_set_.insert(n).first;
    n->in_demote_set = true;
  }
}

void RadixTree::Impl::touch(Node* n, uint64_t now) {
  if (n->last_access == now) return;
  if (!n->in_evict_set && !n->in_demote_set) {
    n->last_access = now;
    return;
  }
  CandidateSet& evict_set = evict_sets_[static_cast<int>(n->tier)];
  CandidateSet::node_type evict_handle, demote_handle;
  if (n->in_evict_set) evict_handle = evict_set.extract(n->evict_it);
  if (n->in_demote_set) demote_handle = demote_set_.extract(n->demote_it);
  n->last_access = now;
  if (n->in_evict_set) n->evict_it = evict_set.insert(std::move(evict_handle)).position;
  if (n->in_demote_set) n->demote_it = demote_set_.insert(std::move(demote_handle)).position;
}

Node* RadixTree::Impl::split(Node* n, size_t k) {
  Node* upper = new_node();
  upper->seq = n->seq;
  upper->last_access = n->last_access;
  upper->tier = n->tier;
  upper->lock_count = n->lock_count;
  upper->ticket_id = n->ticket_id;
  const size_t ntok = k * bs_;
  upper->tokens.assign(n->tokens.begin(), n->tokens.begin() + ntok);
  n->tokens.erase(n->tokens.begin(), n->tokens.begin() + ntok);
  upper->block_ids.assign(n->block_ids.begin(), n->block_ids.begin() + k);
  n->block_ids.erase(n->block_ids.begin(), n->block_ids.begin() + k);
  if (!n->pending_block_ids.empty()) {
    upper->pending_block_ids.assign(n->pending_block_ids.begin(), n->pending_block_ids.begin() + k);
    n->pending_block_ids.erase(n->pending_block_ids.begin(), n->pending_block_ids.begin() + k);
  }
  if (!n->block_hashes.empty()) {
    upper->block_hashes.assign(n->block_hashes.begin(), n->block_hashes.begin() + k);
    n->block_hashes.erase(n->block_hashes.begin(), n->block_hashes.begin() + k);
  }
  // upper takes n's place in the parent (same first block, same index key).
  Node* parent = n->parent;
  upper->parent = parent;
  upper->index_in_parent = n->index_in_parent;
  upper->child_key = n->child_key;
  parent->children[n->index_in_parent] = upper;
  if (parent->child_index) parent->child_index->replace(upper->child_key, n, upper);
  add_child(upper, n);
  if (n->ticket_id != 0) tickets_.at(n->ticket_id).nodes.push_back(upper);
  return upper;
}

size_t RadixTree::Impl::walk(const int32_t* tokens, size_t num_blocks, Node** partial,
                             size_t* partial_blocks) {
  path_.clear();
  *partial = nullptr;
  *partial_blocks = 0;
  Node* n = root_;
  size_t pos = 0;
  const size_t nbytes_block = sizeof(int32_t) * bs_;
  while (pos < num_blocks) {
    Node* c = find_child(n, tokens + pos * bs_);
    if (c == nullptr) break;
    size_t avail = std::min(c->num_blocks(), num_blocks - pos);
    size_t k;
    if (std::memcmp(c->tokens.data(), tokens + pos * bs_, avail * nbytes_block) == 0) {
      k = avail;
    } else {
      k = 1;  // the first block matched in find_child
      while (k < avail &&
             std::memcmp(c->tokens.data() + k * bs_, tokens + (pos + k) * bs_, nbytes_block) == 0) {
        ++k;
      }
    }
    pos += k;
    if (k < c->num_blocks()) {
      *partial = c;
      *partial_blocks = k;
      break;
    }
    path_.push_back(c);
    n = c;
  }
  return pos;
}

void RadixTree::Impl::log_event(CacheEventKind kind, Tier tier, const Node* n, bool with_tokens) {
  if (!record_events_) return;
  CacheEvent ev;
  ev.kind = kind;
  ev.tier = tier;
  ev.parent_hash = parent_hash(n);
  ev.block_hashes = n->block_hashes;
  if (with_tokens) ev.token_ids = n->tokens;
  events_.push_back(std::move(ev));
}

uint64_t RadixTree::Impl::parent_hash(const Node* n) const {
  const Node* p = n->parent;
  return (p == nullptr || p == root_) ? 0 : p->block_hashes.back();
}

void RadixTree::Impl::match_prefix(const int32_t* tokens, size_t num_tokens, MatchResult* out) {
  out->num_tokens = 0;
  out->block_ids.clear();
  out->tiers.clear();
  out->node = 0;
  const size_t num_blocks = num_tokens / bs_;
  const uint64_t now = ++clock_;
  Node* partial;
  size_t partial_blocks;
  size_t matched = walk(tokens, num_blocks, &partial, &partial_blocks);
  if (partial != nullptr) path_.push_back(split(partial, partial_blocks));
  out->block_ids.reserve(matched);
  out->tiers.reserve(matched);
  for (Node* n : path_) {
    touch(n, now);
    out->block_ids.insert(out->block_ids.end(), n->block_ids.begin(), n->block_ids.end());
    out->tiers.insert(out->tiers.end(), n->num_blocks(), n->tier);
  }
  out->num_tokens = static_cast<int32_t>(matched * bs_);
  out->node = path_.empty() ? 0 : path_.back()->id;
}

void RadixTree::Impl::insert(const int32_t* tokens, size_t num_tokens, const BlockId* block_ids,
                             size_t num_block_ids, InsertResult* out) {
  out->num_adopted = 0;
  out->adopted_block_ids.clear();
  out->duplicate_block_ids.clear();
  const size_t num_blocks = num_tokens / bs_;
  const size_t ceil_blocks = (num_tokens + bs_ - 1) / bs_;
  if (num_block_ids != num_blocks && num_block_ids != ceil_blocks) {
    throw std::invalid_argument(
        "insert: got " + std::to_string(num_block_ids) + " block ids for " +
        std::to_string(num_tokens) + " tokens at block_size " + std::to_string(bs_) +
        "; expected " + std::to_string(num_blocks) +
        (ceil_blocks != num_blocks ? " or " + std::to_string(ceil_blocks) : std::string()));
  }
  for (size_t i = 0; i < num_blocks; ++i) {
    if (block_ids[i] < 0 || block_ids[i] >= gpu_pool_->num_total()) {
      throw std::invalid_argument("insert: unknown block id " + std::to_string(block_ids[i]) +
                                  " at position " + std::to_string(i) + " (GPU pool has ids 0.." +
                                  std::to_string(gpu_pool_->num_total() - 1) + ")");
    }
  }
  Node* partial;
  size_t partial_blocks;
  size_t matched = walk(tokens, num_blocks, &partial, &partial_blocks);
  // Check-then-act: adopting the new blocks validates them (allocated, not owned, no repeats)
  // before the tree changes at all.
  if (matched < num_blocks) gpu_pool_->adopt(block_ids + matched, num_blocks - matched);
  const uint64_t now = ++clock_;
  // Duplicates along the matched prefix.
  size_t pos = 0;
  for (Node* n : path_) {
    for (size_t j = 0; j < n->num_blocks(); ++j, ++pos) {
      if (n->tier != Tier::kGpu || n->block_ids[j] != block_ids[pos]) {
        out->duplicate_block_ids.push_back(block_ids[pos]);
      }
    }
  }
  if (partial != nullptr) {
    for (size_t j = 0; j < partial_blocks; ++j, ++pos) {
      if (partial->tier != Tier::kGpu || partial->block_ids[j] != block_ids[pos]) {
        out->duplicate_block_ids.push_back(block_ids[pos]);
      }
    }
    if (matched < num_blocks) {
      path_.push_back(split(partial, partial_blocks));
    } else {
      path_.push_back(partial);  // the sequence ends inside this node: touch it whole
    }
  }
  for (Node* n : path_) touch(n, now);
  if (matched == num_blocks) return;

  Node* parent = path_.empty() ? root_ : path_.back();
  Node* n = new_node();
  n->seq = ++seq_;
  n->last_access = now;
  n->tier = Tier::kGpu;
  n->tokens.assign(tokens + matched * bs_, tokens + num_blocks * bs_);
  n->block_ids.assign(block_ids + matched, block_ids + num_blocks);
  if (record_events_) {
    hash_blocks(n->tokens.data(), n->tokens.size(), bs_, parent_hash_of(parent), &n->block_hashes);
  }
  Node* old_parent_state = parent;
  add_child(parent, n);
  relist(old_parent_state);
  relist(n);
  out->num_adopted = static_cast<int32_t>(num_blocks - matched);
  out->adopted_block_ids.assign(n->block_ids.begin(), n->block_ids.end());
  log_event(CacheEventKind::kInserted, Tier::kGpu, n, true);
}

uint64_t RadixTree::Impl::parent_hash_of(const Node* parent) const {
  return parent == root_ ? 0 : parent->block_hashes.back();
}

Node* RadixTree::Impl::node_or_throw(NodeHandle handle, const char* what) {
  auto it = live_.find(handle);
  if (it == live_.end()) {
    throw std::invalid_argument(std::string(what) + ": unknown or evicted node handle " +
                                std::to_string(handle));
  }
  return it->second;
}

LockHandle RadixTree::Impl::lock(NodeHandle handle) {
  Node* target = node_or_throw(handle, "lock");
  for (Node* n = target; n != root_; n = n->parent) {
    pool(n->tier).incref(n->block_ids.data(), n->num_blocks());
    ++n->lock_count;
    relist(n);
  }
  LockHandle h = next_lock_id_++;
  locks_[h] = target;
  return h;
}

void RadixTree::Impl::unlock(LockHandle handle) {
  auto it = locks_.find(handle);
  if (it == locks_.end()) {
    throw std::invalid_argument(
        handle_error("unlock: unknown or already released lock handle", handle));
  }
  Node* target = it->second;
  locks_.erase(it);
  for (Node* n = target; n != root_; n = n->parent) {
    pool(n->tier).decref(n->block_ids.data(), n->num_blocks());
    --n->lock_count;
    relist(n);
  }
}

void RadixTree::Impl::remove_node(Node* n) {
  unlist(n);
  Node* parent = n->parent;
  remove_child(parent, n);
  relist(parent);
  recycle(n);
}

void RadixTree::Impl::check_tier(Tier tier, const char* what) const {
  if (tier == Tier::kHost && !host_pool_) {
    throw std::invalid_argument(std::string(what) +
                                ": tier HOST requested but the tree has no "
                                "host pool");
  }
}

void RadixTree::Impl::evict(int32_t num_blocks, Tier tier, std::vector<BlockId>* out) {
  check_tier(tier, "evict");
  if (num_blocks < 0) {
    throw std::invalid_argument("evict: num_blocks must be >= 0, got " +
                                std::to_string(num_blocks));
  }
  CandidateSet& set = evict_sets_[static_cast<int>(tier)];
  BlockPool& p = pool(tier);
  skipped_.clear();
  int32_t freed = 0;
  while (freed < num_blocks && !set.empty()) {
    Node* n = *set.begin();
    if (!p.disown_if_unreferenced(n->block_ids.data(), n->num_blocks())) {
      unlist(n);  // in use outside the tree: not evictable now
      skipped_.push_back(n);
      continue;
    }
    log_event(CacheEventKind::kEvicted, tier, n, false);
    out->insert(out->end(), n->block_ids.begin(), n->block_ids.end());
    freed += static_cast<int32_t>(n->num_blocks());
    remove_node(n);
  }
  for (Node* n : skipped_) relist(n);
}

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
    for (const auto& kv : impl.locks_) handles.push_back(kv.first);
    for (LockHandle h : handles) impl.unlock(h);
    std::vector<TicketId> tickets;
    for (const auto& kv : impl.tickets_) tickets.push_back(kv.first);
    for (TicketId t : tickets) impl.commit(t, false);
    for (const auto& kv : impl.live_) {
      Node* n = kv.second;
      if (n != impl.root_) impl.pool(n->tier).disown(n->block_ids.data(), n->num_blocks());
    }
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
