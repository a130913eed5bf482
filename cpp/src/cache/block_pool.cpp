// BlockPool implementation: per-block state vector plus a free stack; counters are maintained
// incrementally and recomputed from scratch by check_invariants().
#include "pdserve/block_pool.h"

#include <sstream>
#include <stdexcept>

namespace pdserve {

const char* tier_name(Tier tier) { return tier == Tier::kGpu ? "GPU" : "HOST"; }

namespace {
std::string pool_name(Tier tier) { return std::string(tier_name(tier)) + " pool"; }
}  // namespace

BlockPool::BlockPool(int32_t num_blocks, Tier tier) : tier_(tier), num_total_(num_blocks) {
  if (num_blocks < 0) {
    throw std::invalid_argument("num_blocks must be >= 0, got " + std::to_string(num_blocks));
  }
  blocks_.resize(num_blocks);
  free_stack_.reserve(num_blocks);
  for (int32_t id = num_blocks - 1; id >= 0; --id) free_stack_.push_back(id);
}

int32_t BlockPool::num_free() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return static_cast<int32_t>(free_stack_.size());
}
int32_t BlockPool::num_cached() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_cached_;
}
int32_t BlockPool::num_in_use() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_in_use_;
}
int32_t BlockPool::num_reserved() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_reserved_;
}

void BlockPool::throw_unknown_id(BlockId block_id, const char* what) const {
  std::ostringstream msg;
  msg << what << ": unknown block id " << block_id << " (" << pool_name(tier_) << " has ids 0.."
      << num_total_ - 1 << ")";
  throw std::invalid_argument(msg.str());
}

bool BlockPool::can_allocate(int32_t num_blocks) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return num_blocks >= 0 && static_cast<size_t>(num_blocks) <= free_stack_.size();
}

void BlockPool::check_can_allocate_locked(int32_t num_blocks) const {
  if (num_blocks < 0) {
    throw std::invalid_argument("cannot allocate a negative number of blocks: " +
                                std::to_string(num_blocks));
  }
  if (static_cast<size_t>(num_blocks) > free_stack_.size()) {
    std::ostringstream msg;
    msg << "cannot allocate " << num_blocks << " blocks: only " << free_stack_.size()
        << " free in the " << pool_name(tier_) << " (" << num_cached_ << " cached, " << num_in_use_
        << " in use, " << num_total_ << " total); evict first or check can_allocate()";
    throw std::invalid_argument(msg.str());
  }
}

void BlockPool::allocate_locked(int32_t num_blocks, std::vector<BlockId>* out) {
  // Pops the top num_blocks ids in stack order (last pushed first) in one copy; the caller has
  // checked that there are enough.
  const size_t n = static_cast<size_t>(num_blocks);
  const size_t first = out->size();
  out->resize(first + n);
  BlockId* dst = out->data() + first;
  const BlockId* top = free_stack_.data() + free_stack_.size();
  BlockState* blocks = blocks_.data();
  for (size_t i = 0; i < n; ++i) {
    const BlockId id = top[-1 - static_cast<ptrdiff_t>(i)];
    blocks[id].ref_count = 1;
    dst[i] = id;
  }
  free_stack_.resize(free_stack_.size() - n);
  num_in_use_ += num_blocks;
}

std::vector<BlockId> BlockPool::allocate(int32_t num_blocks) {
  std::vector<BlockId> out;
  allocate_into(num_blocks, &out);
  return out;
}

void BlockPool::allocate_into(int32_t num_blocks, std::vector<BlockId>* out) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_can_allocate_locked(num_blocks);
  out->reserve(out->size() + num_blocks);
  allocate_locked(num_blocks, out);
}

void BlockPool::incref(const BlockId* block_ids, size_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Local copies of the pointer, bound and counters: stores to ref_count (int32) could otherwise
  // alias the int32 members and force reloads on every block.
  BlockState* blocks = blocks_.data();
  const uint32_t total = static_cast<uint32_t>(num_total_);
  for (size_t i = 0; i < num_blocks; ++i) {
    const BlockId id = block_ids[i];
    if (static_cast<uint32_t>(id) >= total) throw_unknown_id(id, "incref");
    const BlockState& b = blocks[id];
    if (b.ref_count == 0 && !b.owned) {
      throw std::invalid_argument("incref: block " + std::to_string(id) + " of the " +
                                  pool_name(tier_) + " is free (allocate it first)");
    }
  }
  int32_t revived = 0;  // cached -> in_use
  for (size_t i = 0; i < num_blocks; ++i) {
    BlockState& b = blocks[block_ids[i]];
    revived += b.ref_count == 0;
    ++b.ref_count;
  }
  num_cached_ -= revived;
  num_in_use_ += revived;
}

