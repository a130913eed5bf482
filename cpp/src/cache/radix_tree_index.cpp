// Hash indexes of the radix tree (internal): ChildIndex (a node's children by first-block key)
// and IdMap (node and lock handles to nodes), both open addressing with linear probing.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "radix_tree_impl.h"

namespace pdserve {
namespace {

// Slots of an open-addressing table holding `capacity`: the power of two >= max(16, capacity), and
// its log2 (the hash shift is 64 - bits).
struct TableGeometry {
  size_t cap;
  int bits;
};

TableGeometry table_geometry(size_t capacity) {
  TableGeometry g{16, 4};
  while (g.cap < capacity) {
    g.cap <<= 1;
    ++g.bits;
  }
  return g;
}

}  // namespace

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

void detail::IdMap::insert(uint64_t key, Node* node) {
  if ((used_ + 1) * 2 > slots_.size()) rehash(std::max<size_t>(16, (size_ + 1) * 4));
  size_t i = home(key);
  while (slots_[i].state == kLive) i = (i + 1) & mask_;
  if (slots_[i].state == kEmpty) ++used_;
  slots_[i] = Slot{key, node, kLive};
  ++size_;
}

Node* detail::IdMap::take(uint64_t key) {
  if (slots_.empty()) return nullptr;
  for (size_t i = home(key);; i = (i + 1) & mask_) {
    Slot& s = slots_[i];
    if (s.state == kEmpty) return nullptr;
    if (s.state == kLive && s.key == key) {
      s.state = kErased;
      --size_;
      return s.node;
    }
  }
}

void detail::IdMap::clear() {
  slots_.clear();
  mask_ = 0;
  shift_ = 64;
  size_ = 0;
  used_ = 0;
}

void detail::IdMap::rehash(size_t capacity) {
  const auto [cap, bits] = table_geometry(capacity);
  std::vector<Slot> old;
  old.swap(slots_);
  slots_.assign(cap, Slot{});
  mask_ = cap - 1;
  shift_ = 64 - bits;
  size_ = 0;
  used_ = 0;
  for (const Slot& s : old) {
    if (s.state == kLive) insert(s.key, s.node);
  }
}

void detail::ChildIndex::rehash(size_t capacity) {
  const auto [cap, bits] = table_geometry(capacity);
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

}  // namespace pdserve
