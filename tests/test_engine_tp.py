"""Tensor parallelism on the CPU (gloo, one spawned worker per rank beyond rank 0): TP=2 greedy outputs
equal TP=1 and transformers (MHA, GQA, replicated KV heads) under mixed batches, chunked prefill,
prefix-cache hits and the host tier; prefill-only on a TP=2 engine, KV sent rank i -> rank i through
kv_layouts() addresses, then decode-only on another TP=2 engine equals colocated; bad sizes fail
before any process starts; a dead worker is a clear error; nothing leaks."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time

import pytest
import torch
from pdserve import LLM, SamplingParams
from pdserve.engine import LLMEngine, RequestMode
from pdserve.engine.distributed import WorkerFailure
from tiny_models import assert_greedy_equal, hf_greedy, load_hf_model, make_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_k=40, seed=7, max_tokens=12, ignore_eos=True)
# 4 query heads: MHA, GQA with 2 kv heads (one per rank), GQA with 1 kv head (replicated on both ranks)
VARIANTS = {
    "mha": dict(num_kv_heads=4),
    "gqa": dict(num_kv_heads=2),
    "gqa-kv1": dict(num_kv_heads=1),
}
PROMPT = [256] + [(5 * i + 1) % 250 for i in range(45)]  # 46 tokens: 2 whole blocks of 16 + 14


@pytest.fixture(autouse=True)
def _one_thread_per_worker(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned workers (2 shared cores)


def _prompts() -> list[list[int]]:
    return [[256] + [(7 * i + 3) % 250 for i in range(n)] for n in (3, 15, 40, 71)]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_llama(str(tmp_path_factory.mktemp(request.param)), **VARIANTS[request.param])
    return path, load_hf_model(path), VARIANTS[request.param]["num_kv_heads"]


def _assert_clean(engine: LLMEngine) -> None:
    engine.check_invariants()
    stats = engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_reserved_blocks == 0, stats


def _assert_stopped(engine: LLMEngine) -> None:
    pids = engine.runner.worker_pids
    engine.shutdown()
    assert multiprocessing.active_children() == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_tp2_equals_tp1_and_transformers(checkpoint):
    path, hf, num_kv_heads = checkpoint
    kw = dict(device="cpu", num_kv_blocks=64, block_size=8, max_num_batched_tokens=40)
    tp1 = LLM(path, **kw, enable_radix_caching=True).generate(_prompts(), GREEDY)
    llm = LLM(path, **kw, enable_radix_caching=True, tensor_parallel_size=2)
    layouts = llm.engine.kv_layouts()
    assert len(layouts) == 2 and len({lay.base_addr for lay in layouts}) == 2
    caches = llm.engine.kv_caches()
    assert [c.data_ptr() for c in caches] == [lay.base_addr for lay in layouts]
    shard_heads = max(1, num_kv_heads // 2)
    for lay, cache in zip(layouts, caches, strict=True):  # cache: [L, B, 2, block_size, heads, dim]
        assert cache.shape[-2] == shard_heads
        piece_nbytes = 2 * kw["block_size"] * shard_heads * cache.shape[-1] * cache.element_size()
        assert lay.piece_nbytes == piece_nbytes
    first = llm.generate(_prompts(), GREEDY)  # mixed lengths, chunked (40-token budget)
    second = llm.generate(_prompts(), GREEDY)  # whole blocks come from the radix tree
    assert [o.token_ids for o in first] == [o.token_ids for o in tp1]
    assert [o.token_ids for o in second] == [o.token_ids for o in tp1]
    assert second[3].num_cached_tokens == 64
    for prompt, out in zip(_prompts(), first, strict=True):
        assert_greedy_equal(hf, prompt, out.token_ids, hf_greedy(hf, prompt, GREEDY.max_tokens))
    # sampling happens on rank 0 only, with the same per-request generator as one rank
    seeded = llm.generate(_prompts()[:2], SEEDED)
    one_rank = LLM(path, **kw)
    ref = one_rank.generate(_prompts()[:2], SEEDED)
    assert [o.token_ids for o in seeded] == [o.token_ids for o in ref]
    # log-probabilities, penalties, a logit bias and allowed ids, from rank 0's gathered logits, as on
    # one rank
    asked = SamplingParams(
        temperature=0.0,
        max_tokens=6,
        ignore_eos=True,
        logprobs=2,
        frequency_penalty=1.0,
        logit_bias={7: 3.0, 11: -100.0},
    )
    only = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, allowed_token_ids=[5, 9, 40]
    )
    for got_one, want_one in zip(
        llm.generate(_prompts()[:2], only), one_rank.generate(_prompts()[:2], only), strict=True
    ):
        assert got_one.token_ids == want_one.token_ids and set(got_one.token_ids) <= {5, 9, 40}
    # prompt log-probabilities: every rank makes the prompt rows' logits (the gather is collective)
    prompt_lp = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    for got_one, want_one in zip(
        llm.generate(_prompts()[:2], prompt_lp),
        one_rank.generate(_prompts()[:2], prompt_lp),
        strict=True,
    ):
        assert got_one.token_ids == want_one.token_ids
        assert got_one.prompt_logprobs[0] is None and want_one.prompt_logprobs[0] is None
        assert [e.logprob for e in got_one.prompt_logprobs[1:]] == pytest.approx(
            [e.logprob for e in want_one.prompt_logprobs[1:]], abs=1e-4
        )
    got, want = llm.generate(_prompts()[:2], asked), one_rank.generate(_prompts()[:2], asked)
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert [e.logprob for e in g.logprobs] == pytest.approx(
            [e.logprob for e in w.logprobs], abs=1e-4
        )
    _assert_clean(llm.engine)
    _assert_stopped(llm.engine)


def test_control_group_objects_small_and_large():
    """broadcast_object / gather_objects between two ranks (threads of this process, gloo)."""
    import threading

    import torch.distributed as dist
    from pdserve.engine import distributed

    store = dist.HashStore()
    groups = [None, None]

    def join(rank):
        groups[rank] = distributed.init_group(store, rank, 2, torch.device("cpu"))

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    small, large = ("execute", [1, 2, 3]), list(range(100_000))  # one message; head + rest
    got = [[], []]

    def exchange(rank):
        g = groups[rank]
        for obj in (small, large):
            got[rank].append(g.broadcast_object(obj if rank == 0 else None))
        got[rank].append(g.gather_objects({"rank": rank, "pad": "x" * (70_000 * rank)}))
        got[rank].append(g.min_int(10 - rank))

    threads = [threading.Thread(target=exchange, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert got[1][:2] == [small, large]
    assert [o["rank"] for o in got[0][2]] == [0, 1] and got[1][2] is None
    assert got[0][3] == got[1][3] == 9
    for g in groups:
        g.shutdown()


def _copy_blocks(src: LLMEngine, dst: LLMEngine, layer_idx: int, src_ids, dst_ids) -> None:
    """What the transfer engine does: rank i's pieces to the peer's rank i, by address only."""
    for s, d in zip(src.kv_layouts(), dst.kv_layouts(), strict=True):
        assert s.piece_nbytes == d.piece_nbytes
        for sb, db in zip(src_ids, dst_ids, strict=True):
            ctypes.memmove(
                d.base_addr + layer_idx * d.layer_stride_nbytes + db * d.block_stride_nbytes,
                s.base_addr + layer_idx * s.layer_stride_nbytes + sb * s.block_stride_nbytes,
                s.piece_nbytes,
            )


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def gqa_ckpt(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp-disagg")), num_kv_heads=2)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_only_then_decode_only_tp2_equals_colocated(gqa_ckpt, params):
    colocated = LLMEngine(model=gqa_ckpt, device="cpu", num_kv_blocks=40)
    colocated.add_request("c", PROMPT, params)
    expected = _run(colocated)["c"]
    common = dict(model=gqa_ckpt, device="cpu", tensor_parallel_size=2, enable_radix_caching=True)
    p = LLMEngine(**common, num_kv_blocks=40, max_num_batched_tokens=20)  # chunked: 3 hook steps
    d = LLMEngine(**common, num_kv_blocks=30, kv_layout="block-major")
    try:
        # D already holds the first block from an earlier request: only blocks 1 and 2 travel
        d.add_request("warm", PROMPT[:17], GREEDY)
        _run(d)
        reservation = d.reserve("r", PROMPT)
        k = reservation.num_cached_tokens
        assert k == 16
        sent = []

        def hook(layer_idx, items):
            for request_id, block_ids in items:
                first = p.get_block_ids(request_id).index(block_ids[0]) - k // 16
                dst = reservation.new_block_ids[first : first + len(block_ids)]
                _copy_blocks(p, d, layer_idx, block_ids, dst)
                sent.append((layer_idx, list(block_ids)))

        p.layer_hook = hook
        p.add_request("r", PROMPT, params, mode=RequestMode.PREFILL_ONLY, num_peer_cached_tokens=k)
        first_token = _run(p)["r"]
        assert len(first_token) == 1
        assert sorted(b for layer, ids in sent if layer == 0 for b in ids) == sorted(
            p.get_block_ids("r")[1:]
        )
        p.release_request("r")
        d.add_request(
            "r", PROMPT, params, mode=RequestMode.DECODE_ONLY, first_token_id=first_token[0]
        )
        assert first_token + _run(d)["r"] == expected
        _assert_clean(p)
        _assert_clean(d)
    finally:
        p.shutdown()
        d.shutdown()
    assert multiprocessing.active_children() == []


def test_host_tier_with_tp2(gqa_ckpt):
    """Demote/promote copies run on every rank (each moves its own KV heads)."""
    kw = dict(device="cpu", num_kv_blocks=16, block_size=8, enable_radix_caching=True)
    kw.update(enable_host_tier=True, num_host_kv_blocks=40)
    others = [[256] + [(3 * i + 11) % 250 for i in range(n)] for n in (70, 60)]
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    results = []
    for tp in (1, 2):
        llm = LLM(gqa_ckpt, **kw, tensor_parallel_size=tp)
        first = llm.generate(_prompts(), GREEDY)
        llm.generate(others, short)  # pushes the cached prefixes to the host tier
        again = llm.generate(_prompts(), GREEDY)  # and back
        stats = llm.engine.stats()
        assert stats.num_demoted_blocks > 0 and stats.num_promoted_blocks > 0
        results.append(([o.token_ids for o in first], [o.token_ids for o in again]))
        _assert_clean(llm.engine)
        llm.engine.shutdown()
    assert results[0] == results[1]
    assert results[1][0] == results[1][1]


def test_bad_sizes_fail_before_any_process_starts(gqa_ckpt):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide.*\[1, 2, 4\]"):
        LLMEngine(model=gqa_ckpt, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size=8 does not divide"):
        LLMEngine(model=gqa_ckpt, device="cpu", tensor_parallel_size=8)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        LLMEngine(model=gqa_ckpt, device="cpu", tensor_parallel_size=0)
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="Ray is not installed"):
            LLMEngine(model=gqa_ckpt, device="cpu", tensor_parallel_size=2, worker_use_ray=True)
    if torch.cuda.device_count() < 4:  # more ranks than GPUs (or no GPU at all)
        with pytest.raises(ValueError, match="GPUs are visible|no CUDA device"):
            LLMEngine(model=gqa_ckpt, device="cuda", tensor_parallel_size=4)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("how", ["killed", "raises"])
def test_worker_death_is_a_clear_error_not_a_hang(gqa_ckpt, how):
    engine = LLMEngine(model=gqa_ckpt, device="cpu", num_kv_blocks=20, tensor_parallel_size=2)
    engine.add_request("a", PROMPT, GREEDY)
    engine.step()
    (pid,) = engine.runner.worker_pids
    if how == "killed":
        os.kill(pid, signal.SIGKILL)
        expected = "worker rank 1 .* died"
    else:  # an error inside the worker: its traceback reaches the driver
        engine.runner._command(("no-such-command", ()))
        expected = "(?s)worker rank 1 .* failed:.*unknown command 'no-such-command'"
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=expected):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - start < 10
    with pytest.raises(WorkerFailure, match="cannot run any more steps"):
        engine.step()
    engine.shutdown()
    assert multiprocessing.active_children() == []


def test_hook_error_keeps_ranks_in_lockstep():
    # the "tiny" preset has random weights: each rank slices the same ones a single rank draws
    engine = LLMEngine(model="tiny", device="cpu", num_kv_blocks=120, tensor_parallel_size=2)

    def hook(layer_idx, items):
        raise OSError("peer gone")

    engine.layer_hook = hook
    engine.add_request("p", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY)
    with pytest.raises(OSError, match="peer gone"):
        engine.step()  # re-raised after every rank finished the step
    engine.release_request("p")
    engine.layer_hook = None
    long_prompt = [256] + [(11 * i + 5) % 250 for i in range(1500)]
    engine.add_request("c", long_prompt, GREEDY)
    single = LLMEngine(model="tiny", device="cpu", num_kv_blocks=120)
    single.add_request("c", long_prompt, GREEDY)
    assert _run(engine)["c"] == _run(single)["c"]  # the group still works
    _assert_clean(engine)
    _assert_stopped(engine)


_DRIVER_SCRIPT = """
import signal, sys
from pdserve import SamplingParams
from pdserve.engine import LLMEngine
if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    engine = LLMEngine(model="tiny", device="cpu", num_kv_blocks=20, tensor_parallel_size=2)
    print(*engine.runner.worker_pids, flush=True)
    i = 0
    while i < 3 or sys.argv[1] != "exit":  # never shut down: exit, Ctrl-C or a kill ends the worker
        if not engine.has_unfinished():
            engine.add_request(str(i), [256, 1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True))
            i += 1
        engine.step()