void BlockPool::decref_one_locked(BlockId id) {
  BlockState& b = blocks_[id];
  if (--b.ref_count == 0) {
    --num_in_use_;
    if (b.owned) {
      ++num_cached_;
    } else {
      free_stack_.push_back(id);
    }
  }
}

void BlockPool::decref(const BlockId* block_ids, size_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Apply one by one and undo on the first bad entry, so that a repeated id is checked against
  // the count left by its earlier occurrences without a side table (no allocation per call).
  // The fast loop keeps the counters in locals (see incref) and stops at the first bad entry.
  BlockState* blocks = blocks_.data();
  const uint32_t total = static_cast<uint32_t>(num_total_);
  int32_t dropped = 0, cached = 0;
  size_t bad = num_blocks;
  for (size_t i = 0; i < num_blocks; ++i) {
    const BlockId id = block_ids[i];
    if (static_cast<uint32_t>(id) >= total) {
      bad = i;
      break;
    }
    BlockState& b = blocks[id];
    const int32_t rc = b.ref_count;
    if (rc <= 1 && (rc == 0 || b.reserved)) {
      bad = i;
      break;
    }
    b.ref_count = rc - 1;
    if (rc == 1) {
      ++dropped;
      if (b.owned) {
        ++cached;
      } else {
        free_stack_.push_back(id);
      }
    }
  }
  num_in_use_ -= dropped;
  num_cached_ += cached;
  if (bad == num_blocks) return;
  // block_ids[bad] is bad: undo the applied prefix in reverse (so pushed free blocks pop off the
  // top), then report it.
  const BlockId id = block_ids[bad];
  const bool unknown = static_cast<uint32_t>(id) >= total;
  const bool double_free = !unknown && blocks[id].ref_count == 0;
  for (size_t j = bad; j-- > 0;) {
    BlockState& b = blocks[block_ids[j]];
    if (b.ref_count == 0) {
      if (b.owned) {
        --num_cached_;
      } else {
        free_stack_.pop_back();
      }
      ++num_in_use_;
    }
    ++b.ref_count;
  }
  check_id_locked(id, "decref");
  if (double_free) {
    throw std::invalid_argument("decref: double free of block " + std::to_string(id) + " in the " +
                                pool_name(tier_) + " (ref_count is already 0)");
  }
  throw std::invalid_argument("decref: block " + std::to_string(id) + " of the " +
                              pool_name(tier_) +
                              " is held by a reservation; use release_reservation()");
}

int32_t BlockPool::ref_count(BlockId block_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_id_locked(block_id, "ref_count");
  return blocks_[block_id].ref_count;
}

bool BlockPool::is_owned(BlockId block_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  check_id_locked(block_id, "is_owned");
  return blocks_[block_id].owned;
}

std::vector<BlockId> BlockPool::reserve(const std::string& request_id, int32_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_can_allocate_locked(num_blocks);
  std::vector<BlockId> out;
  out.reserve(num_blocks);
  allocate_locked(num_blocks, &out);
  std::vector<BlockId>& held = reservations_[request_id];
  for (BlockId id : out) {
    blocks_[id].reserved = true;
    held.push_back(id);
  }
  num_reserved_ += num_blocks;
  return out;
}

std::vector<BlockId> BlockPool::reserved_blocks(const std::string& request_id) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.find(request_id);
  return it == reservations_.end() ? std::vector<BlockId>{} : it->second;
}

int32_t BlockPool::release_reservation(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.find(request_id);
  if (it == reservations_.end()) return 0;
  std::vector<BlockId> held = std::move(it->second);
  reservations_.erase(it);
  for (BlockId id : held) {
    blocks_[id].reserved = false;
    decref_one_locked(id);
  }
  num_reserved_ -= static_cast<int32_t>(held.size());
  return static_cast<int32_t>(held.size());
}

std::vector<BlockId> BlockPool::transfer_reservation(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = reservations_.find(request_id);
  if (it == reservations_.end()) {
    throw std::invalid_argument("transfer_reservation: no reservation for request id '" +
                                request_id + "' in the " + pool_name(tier_));
  }
  std::vector<BlockId> held = std::move(it->second);
  reservations_.erase(it);
  for (BlockId id : held) blocks_[id].reserved = false;
  num_reserved_ -= static_cast<int32_t>(held.size());
  return held;
}

void BlockPool::adopt(const BlockId* block_ids, size_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  BlockState* blocks = blocks_.data();
  const uint32_t total = static_cast<uint32_t>(num_total_);
  for (size_t i = 0; i < num_blocks; ++i) {
    const BlockId id = block_ids[i];
    if (static_cast<uint32_t>(id) >= total) throw_unknown_id(id, "insert");
    const BlockState& b = blocks[id];
    if (b.owned) {
      throw std::invalid_argument("insert: block " + std::to_string(id) + " of the " +
                                  pool_name(tier_) +
                                  " is already owned by the radix tree at another position");
    }
    if (b.ref_count == 0) {
      throw std::invalid_argument("insert: block " + std::to_string(id) + " of the " +
                                  pool_name(tier_) + " is free (the caller must hold a reference)");
    }
  }
  for (size_t i = 0; i < num_blocks; ++i) {
    BlockState& b = blocks[block_ids[i]];
    if (b.owned) {  // repeated id: undo this call's marks, then report
      for (size_t j = 0; j < i; ++j) blocks[block_ids[j]].owned = false;
      throw std::invalid_argument("insert: block " + std::to_string(block_ids[i]) +
                                  " appears twice in block_ids");
    }
    b.owned = true;
  }
}

