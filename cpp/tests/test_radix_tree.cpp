// Unit tests of RadixTree without Python: match/insert/split, LRU eviction order, locks, tickets,
// events, and a randomized stress run that checks every invariant after each operation.
#include <memory>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "pdserve/block_hash.h"
#include "pdserve/radix_tree.h"

using namespace pdserve;

namespace {

constexpr int32_t kBs = 4;

std::vector<int32_t> repeat(int32_t value, size_t n) { return std::vector<int32_t>(n, value); }

// Inserts tokens with freshly allocated blocks, then drops the caller's references.
std::vector<BlockId> put(RadixTree& tree, const std::vector<int32_t>& tokens) {
  std::vector<BlockId> ids = tree.gpu_pool()->allocate(static_cast<int32_t>(tokens.size() / kBs));
  InsertResult r = tree.insert(tokens, ids);
  tree.gpu_pool()->decref(ids);
  return r.adopted_block_ids;
}

}  // namespace

static void test_match_insert_split() {
  auto gpu = std::make_shared<BlockPool>(16, Tier::kGpu);
  RadixTree tree(kBs, gpu);
  std::vector<int32_t> tokens = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
  CHECK_EQ(put(tree, tokens), (std::vector<BlockId>{0, 1, 2}));
  MatchResult m = tree.match_prefix(tokens);
  CHECK_EQ(m.num_tokens, 12);
  CHECK_EQ(m.block_ids, (std::vector<BlockId>{0, 1, 2}));
  std::vector<int32_t> other = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0};
  m = tree.match_prefix(other);  // ends inside the node: split
  CHECK_EQ(m.num_tokens, 8);
  CHECK_EQ(tree.num_nodes(), 2);
  std::vector<BlockId> ids = gpu->allocate(3);
  InsertResult r = tree.insert(other, ids);
  CHECK_EQ(r.num_adopted, 1);
  CHECK_EQ(r.duplicate_block_ids, (std::vector<BlockId>{ids[0], ids[1]}));
  gpu->decref(ids);
  CHECK_THROWS(tree.insert(other, std::vector<BlockId>{0}), std::invalid_argument, "expected 3");
  tree.check_invariants();
}

static void test_lru_order_locks_and_referenced_blocks() {
  auto gpu = std::make_shared<BlockPool>(16, Tier::kGpu);
  RadixTree tree(kBs, gpu);
  std::vector<BlockId> a = put(tree, repeat(1, 8));
  std::vector<BlockId> b = put(tree, repeat(2, 8));
  std::vector<BlockId> c = put(tree, repeat(3, 8));
  tree.match_prefix(repeat(1, 8));
  LockHandle h = tree.lock(tree.match_prefix(repeat(3, 8)).node);
  CHECK_EQ(tree.evict(1, Tier::kGpu), b);  // c locked, a recently used
  CHECK_EQ(tree.evict(10, Tier::kGpu), a);
  tree.unlock(h);
  CHECK_THROWS(tree.unlock(h), std::invalid_argument, "already released");
  gpu->incref(c);  // referenced outside the tree: skipped
  CHECK(tree.evict(10, Tier::kGpu).empty());
  gpu->decref(c);
  CHECK_EQ(tree.evict(10, Tier::kGpu), c);
  CHECK_EQ(gpu->num_free(), 16);
  tree.check_invariants();
}