"""


@pytest.mark.parametrize(
    "sig", [None, signal.SIGINT, signal.SIGKILL], ids=["exit", "ctrl-c", "kill"]
)
def test_driver_interrupt_or_death_leaves_no_worker(tmp_path, sig):
    import subprocess
    import sys

    script = tmp_path / "driver.py"
    script.write_text(_DRIVER_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), "exit" if sig is None else "loop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        (pid,) = map(int, proc.stdout.readline().split())
        if sig is not None:
            time.sleep(0.3)  # mid-loop
            proc.send_signal(sig)
        proc.wait(timeout=30)
        if sig is None:
            assert proc.returncode == 0, proc.stderr.read()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"worker {pid} outlived its driver")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class _FakeRay:
    """Just enough of Ray's API for the worker_use_ray path: tasks run as spawned processes."""

    def __init__(self):
        self.options: list[dict] = []

    def is_initialized(self) -> bool:
        return True

    def remote(self, **options):
        fake = self

        def wrap(fn):
            class _Remote:
                def remote(self, *args):
                    fake.options.append(options)
                    ctx = multiprocessing.get_context("spawn")
                    proc = ctx.Process(target=fn, args=args, daemon=True)
                    proc.start()
                    return proc

            return _Remote()

        return wrap

    def wait(self, refs, timeout=None):
        refs[0].join(timeout)
        return ([], refs) if refs[0].is_alive() else (refs, [])

    def cancel(self, ref, force=False):
        ref.kill()
        ref.join()


