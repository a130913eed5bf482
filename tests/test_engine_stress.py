"""Random interleavings of add, abort and step on a cache too small for the load (preemption, chunked
prefill, radix caching and eviction all at once): the pool invariant holds after every step, nothing
leaks, and every request that completes has exactly the tokens it gets when run alone."""

from __future__ import annotations

import random

import pytest
from pdserve import SamplingParams
from pdserve.engine import LLMEngine
from tiny_models import make_tiny_llama

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("stress")), num_kv_heads=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_add_abort_step(ckpt, seed):
    rng = random.Random(seed)
    shared = [256] + [rng.randrange(250) for _ in range(24)]  # a common prefix: radix hits
    prompts = {
        f"r{i}": (shared[: rng.randrange(1, 25)] if rng.random() < 0.6 else [256])
        + [rng.randrange(250) for _ in range(rng.randrange(1, 30))]
        for i in range(14)
    }
    engine = LLMEngine(
        model=ckpt,
        device="cpu",
        num_kv_blocks=18,
        block_size=4,
        max_num_seqs=5,
        max_num_batched_tokens=24,
        enable_radix_caching=True,
        enable_radix_evictor=seed == 1,  # the watermark evictor on top of on-demand eviction
        evictor_high_watermark=0.8,
        evictor_low_watermark=0.5,
        enable_host_tier=seed == 0,  # demote to / promote from a host tier instead of dropping
        num_host_kv_blocks=8,
    )
    pending = list(prompts)
    live: set[str] = set()
    got: dict[str, list[int]] = {}
    done: set[str] = set()
    while pending or live:
        action = rng.random()
        if pending and action < 0.35:
            rid = pending.pop(0)
            engine.add_request(rid, prompts[rid], PARAMS)
            live.add(rid)
        elif live and action < 0.42:
            rid = rng.choice(sorted(live))
            assert engine.abort_request(rid)
            live.discard(rid)
        else:
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
                if out.finished:
                    live.discard(out.request_id)
                    done.add(out.request_id)
        engine.check_invariants()
    stats = engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_reserved_blocks == 0
    assert done and stats.num_preemptions > 0 and stats.num_hit_tokens > 0
    assert stats.num_demoted_blocks > 0 if seed == 0 else stats.num_evicted_blocks > 0
    solo = LLMEngine(model=ckpt, device="cpu", num_kv_blocks=64)
    for rid in sorted(done):
        solo.add_request(rid, prompts[rid], PARAMS)
        tokens = []
        while solo.has_unfinished():
            tokens += [t for o in solo.step() for t in o.new_token_ids]
        assert got[rid] == tokens, rid
