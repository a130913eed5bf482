"""Tensor parallelism on GPUs: the IPC collectives (cuda/ipc_collectives.cu) and TP=2 with CUDA graphs.

These run on one GPU: two ranks share it (PDSERVE_TP_SHARE_DEVICE=1, the ranks' kernels take turns on
the device), which exercises the same IPC mapping, flag barrier, chunking and graph capture as two
GPUs, though not the NVLink path or NCCL. Exactness: the all-reduce sums in fp32 in rank order and
rounds once, so it must equal torch's `(x0.float() + x1.float()).to(dtype)` bit for bit; TP=2 fp32
greedy outputs must equal TP=1's (attention dots in tf32: a near-tie could flip a token, the tiny
models' peaked logits make that rare).
"""

from __future__ import annotations

import multiprocessing
import time
import traceback

import pytest
import torch
from pdserve import LLM, SamplingParams
from test_engine_gpu_fast import ENGINE_KW, PROMPTS
from tiny_models import make_tiny_llama

pytestmark = pytest.mark.gpu

CAPACITY = 64 << 10  # small, so the large cases go through several chunks
SIZES = [5, 4096, 3 * (CAPACITY // 2) + 7]  # padded; one call; chunked (fp32: 7 chunks)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _input(rank: int, case: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + case)
    return torch.randn(numel, generator=g).to(dtype).cuda()


def _ipc_rank(rank: int, world: int, port: int, errors) -> None:
    try:
        from pdserve.engine import distributed

        store = distributed.connect_store(port, world)
        _ipc_checks(distributed.init_group(store, rank, world, torch.device("cuda", 0), True))
    except BaseException:  # noqa: BLE001  (reported to the test process)
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")


def _ipc_checks(group) -> None:
    rank, world = group.rank, group.world_size
    group.enable_ipc(CAPACITY)
    case = 0
    for dtype in DTYPES:
        for numel in SIZES:
            case += 1
            x = _input(rank, case, numel, dtype)
            got = group.all_reduce(x.clone())
            want = sum(_input(r, case, numel, dtype).float() for r in range(world)).to(dtype)
            assert torch.equal(got, want), (dtype, numel, (got.float() - want.float()).abs().max())
            parts = group.ipc.gather(x, root=0)
            if rank == 0:
                for r in range(world):
                    assert torch.equal(parts[r], _input(r, case, numel, dtype)), (dtype, numel, r)
            else:
                assert parts is None
    # captured once, replayed on new inputs: epochs live in device memory, not in the graph
    static = torch.zeros(4096, dtype=torch.bfloat16, device=group.device)
    logits = torch.zeros(3, 50, dtype=torch.bfloat16, device=group.device)
    stream = torch.cuda.Stream(group.device)
    stream.wait_stream(torch.cuda.current_stream(group.device))
    with torch.cuda.stream(stream):
        group.all_reduce(static)  # warm-up (allocator, kernels) outside the capture
        group.gather_last_dim(logits)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            group.all_reduce(static)
            gathered = group.gather_last_dim(logits)
    torch.cuda.current_stream(group.device).wait_stream(stream)
    for step in range(3):
        case += 1
        static.copy_(_input(rank, case, 4096, torch.bfloat16))
        logits.copy_(_input(rank, case + 100, 150, torch.bfloat16).view(3, 50))
        graph.replay()
        torch.cuda.synchronize(group.device)
        want = sum(_input(r, case, 4096, torch.bfloat16).float() for r in range(world))
        assert torch.equal(static, want.to(torch.bfloat16)), step
        if rank == 0:
            full = [_input(r, case + 100, 150, torch.bfloat16).view(3, 50) for r in range(world)]
            assert torch.equal(gathered, torch.cat(full, dim=-1)), step
        else:
            assert gathered.shape == (3, 0)
    group.shutdown()


def test_ipc_collectives_two_ranks_sharing_one_gpu():
    from pdserve.engine import distributed

    world = 2
    store = distributed.create_store(world)
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.Queue()
    procs = [
        ctx.Process(target=_ipc_rank, args=(r, world, store.port, errors)) for r in range(1, world)
    ]
    for p in procs:
        p.start()
    try:
        _ipc_checks(distributed.init_group(store, 0, world, torch.device("cuda", 0), True))
    finally:
        for p in procs:
            p.join(120)
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def _idle_rank(port: int, errors, release) -> None:
    """Joins the IPC collectives as rank 1, then never calls one until `release` is set."""
    try:
        from pdserve.engine import distributed

        group = distributed.init_group(
            distributed.connect_store(port, 2), 1, 2, torch.device("cuda", 0), True
        )
        group.enable_ipc(CAPACITY)
        release.wait(120)
        group.shutdown()
    except BaseException:  # noqa: BLE001  (reported to the test process)
        errors.put(traceback.format_exc())


def test_abort_frees_a_rank_waiting_for_a_silent_peer():
    """A peer that never calls (dead or stuck): rank 0's kernel waits at the barrier until abort()
    (what the TP watchdog calls when a worker dies), then returns instead of hanging the stream."""
    from pdserve.engine import distributed

    store = distributed.create_store(2)
    ctx = multiprocessing.get_context("spawn")
    errors, release = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_idle_rank, args=(store.port, errors, release))
    proc.start()
    try:
        group = distributed.init_group(store, 0, 2, torch.device("cuda", 0), True)
        group.enable_ipc(CAPACITY)
        x = torch.ones(1024, device="cuda")
        done = torch.cuda.Event()
        group.all_reduce(x)
        done.record()
        time.sleep(1.0)
        assert not done.query()  # still waiting for rank 1
        group.abort()
        deadline = time.monotonic() + 30
        while not done.query() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert done.query()
        group.shutdown()
    finally:
        release.set()
        proc.join(60)
    assert errors.empty(), errors.get()


def test_ipc_collectives_reject_what_they_cannot_take():
    from pdserve.engine.ipc_collectives import IpcCollectives

    with pytest.raises(ValueError, match="CUDA device"):
        IpcCollectives(0, 2, torch.device("cpu"), CAPACITY, lambda obj: [obj], 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        IpcCollectives(0, 1, torch.device("cuda", 0), 1000, lambda obj: [obj], 1.0)
    one = IpcCollectives(0, 1, torch.device("cuda", 0), CAPACITY, lambda obj: [obj], 1.0)
    try:
        x = torch.arange(10, dtype=torch.float32, device="cuda")
        assert torch.equal(one.all_reduce(x.clone()), x)  # one rank: the sum is x itself
        with pytest.raises(ValueError, match="fp32/fp16/bf16"):
            one.all_reduce(torch.ones(4, dtype=torch.int64, device="cuda"))
        assert not one.can_take(torch.ones(CAPACITY, device="cuda"), chunks=False)
    finally:
        one.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tp-gpu")), num_kv_heads=2)


def test_tp2_with_graphs_greedy_equals_tp1_fp32(ckpt, monkeypatch):
    monkeypatch.setenv("PDSERVE_TP_SHARE_DEVICE", "1")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(ENGINE_KW, device="cuda", dtype="float32")
    ref = LLM(ckpt, attention_backend="torch", enforce_eager=True, **kw)
    tp2 = LLM(ckpt, attention_backend="triton", tensor_parallel_size=2, **kw)
    try:
        runner = tp2.engine.runner
        assert runner.group.ipc is not None and runner.group.shared_device
        assert runner.runner.decode_graphs is not None
        for _ in range(2):  # the second round hits the radix cache
            a = [o.token_ids for o in ref.generate(PROMPTS, params)]
            b = [o.token_ids for o in tp2.generate(PROMPTS, params)]
            assert a == b
        tp2.engine.check_invariants()
        assert tp2.engine.stats().num_used_blocks == 0
    finally:
        tp2.engine.shutdown()


def test_tp2_graphs_equal_tp2_eager_bf16(ckpt, monkeypatch):
    """The graph replays the same kernels and collectives as the eager step: same tokens."""
    monkeypatch.setenv("PDSERVE_TP_SHARE_DEVICE", "1")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    kw = dict(ENGINE_KW, device="cuda", dtype="bfloat16", tensor_parallel_size=2)
    outs = []
    for eager in (True, False):
        llm = LLM(ckpt, enforce_eager=eager, **kw)
        try:
            assert (llm.engine.runner.runner.decode_graphs is None) == eager
            outs.append([o.token_ids for o in llm.generate(PROMPTS, params)])
            assert llm.engine.stats().num_used_blocks == 0
        finally:
            llm.engine.shutdown()
    assert outs[0] == outs[1]


def test_custom_all_reduce_off_means_no_tp_graphs_and_sharing_refused(ckpt, monkeypatch):
    monkeypatch.setenv("PDSERVE_TP_SHARE_DEVICE", "1")
    with pytest.raises(ValueError, match="IPC collectives only"):
        LLM(ckpt, device="cuda", tensor_parallel_size=2, custom_all_reduce=False, num_kv_blocks=16)
    if torch.cuda.device_count() < 2:
        pytest.skip("the NCCL-only path needs two GPUs")
    monkeypatch.delenv("PDSERVE_TP_SHARE_DEVICE")
    llm = LLM(
        ckpt, device="cuda", tensor_parallel_size=2, custom_all_reduce=False, num_kv_blocks=16
    )
    try:
        assert llm.engine.runner.group.ipc is None
        assert llm.engine.runner.runner.decode_graphs is None
    finally:
        llm.engine.shutdown()