def test_worker_use_ray_places_workers_through_ray(monkeypatch):
    import sys

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    engine = LLMEngine(
        model="tiny", device="cpu", num_kv_blocks=20, tensor_parallel_size=2, worker_use_ray=True
    )
    assert fake.options == [{"num_cpus": 1, "num_gpus": 0}]
    single = LLMEngine(model="tiny", device="cpu", num_kv_blocks=20)
    for e in (engine, single):
        e.add_request("r", PROMPT, GREEDY)
    assert _run(engine) == _run(single)
    engine.shutdown()
    assert multiprocessing.active_children() == []


def test_which_ranks_use_the_ipc_collectives():
    """The driver decides once for every rank: CPU and Ray workers never; ranks sharing one GPU must."""
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.tp_worker import _use_ipc_collectives

    cpu = [torch.device("cpu")] * 2
    assert not _use_ipc_collectives(EngineConfig(), cpu, shared_device=False)
    shared = [torch.device("cuda", 0)] * 2
    with pytest.raises(ValueError, match="IPC collectives only"):
        _use_ipc_collectives(EngineConfig(custom_all_reduce=False), shared, shared_device=True)
    with pytest.raises(ValueError, match="worker_use_ray off"):
        _use_ipc_collectives(EngineConfig(worker_use_ray=True), shared, shared_device=True)
    assert _use_ipc_collectives(EngineConfig(), shared, shared_device=True)
    two = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert not _use_ipc_collectives(EngineConfig(custom_all_reduce=False), two, False)
    assert not _use_ipc_collectives(EngineConfig(worker_use_ray=True), two, False)
