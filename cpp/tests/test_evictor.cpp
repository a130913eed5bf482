// Unit tests of the watermark Evictor without Python.
#include <memory>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "pdserve/evictor.h"

using namespace pdserve;

static std::shared_ptr<RadixTree> filled_tree(int32_t num_gpu, int32_t num_host, int32_t prompts) {
  auto gpu = std::make_shared<BlockPool>(num_gpu, Tier::kGpu);
  auto host = num_host > 0 ? std::make_shared<BlockPool>(num_host, Tier::kHost) : nullptr;
  auto tree = std::make_shared<RadixTree>(2, gpu, host);
  for (int32_t i = 0; i < prompts; ++i) {
    std::vector<BlockId> ids = gpu->allocate(1);
    tree->insert(std::vector<int32_t>{i, i}, ids);
    gpu->decref(ids);
  }
  return tree;
}

static void test_frees_without_host() {
  auto tree = filled_tree(10, 0, 9);
  EvictionPlan plan = Evictor(tree, 0.8, 0.5).plan();
  CHECK(!plan.has_demote_ticket);
  CHECK_EQ(plan.freed_gpu_block_ids, (std::vector<BlockId>{0, 1, 2, 3}));
  CHECK(Evictor(tree, 0.8, 0.5).plan().freed_gpu_block_ids.empty());
  tree->check_invariants();
}

static void test_demotes_with_host() {
  auto tree = filled_tree(10, 10, 9);
  Evictor evictor(tree, 0.8, 0.5);
  EvictionPlan plan = evictor.plan();
  CHECK(plan.has_demote_ticket);
  CHECK_EQ(plan.demote_ticket.src_block_ids.size(), 4u);
  CHECK(!evictor.plan().has_demote_ticket);  // pending blocks count as leaving
  tree->commit(plan.demote_ticket.ticket_id, true);
  CHECK_EQ(tree->gpu_pool()->num_free(), 5);
  tree->check_invariants();
}

static void test_bad_watermarks() {
  auto tree = filled_tree(4, 0, 0);
  CHECK_THROWS(Evictor(tree, 0.5, 0.7), std::invalid_argument, "low=0.7");
  CHECK_THROWS(Evictor(tree, 0.9, 0.1, 2.0, 0.1), std::invalid_argument, "HOST");
}

int main() {
  RUN_TEST(test_frees_without_host);
  RUN_TEST(test_demotes_with_host);
  RUN_TEST(test_bad_watermarks);
  return check::exit_code();
}
