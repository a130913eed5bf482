// C++ micro-benchmark of the radix tree without Python: the same kind of trace and per-request
// operations as bench/bench_radix_tree.py (match, lock, evict when short, allocate, insert,
// unlock, decref), timed per operation kind.
//   bench_radix_tree [num_requests=10000] [num_gpu_blocks=16384] [block_size=16] [seed=0]
//                    [repeats=5]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "pdserve/radix_tree.h"

using namespace pdserve;
using Clock = std::chrono::steady_clock;

namespace {

struct Trace {
  std::vector<std::vector<int32_t>> prompts;
};

// Multi-turn conversations (each turn = the whole history plus answer and new message), 70 %
// starting with one of 8 shared system prompts, prompts of 256..4096 tokens, 400 live at a time.
Trace make_trace(int num_requests, uint32_t seed) {
  std::mt19937 rng(seed);
  auto uniform = [&](int lo, int hi) { return lo + static_cast<int>(rng() % (hi - lo + 1)); };
  auto text = [&](int n, std::vector<int32_t>* out) {
    for (int i = 0; i < n; ++i) out->push_back(static_cast<int32_t>(rng() % 32000));
  };
  std::vector<std::vector<int32_t>> system_prompts(8);
  for (auto& s : system_prompts) text(uniform(256, 1024), &s);
  std::vector<std::vector<int32_t>> live;
  Trace trace;
  while (static_cast<int>(trace.prompts.size()) < num_requests) {
    size_t idx;
    if (live.size() < 400 || rng() % 20 == 0) {
      std::vector<int32_t> h;
      if (rng() % 10 < 7) h = system_prompts[rng() % system_prompts.size()];
      text(uniform(64, 512), &h);
      if (h.size() < 256) text(static_cast<int>(256 - h.size()), &h);
      live.push_back(std::move(h));
      idx = live.size() - 1;
    } else {
      idx = rng() % live.size();
      text(uniform(32, 256), &live[idx]);
      text(uniform(32, 384), &live[idx]);
    }
    if (live[idx].size() > 4096) {
      live.erase(live.begin() + static_cast<long>(idx));
      continue;
    }
    trace.prompts.push_back(live[idx]);
  }
  return trace;
}

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

struct Times {
  double match = 0, insert = 0, evict = 0, lock = 0, pool = 0;
  long n_evict = 0, n_insert = 0, hit_tokens = 0, total_tokens = 0;

  Times min_with(const Times& o) const {
    Times m = *this;
    m.match = std::min(match, o.match);
    m.insert = std::min(insert, o.insert);
    m.evict = std::min(evict, o.evict);
    m.lock = std::min(lock, o.lock);
    m.pool = std::min(pool, o.pool);
    return m;
  }
};

// One replay of the trace on a fresh pool and tree, timing each operation kind.
Times replay(const Trace& trace, int num_gpu_blocks, int block_size) {
  auto gpu = std::make_shared<BlockPool>(num_gpu_blocks, Tier::kGpu);
  RadixTree tree(block_size, gpu, nullptr, /*record_events=*/false);
  MatchResult match;
  InsertResult inserted;
  std::vector<BlockId> ids, evicted;
  double t_match = 0, t_insert = 0, t_evict = 0, t_lock = 0, t_pool = 0;
  long n_evict = 0, n_insert = 0, hit_tokens = 0, total_tokens = 0;
  for (const auto& prompt : trace.prompts) {
    const int32_t num_blocks = static_cast<int32_t>(prompt.size()) / block_size;
    total_tokens += static_cast<long>(prompt.size());
    auto t0 = Clock::now();
    tree.match_prefix(prompt.data(), prompt.size(), &match);
    auto t1 = Clock::now();
    LockHandle handle = tree.lock(match.node);
    auto t2 = Clock::now();
    t_match += seconds(t0, t1);
    t_lock += seconds(t1, t2);
    hit_tokens += match.num_tokens;
    const int32_t need = num_blocks - static_cast<int32_t>(match.block_ids.size());
    const int32_t free = gpu->num_free();
    if (need > free) {
      evicted.clear();
      t0 = Clock::now();
      tree.evict(need - free, Tier::kGpu, &evicted);
      t_evict += seconds(t0, Clock::now());
      ++n_evict;
    }
    t0 = Clock::now();
    ids.assign(match.block_ids.begin(), match.block_ids.end());
    const bool ok = gpu->can_allocate(need);
    if (ok) gpu->allocate_into(need, &ids);
    t_pool += seconds(t0, Clock::now());
    if (ok) {
      t0 = Clock::now();
      tree.insert(prompt.data(), prompt.size(), ids.data(), ids.size(), &inserted);
      t_insert += seconds(t0, Clock::now());
      ++n_insert;
    }
    t0 = Clock::now();
    tree.unlock(handle);
    t1 = Clock::now();
    if (ok && need > 0) gpu->decref(ids.data() + match.block_ids.size(), need);
    t_lock += seconds(t0, t1);
    t_pool += seconds(t1, Clock::now());
  }
  tree.check_invariants();
  return Times{t_match, t_insert, t_evict,    t_lock,      t_pool,
               n_evict, n_insert, hit_tokens, total_tokens};
}

}  // namespace

int main(int argc, char** argv) {
  const int num_requests = argc > 1 ? std::atoi(argv[1]) : 10000;
  const int num_gpu_blocks = argc > 2 ? std::atoi(argv[2]) : 16384;
  const int block_size = argc > 3 ? std::atoi(argv[3]) : 16;
  const uint32_t seed = argc > 4 ? static_cast<uint32_t>(std::atoi(argv[4])) : 0;
  const int repeats = argc > 5 ? std::atoi(argv[5]) : 5;
  Trace trace = make_trace(num_requests, seed);

  // The machine may be shared: replay `repeats` times on fresh trees, keep each op's best time.
  Times best;
  for (int r = 0; r < repeats; ++r) {
    Times t = replay(trace, num_gpu_blocks, block_size);
    best = r == 0 ? t : best.min_with(t);
  }
  const double n = static_cast<double>(trace.prompts.size());
  std::printf("trace: %d requests, %.0f tokens/request, prefix hit rate %.1f%%, %ld evict calls\n",
              num_requests, best.total_tokens / n, 100.0 * best.hit_tokens / best.total_tokens,
              best.n_evict);
  std::printf("match  %12.0f ops/s\ninsert %12.0f ops/s\nevict  %12.0f ops/s\n", n / best.match,
              best.n_insert / best.insert, best.n_evict / best.evict);
  std::printf("lock   %12.0f ops/s\npool   %12.0f ops/s\n", 2 * n / best.lock, 2 * n / best.pool);
  const double total = best.match + best.insert + best.evict + best.lock + best.pool;
  std::printf(
      "summary: %d requests in %.3f s of tree/pool time (%.2f us per request, best of %d)\n",
      num_requests, total, 1e6 * total / n, repeats);
  return 0;
}
