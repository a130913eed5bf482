// Unit tests of BlockPool without Python: allocation order, ref counts, reservations, errors and
// the free + cached + in_use == total invariant.
#include <stdexcept>
#include <vector>

#include "check.h"
#include "pdserve/block_pool.h"

using pdserve::BlockId;
using pdserve::BlockPool;
using pdserve::Tier;

static void test_allocate_order_and_reuse() {
  BlockPool pool(6, Tier::kGpu);
  CHECK_EQ(pool.allocate(3), (std::vector<BlockId>{0, 1, 2}));
  pool.decref(std::vector<BlockId>{1});
  CHECK_EQ(pool.allocate(2), (std::vector<BlockId>{1, 3}));
  CHECK_EQ(pool.num_free(), 2);
  CHECK_EQ(pool.num_in_use(), 4);
  pool.check_invariants();
}

static void test_errors_change_nothing() {
  BlockPool pool(4, Tier::kHost);
  std::vector<BlockId> ids = pool.allocate(2);
  CHECK_THROWS(pool.allocate(3), std::invalid_argument, "only 2 free in the HOST pool");
  CHECK_THROWS(pool.decref(std::vector<BlockId>{9}), std::invalid_argument, "unknown block id 9");
  CHECK_THROWS(pool.decref(std::vector<BlockId>{0, 1, 0}), std::invalid_argument,
               "double free of block 0");
  CHECK_EQ(pool.ref_count(0), 1);
  CHECK_EQ(pool.ref_count(1), 1);
  CHECK_EQ(pool.num_free(), 2);
  CHECK_THROWS(pool.incref(std::vector<BlockId>{0, 3}), std::invalid_argument, "block 3");
  CHECK_EQ(pool.ref_count(0), 1);
  pool.check_invariants();
}

static void test_tree_ownership_makes_blocks_cached() {
  BlockPool pool(4, Tier::kGpu);
  std::vector<BlockId> ids = pool.allocate(2);
  pool.adopt(ids.data(), ids.size());
  pool.decref(ids);
  CHECK_EQ(pool.num_cached(), 2);
  CHECK_EQ(pool.num_free(), 2);
  CHECK(pool.all_unreferenced(ids.data(), ids.size()));
  pool.incref(ids);  // cached -> in use (a lock)
  CHECK_EQ(pool.num_in_use(), 2);
  pool.decref(ids);
  pool.disown(ids.data(), ids.size());
  CHECK_EQ(pool.num_free(), 4);
  std::vector<BlockId> twice = pool.allocate(1);
  twice.push_back(twice[0]);
  CHECK_THROWS(pool.adopt(twice.data(), twice.size()), std::invalid_argument, "appears twice");
  CHECK(!pool.is_owned(twice[0]));
  pool.check_invariants();
}

static void test_reservations() {
  BlockPool pool(5, Tier::kGpu);
  CHECK_EQ(pool.reserve("r1", 2).size(), 2u);
  CHECK_EQ(pool.reserve("r1", 1).size(), 1u);
  CHECK_EQ(pool.num_reserved(), 3);
  CHECK_THROWS(pool.decref(pool.reserved_blocks("r1")), std::invalid_argument, "reservation");
  CHECK_EQ(pool.release_reservation("r1"), 3);
  CHECK_EQ(pool.release_reservation("r1"), 0);
  pool.reserve("r2", 2);
  std::vector<BlockId> taken = pool.transfer_reservation("r2");
  CHECK_EQ(pool.num_reserved(), 0);
  CHECK_EQ(pool.num_in_use(), 2);
  pool.decref(taken);
  CHECK_THROWS(pool.transfer_reservation("r2"), std::invalid_argument, "'r2'");
  CHECK_EQ(pool.num_free(), 5);
  pool.check_invariants();
}

int main() {
  RUN_TEST(test_allocate_order_and_reuse);
  RUN_TEST(test_errors_change_nothing);
  RUN_TEST(test_tree_ownership_makes_blocks_cached);
  RUN_TEST(test_reservations);
  return check::exit_code();
}
