// Evictor implementation: watermark arithmetic in whole blocks, then calls into the tree.
#include "pdserve/evictor.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace pdserve {
namespace {

void check_watermarks(const char* tier, double high, double low) {
  if (!(low >= 0.0 && low <= high && high <= 1.0)) {
    throw std::invalid_argument(std::string("Evictor: ") + tier + " watermarks must satisfy 0 <= " +
                                "low <= high <= 1, got high=" + std::to_string(high) +
                                " low=" + std::to_string(low));
  }
}

// Blocks to release so that `used` drops to floor(low * total), or 0 when used <= high * total.
int32_t blocks_over(int32_t used, int32_t total, double high, double low) {
  if (total == 0 || static_cast<double>(used) <= high * total) return 0;
  int32_t target = static_cast<int32_t>(std::floor(low * total));
  return used > target ? used - target : 0;
}

}  // namespace

Evictor::Evictor(std::shared_ptr<RadixTree> tree, double gpu_high, double gpu_low, double host_high,
                 double host_low)
    : tree_(std::move(tree)),
      gpu_high_(gpu_high),
      gpu_low_(gpu_low),
      host_high_(host_high < 0 ? gpu_high : host_high),
      host_low_(host_low < 0 ? gpu_low : host_low) {
  if (!tree_) throw std::invalid_argument("Evictor: tree must not be null");
  check_watermarks("GPU", gpu_high_, gpu_low_);
  check_watermarks("HOST", host_high_, host_low_);
}

EvictionPlan Evictor::plan() {
  std::lock_guard<std::mutex> lock(mutex_);
  EvictionPlan plan;
  const std::shared_ptr<BlockPool>& host = tree_->host_pool();
  if (host) {
    int32_t need =
        blocks_over(host->num_total() - host->num_free(), host->num_total(), host_high_, host_low_);
    if (need > 0) tree_->evict(need, Tier::kHost, &plan.freed_host_block_ids);
  }
  const std::shared_ptr<BlockPool>& gpu = tree_->gpu_pool();
  int32_t used = gpu->num_total() - gpu->num_free() - tree_->num_pending_demote_blocks();
  int32_t need = blocks_over(used, gpu->num_total(), gpu_high_, gpu_low_);
  if (need <= 0) return plan;
  if (host) {
    Ticket ticket = tree_->begin_demote(need);
    int32_t covered = static_cast<int32_t>(ticket.src_block_ids.size());
    if (covered > 0) {
      plan.has_demote_ticket = true;
      plan.demote_ticket = std::move(ticket);
    } else {
      tree_->commit(ticket.ticket_id, false);  // nothing to copy: close it here
    }
    need -= covered;
  }
  if (need > 0) tree_->evict(need, Tier::kGpu, &plan.freed_gpu_block_ids);
  return plan;
}

}  // namespace pdserve
