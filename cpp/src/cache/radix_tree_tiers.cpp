// RadixTree demote / promote tickets: begin_* allocates the destination blocks and pins the nodes,
// commit() switches tiers (moving any locks with the blocks) or undoes the allocation.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "radix_tree_impl.h"

namespace pdserve {
using detail::handle_error;

Ticket RadixTree::Impl::begin_demote(int32_t num_blocks) {
  if (!host_pool_) {
    throw std::invalid_argument("begin_demote: the tree has no host pool to demote into");
  }
  if (num_blocks < 0) {
    throw std::invalid_argument("begin_demote: num_blocks must be >= 0, got " +
                                std::to_string(num_blocks));
  }
  Ticket t;
  t.ticket_id = next_ticket_id_++;
  t.kind = TicketKind::kDemote;
  t.src_tier = Tier::kGpu;
  t.dst_tier = Tier::kHost;
  TicketState& state = tickets_[t.ticket_id];
  state.kind = TicketKind::kDemote;
  skipped_.clear();
  int32_t taken = 0;
  while (taken < num_blocks && !demote_set_.empty()) {
    Node* n = *demote_set_.begin();
    if (!gpu_pool_->all_unreferenced(n->block_ids.data(), n->num_blocks())) {
      unlist(n);
      skipped_.push_back(n);
      continue;
    }
    if (!host_pool_->can_allocate(static_cast<int32_t>(n->num_blocks()))) break;
    host_pool_->allocate_into(static_cast<int32_t>(n->num_blocks()), &n->pending_block_ids);
    n->ticket_id = t.ticket_id;
    unlist(n);
    state.nodes.push_back(n);
    t.src_block_ids.insert(t.src_block_ids.end(), n->block_ids.begin(), n->block_ids.end());
    t.dst_block_ids.insert(t.dst_block_ids.end(), n->pending_block_ids.begin(),
                           n->pending_block_ids.end());
    taken += static_cast<int32_t>(n->num_blocks());
  }
  for (Node* n : skipped_) relist(n);
  pending_demote_blocks_ += taken;
  return t;
}

Ticket RadixTree::Impl::begin_promote(NodeHandle handle) {
  Node* target = node_or_throw(handle, "begin_promote");
  std::vector<Node*> todo;
  int32_t need = 0;
  for (Node* n = target; n != root_; n = n->parent) {
    if (n->tier == Tier::kHost && n->ticket_id == 0) {
      todo.push_back(n);
      need += static_cast<int32_t>(n->num_blocks());
    }
  }
  std::reverse(todo.begin(), todo.end());  // root side first
  if (!gpu_pool_->can_allocate(need)) {
    throw std::invalid_argument("begin_promote: need " + std::to_string(need) +
                                " free GPU blocks, only " + std::to_string(gpu_pool_->num_free()) +
                                " free; evict first");
  }
  Ticket t;
  t.ticket_id = next_ticket_id_++;
  t.kind = TicketKind::kPromote;
  t.src_tier = Tier::kHost;
  t.dst_tier = Tier::kGpu;
  TicketState& state = tickets_[t.ticket_id];
  state.kind = TicketKind::kPromote;
  for (Node* n : todo) {
    gpu_pool_->allocate_into(static_cast<int32_t>(n->num_blocks()), &n->pending_block_ids);
    n->ticket_id = t.ticket_id;
    unlist(n);
    state.nodes.push_back(n);
    t.src_block_ids.insert(t.src_block_ids.end(), n->block_ids.begin(), n->block_ids.end());
    t.dst_block_ids.insert(t.dst_block_ids.end(), n->pending_block_ids.begin(),
                           n->pending_block_ids.end());
  }
  return t;
}

void RadixTree::Impl::set_tier(Node* n, Tier tier) {
  if (n->tier == tier) return;
  Node* parent = n->parent;
  if (n->tier == Tier::kGpu) --parent->num_gpu_children;
  n->tier = tier;
  if (tier == Tier::kGpu) ++parent->num_gpu_children;
  relist(parent);
}

void RadixTree::Impl::commit(TicketId ticket_id, bool ok) {
  auto it = tickets_.find(ticket_id);
  if (it == tickets_.end()) {
    throw std::invalid_argument(
        handle_error("commit: unknown or already committed ticket id", ticket_id));
  }
  TicketState state = std::move(it->second);
  tickets_.erase(it);
  const bool demote = state.kind == TicketKind::kDemote;
  const Tier src = demote ? Tier::kGpu : Tier::kHost;
  const Tier dst = demote ? Tier::kHost : Tier::kGpu;
  BlockPool& src_pool = pool(src);
  BlockPool& dst_pool = pool(dst);
  for (Node* n : state.nodes) {
    n->ticket_id = 0;
    if (demote) pending_demote_blocks_ -= static_cast<int32_t>(n->num_blocks());
    const bool apply = ok && !(demote && n->lock_count > 0);
    if (apply) {
      // Locks taken on the node move with its blocks, so unlock() drops the right ones.
      for (int32_t i = 0; i < n->lock_count; ++i) {
        dst_pool.incref(n->pending_block_ids.data(), n->num_blocks());
        src_pool.decref(n->block_ids.data(), n->num_blocks());
      }
      dst_pool.adopt(n->pending_block_ids.data(), n->num_blocks());
      dst_pool.decref(n->pending_block_ids.data(), n->num_blocks());
      src_pool.disown(n->block_ids.data(), n->num_blocks());
      n->block_ids.swap(n->pending_block_ids);
      unlist(n);
      set_tier(n, dst);
      log_event(demote ? CacheEventKind::kDemoted : CacheEventKind::kPromoted, dst, n, false);
    } else {
      dst_pool.decref(n->pending_block_ids.data(), n->num_blocks());
    }
    n->pending_block_ids.clear();
    relist(n);
  }
}

}  // namespace pdserve
