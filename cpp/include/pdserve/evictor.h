// Watermark eviction policy over a RadixTree: keeps each tier's used fraction under its high
// watermark by demoting (GPU -> HOST) or freeing LRU cache nodes. Policy only; the tree does the
// mechanism.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "pdserve/radix_tree.h"

namespace pdserve {

struct EvictionPlan {
  bool has_demote_ticket = false;
  Ticket demote_ticket;  // valid when has_demote_ticket: copy, then tree.commit(ticket_id, ok)
  std::vector<BlockId> freed_gpu_block_ids;
  std::vector<BlockId> freed_host_block_ids;
};

// Used fraction of a tier = (total - free) / total; GPU blocks already in open demote tickets do
// not count as used (they leave at commit). When a tier is above its high watermark, plan()
// brings it down to the low one:
//   HOST: frees LRU HOST leaves first (making room for demotions);
//   GPU:  with a host tier, opens one demote ticket for the needed blocks; whatever the ticket
//         cannot cover (host full, nothing demotable) is freed from GPU leaves; without a host
//         tier, frees GPU leaves.
// Thread safety: plan() takes the evictor's mutex, then the tree's (order evictor -> tree -> pool).
class Evictor {
 public:
  // Watermarks are fractions with 0 <= low <= high <= 1. A negative host watermark means "same
  // as the GPU one". Throws std::invalid_argument naming a bad value.
  Evictor(std::shared_ptr<RadixTree> tree, double gpu_high, double gpu_low, double host_high = -1,
          double host_low = -1);

  // Decides and applies the frees, opens at most one demote ticket. An empty plan when both tiers
  // are under their high watermarks.
  EvictionPlan plan();

  double gpu_high() const { return gpu_high_; }
  double gpu_low() const { return gpu_low_; }
  double host_high() const { return host_high_; }
  double host_low() const { return host_low_; }

 private:
  std::shared_ptr<RadixTree> tree_;
  double gpu_high_, gpu_low_, host_high_, host_low_;
  std::mutex mutex_;
};

}  // namespace pdserve