void BlockPool::disown(const BlockId* block_ids, size_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < num_blocks; ++i) {
    BlockId id = block_ids[i];
    check_id_locked(id, "disown");
    if (!blocks_[id].owned) {
      throw std::runtime_error("disown: block " + std::to_string(id) + " of the " +
                               pool_name(tier_) + " is not owned by the radix tree");
    }
  }
  for (size_t i = 0; i < num_blocks; ++i) {
    BlockId id = block_ids[i];
    BlockState& b = blocks_[id];
    b.owned = false;
    if (b.ref_count == 0) {
      --num_cached_;
      free_stack_.push_back(id);
    }
  }
}

bool BlockPool::all_unreferenced(const BlockId* block_ids, size_t num_blocks) const {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < num_blocks; ++i) {
    if (blocks_[block_ids[i]].ref_count != 0) return false;
  }
  return true;
}

bool BlockPool::disown_if_unreferenced(const BlockId* block_ids, size_t num_blocks) {
  std::lock_guard<std::mutex> lock(mutex_);
  BlockState* blocks = blocks_.data();
  const uint32_t total = static_cast<uint32_t>(num_total_);
  for (size_t i = 0; i < num_blocks; ++i) {
    if (static_cast<uint32_t>(block_ids[i]) >= total) throw_unknown_id(block_ids[i], "disown");
    const BlockState& b = blocks[block_ids[i]];
    if (b.ref_count != 0) return false;
    if (!b.owned) {
      throw std::runtime_error("disown: block " + std::to_string(block_ids[i]) + " of the " +
                               pool_name(tier_) + " is not owned by the radix tree");
    }
  }
  for (size_t i = 0; i < num_blocks; ++i) blocks[block_ids[i]].owned = false;
  free_stack_.insert(free_stack_.end(), block_ids, block_ids + num_blocks);
  num_cached_ -= static_cast<int32_t>(num_blocks);
  return true;
}

void BlockPool::check_invariants() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int32_t free = 0, cached = 0, in_use = 0, reserved = 0;
  std::vector<char> on_free_list(num_total_, 0);
  for (BlockId id : free_stack_) {
    if (id < 0 || id >= num_total_ || on_free_list[id]) {
      throw std::runtime_error("check_invariants: free list of the " + pool_name(tier_) +
                               " holds block " + std::to_string(id) + " twice or out of range");
    }
    on_free_list[id] = 1;
  }
  for (BlockId id = 0; id < num_total_; ++id) {
    const BlockState& b = blocks_[id];
    if (b.ref_count < 0) {
      throw std::runtime_error("check_invariants: block " + std::to_string(id) + " has ref_count " +
                               std::to_string(b.ref_count));
    }
    bool should_be_free = b.ref_count == 0 && !b.owned;
    if (should_be_free != static_cast<bool>(on_free_list[id])) {
      throw std::runtime_error("check_invariants: block " + std::to_string(id) + " of the " +
                               pool_name(tier_) + " has ref_count " + std::to_string(b.ref_count) +
                               ", owned " + std::to_string(b.owned) + " but on_free_list " +
                               std::to_string(on_free_list[id]));
    }
    if (b.ref_count > 0) {
      ++in_use;
    } else if (b.owned) {
      ++cached;
    } else {
      ++free;
    }
    if (b.reserved) ++reserved;
  }
  size_t reserved_listed = 0;
  for (const auto& kv : reservations_) reserved_listed += kv.second.size();
  if (free + cached + in_use != num_total_ || free != static_cast<int32_t>(free_stack_.size()) ||
      cached != num_cached_ || in_use != num_in_use_ || reserved != num_reserved_ ||
      static_cast<int32_t>(reserved_listed) != num_reserved_) {
    std::ostringstream msg;
    msg << "check_invariants failed for the " << pool_name(tier_) << ": free " << free
        << " + cached " << cached << " + in_use " << in_use << " = " << free + cached + in_use
        << " (total " << num_total_ << "); counters say free " << free_stack_.size() << ", cached "
        << num_cached_ << ", in_use " << num_in_use_ << ", reserved " << num_reserved_ << " (flags "
        << reserved << ", listed " << reserved_listed << ")";
    throw std::runtime_error(msg.str());
  }
}

}  // namespace pdserve