static void test_tickets_and_events() {
  auto gpu = std::make_shared<BlockPool>(8, Tier::kGpu);
  auto host = std::make_shared<BlockPool>(8, Tier::kHost);
  RadixTree tree(kBs, gpu, host);
  std::vector<int32_t> tokens = repeat(7, 8);
  put(tree, tokens);
  Ticket t = tree.begin_demote(2);
  CHECK_EQ(t.src_block_ids, (std::vector<BlockId>{0, 1}));
  CHECK_EQ(tree.num_pending_demote_blocks(), 2);
  tree.commit(t.ticket_id, false);  // failed copy: as before
  CHECK_EQ(host->num_free(), 8);
  CHECK_EQ(tree.match_prefix(tokens).tiers, (std::vector<Tier>{Tier::kGpu, Tier::kGpu}));
  t = tree.begin_demote(2);
  tree.commit(t.ticket_id, true);
  MatchResult m = tree.match_prefix(tokens);
  CHECK_EQ(m.tiers, (std::vector<Tier>{Tier::kHost, Tier::kHost}));
  LockHandle h = tree.lock(m.node);
  Ticket p = tree.begin_promote(m.node);
  CHECK_EQ(p.src_block_ids, m.block_ids);
  tree.commit(p.ticket_id, true);  // a locked node keeps its lock across the tier switch
  CHECK_EQ(gpu->num_in_use(), 2);
  tree.unlock(h);
  CHECK_EQ(gpu->num_cached(), 2);
  CHECK_THROWS(tree.commit(p.ticket_id, true), std::invalid_argument, "ticket");
  std::vector<CacheEvent> events = tree.drain_events();
  CHECK_EQ(events.size(), 3u);
  std::vector<uint64_t> hashes;
  hash_blocks(tokens.data(), tokens.size(), kBs, 0, &hashes);
  CHECK_EQ(events[0].kind, CacheEventKind::kInserted);
  CHECK_EQ(events[0].block_hashes, hashes);
  CHECK_EQ(events[1].kind, CacheEventKind::kDemoted);
  CHECK_EQ(events[2].kind, CacheEventKind::kPromoted);
  CHECK(tree.drain_events().empty());
  tree.check_invariants();
}

static void test_random_operations_keep_invariants() {
  auto gpu = std::make_shared<BlockPool>(64, Tier::kGpu);
  auto host = std::make_shared<BlockPool>(32, Tier::kHost);
  RadixTree tree(2, gpu, host);
  std::mt19937 rng(7);
  std::vector<LockHandle> locks;
  std::vector<TicketId> tickets;
  for (int step = 0; step < 3000; ++step) {
    std::vector<int32_t> tokens(rng() % 24);
    for (auto& t : tokens) t = static_cast<int32_t>(rng() % 3);
    switch (rng() % 7) {
      case 0: {
        int32_t n = static_cast<int32_t>(tokens.size() / 2);
        if (!gpu->can_allocate(n)) break;
        std::vector<BlockId> ids = gpu->allocate(n);
        tree.insert(tokens, ids);
        gpu->decref(ids);
        break;
      }
      case 1:
        locks.push_back(tree.lock(tree.match_prefix(tokens).node));
        break;
      case 2:
        if (!locks.empty()) {
          tree.unlock(locks.back());
          locks.pop_back();
        }
        break;
      case 3:
        tree.evict(static_cast<int32_t>(rng() % 8), rng() % 2 ? Tier::kGpu : Tier::kHost);
        break;
      case 4:
        tickets.push_back(tree.begin_demote(static_cast<int32_t>(rng() % 8)).ticket_id);
        break;
      case 5:
        try {
          tickets.push_back(tree.begin_promote(tree.match_prefix(tokens).node).ticket_id);
        } catch (const std::invalid_argument&) {
          // not enough GPU blocks: nothing taken
        }
        break;
      default:
        if (!tickets.empty()) {
          tree.commit(tickets.back(), rng() % 3 != 0);
          tickets.pop_back();
        }
    }
    tree.check_invariants();
  }
  for (LockHandle h : locks) tree.unlock(h);
  for (TicketId t : tickets) tree.commit(t, true);
  // Tiers may interleave along a path, so alternate until both are empty.
  for (int round = 0; round < 64 && tree.num_nodes() > 0; ++round) {
    tree.evict(1 << 20, Tier::kGpu);
    tree.evict(1 << 20, Tier::kHost);
  }
  CHECK_EQ(tree.num_nodes(), 0);
  CHECK_EQ(gpu->num_free(), 64);
  CHECK_EQ(host->num_free(), 32);
  tree.check_invariants();
}

int main() {
  RUN_TEST(test_match_insert_split);
  RUN_TEST(test_lru_order_locks_and_referenced_blocks);
  RUN_TEST(test_tickets_and_events);
  RUN_TEST(test_random_operations_keep_invariants);
  return check::exit_code();
}
