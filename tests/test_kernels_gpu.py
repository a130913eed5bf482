"""The CUDA KV copy kernels are bit-exact against torch indexing, and reject bad arguments clearly.

Outputs are poisoned (all bytes 0xFF, a NaN pattern) before each call, so an element the kernel
failed to write fails the comparison; comparisons are on raw bytes, so they are exact for any dtype.
"""

from __future__ import annotations

import pytest
import torch
from pdserve.cache import kernels

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM = 3, 4, 64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    a, e = _bytes(actual), _bytes(expected).to(actual.device)
    if not torch.equal(a, e):
        diff = (a != e).nonzero().cpu()
        pytest.fail(f"{diff.shape[0]} bytes differ; first at {diff[0].tolist()}")


def _poison(t: torch.Tensor) -> torch.Tensor:
    t.view(torch.uint8).fill_(0xFF)
    return t


def _make_kv(layout: str, num_blocks: int, block_size: int, dtype, device="cuda") -> torch.Tensor:
    piece = (2, block_size, NUM_KV_HEADS, HEAD_DIM)
    shape = (
        (NUM_LAYERS, num_blocks, *piece)
        if layout == "layer-major"
        else (num_blocks, NUM_LAYERS, *piece)
    )
    return torch.randn(shape, device=device).to(dtype)


def _layer(kv: torch.Tensor, layout: str, layer_idx: int) -> torch.Tensor:
    return kv[layer_idx] if layout == "layer-major" else kv[:, layer_idx]


def _ids(values: torch.Tensor, kind: str):
    if kind == "cuda":
        return values.to("cuda", torch.int32)
    if kind == "cpu":
        return values
    return values.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("layout", ["layer-major", "block-major"])
@pytest.mark.parametrize("ids_kind", ["cuda", "list"])
def test_gather_matches_indexing(dtype, block_size, layout, ids_kind):
    num_blocks = 97
    kv = _make_kv(layout, num_blocks, block_size, dtype)
    for layer_idx in range(NUM_LAYERS):
        layer = _layer(kv, layout, layer_idx)
        for n in (1, 5, 300):  # 300 > num_blocks: repeats are certain, order is random
            ids = torch.randint(0, num_blocks, (n,))
            out = _poison(torch.empty(n, *layer.shape[1:], dtype=dtype, device="cuda"))
            assert kernels.gather_blocks(layer, _ids(ids, ids_kind), out) is out
            _assert_same_bytes(out, layer[ids.cuda()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("layout", ["layer-major", "block-major"])
@pytest.mark.parametrize("ids_kind", ["cuda", "cpu"])
def test_scatter_matches_indexing(dtype, block_size, layout, ids_kind):
    num_blocks = 97
    kv = _make_kv(layout, num_blocks, block_size, dtype)
    for layer_idx in range(NUM_LAYERS):
        n = int(torch.randint(1, num_blocks + 1, ()).item())
        ids = torch.randperm(num_blocks)[:n]  # distinct, out of order
        layer = _layer(kv, layout, layer_idx)
        src = torch.randn(n, *layer.shape[1:], device="cuda").to(dtype)
        expected = kv.clone()
        _layer(expected, layout, layer_idx)[ids.cuda()] = src
        assert kernels.scatter_blocks(src, _ids(ids, ids_kind), layer) is layer
        _assert_same_bytes(kv, expected)  # other blocks and other layers untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["layer-major", "block-major"])
def test_gather_then_scatter_round_trips(dtype, layout):
    kv = _make_kv(layout, 64, 16, dtype)
    other = _poison(torch.empty_like(kv))
    ids = torch.randperm(64, device="cuda").to(torch.int32)
    for layer_idx in range(NUM_LAYERS):
        packed = _poison(
            torch.empty(64, *_layer(kv, layout, 0).shape[1:], dtype=dtype, device="cuda")
        )
        kernels.gather_blocks(_layer(kv, layout, layer_idx), ids, packed)
        kernels.scatter_blocks(packed, ids, _layer(other, layout, layer_idx))
    _assert_same_bytes(other, kv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("direction", ["gpu->host", "host->gpu", "gpu->gpu"])
@pytest.mark.parametrize("whole_block", [True, False])
def test_copy_blocks_between_tiers(dtype, block_size, direction, whole_block):
    num_gpu_blocks, num_host_blocks, n = 80, 120, 50
    gpu_kv = _make_kv("block-major", num_gpu_blocks, block_size, dtype)
    host_kv = _make_kv("block-major", num_host_blocks, block_size, dtype, device="cpu").pin_memory()
    assert host_kv.is_pinned()
    # A whole block-major block (all layers) is one piece; else one layer's view of each pool.
    gpu_pool = gpu_kv if whole_block else gpu_kv[:, 1]
    host_pool = host_kv if whole_block else host_kv[:, 2]
    if direction == "gpu->host":
        src_pool, dst_pool = gpu_pool, host_pool
    elif direction == "host->gpu":
        src_pool, dst_pool = host_pool, gpu_pool
    else:
        src_pool, dst_pool = gpu_pool, _poison(torch.empty_like(gpu_kv))
        dst_pool = dst_pool if whole_block else dst_pool[:, 0]
    src_ids = torch.randint(0, src_pool.shape[0], (n,))  # repeats allowed on the source side
    dst_ids = torch.randperm(dst_pool.shape[0])[:n]
    if direction == "gpu->host":
        _poison(host_kv)
    elif direction == "host->gpu":
        _poison(gpu_kv)
    expected = dst_pool.cpu().clone()
    expected[dst_ids] = src_pool.cpu()[src_ids]
    result = kernels.copy_blocks(src_pool, dst_pool, src_ids.cuda().int(), dst_ids.cuda().int())
    torch.cuda.synchronize()
    assert result is dst_pool
    _assert_same_bytes(dst_pool, expected)


@pytest.mark.parametrize("version", range(1, 7))
def test_every_kernel_version_is_exact(version):
    kv = _make_kv("block-major", 200, 16, torch.bfloat16)
    layer = kv[:, 1]
    ids = torch.randint(0, 200, (333,), device="cuda", dtype=torch.int32)
    out = _poison(torch.empty(333, *layer.shape[1:], dtype=torch.bfloat16, device="cuda"))
    kernels.gather_blocks(layer, ids, out, kernel_version=version)
    _assert_same_bytes(out, layer[ids.long()])


@pytest.mark.parametrize("piece_nbytes", [1, 3, 6, 40, 1000, 4104])
def test_unaligned_pieces_use_the_fallback(piece_nbytes):
    # uint8 pools with odd piece sizes and an odd base offset: no 16-byte path is possible.
    pool = torch.randint(0, 256, (51, piece_nbytes + 1), dtype=torch.uint8, device="cuda")[1:, 1:]
    ids = torch.randint(0, 50, (77,))
    out = _poison(torch.empty(77, piece_nbytes, dtype=torch.uint8, device="cuda"))
    kernels.gather_blocks(pool, ids, out)
    _assert_same_bytes(out, pool[ids.cuda()])
    with pytest.raises(ValueError, match="needs 16-byte aligned"):
        kernels.gather_blocks(pool, ids, out, kernel_version=2)


def test_large_pieces_and_many_ids():
    # 512 KiB pieces (whole-block tier copies of a big model), more tiles than the grid has CTAs.
    pool = torch.randn(300, 2, 16, 8, 1024, device="cuda").to(torch.bfloat16)
    ids = torch.randint(0, 300, (1500,), device="cuda", dtype=torch.int32)
    out = _poison(torch.empty(1500, *pool.shape[1:], dtype=torch.bfloat16, device="cuda"))
    kernels.gather_blocks(pool, ids, out)
    _assert_same_bytes(out, pool[ids.long()])


def test_empty_id_list_is_a_no_op():
    pool = torch.randn(4, 2, 16, 4, 8, device="cuda")
    out = torch.empty(0, *pool.shape[1:], device="cuda")
    kernels.gather_blocks(pool, [], out)
    kernels.scatter_blocks(out, torch.empty(0, dtype=torch.int32, device="cuda"), pool)
    kernels.copy_blocks(pool, pool.clone(), [], [])


def test_runs_on_the_given_stream():
    pool = torch.randn(64, 2, 16, 4, 64, device="cuda").to(torch.float16)
    ids = torch.randint(0, 64, (40,), device="cuda", dtype=torch.int32)
    out = _poison(torch.empty(40, *pool.shape[1:], dtype=torch.float16, device="cuda"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    kernels.gather_blocks(pool, ids, out, stream=side)
    side.synchronize()
    _assert_same_bytes(out, pool[ids.long()])


# ---- bad arguments ----


def _pool_and_out(n: int = 4):
    pool = torch.randn(16, 2, 16, 4, 8, device="cuda").to(torch.float16)
    return pool, torch.empty(n, *pool.shape[1:], dtype=torch.float16, device="cuda")


def test_pageable_host_tensor_is_rejected():
    pool, _ = _pool_and_out()
    out = torch.empty(4, *pool.shape[1:], dtype=torch.float16)  # CPU, not pinned
    with pytest.raises(ValueError, match="out is on cpu but not pinned"):
        kernels.gather_blocks(pool, [0, 1, 2, 3], out)


def test_all_host_tensors_are_rejected():
    pool = torch.randn(16, 8).pin_memory()
    with pytest.raises(
        ValueError, match="at least one of src_pool, dst_pool must be a CUDA tensor"
    ):
        kernels.copy_blocks(pool, pool.clone().pin_memory(), [0], [1])


def test_device_ids_checked_for_range_dtype_and_repeats():
    pool, out = _pool_and_out()
    with pytest.raises(ValueError, match=r"holds id 16, outside the pool's \[0, 16\)"):
        kernels.gather_blocks(
            pool, torch.tensor([0, 1, 16, 2], device="cuda", dtype=torch.int32), out
        )
    with pytest.raises(ValueError, match="on the GPU must be int32, got torch.int64"):
        kernels.gather_blocks(pool, torch.tensor([0, 1, 2, 3], device="cuda"), out)
    with pytest.raises(ValueError, match="holds repeated ids"):
        kernels.scatter_blocks(
            out, torch.tensor([1, 2, 2, 3], device="cuda", dtype=torch.int32), pool
        )


def test_dtype_and_size_mismatch_on_gpu():
    pool, out = _pool_and_out()
    with pytest.raises(ValueError, match="out dtype torch.float32 differs"):
        kernels.gather_blocks(pool, [0, 1, 2, 3], out.float())
    with pytest.raises(ValueError, match="expected 3 ids x"):
        kernels.gather_blocks(pool, [0, 1, 2], out)


def test_raw_extension_rejects_bad_pointers():
    from pdserve import _cuda

    pool, out = _pool_and_out()
    ids = torch.zeros(4, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    piece = pool[0].numel() * pool.element_size()
    with pytest.raises(ValueError, match="src is a null pointer"):
        _cuda.gather_blocks(0, piece, 16, ids.data_ptr(), 4, out.data_ptr(), piece, stream)
    host = torch.empty(4, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_ids is pageable host memory"):
        _cuda.gather_blocks(
            pool.data_ptr(), piece, 16, host.data_ptr(), 4, out.data_ptr(), piece, stream
        )
    with pytest.raises(ValueError, match="smaller than piece_nbytes"):
        _cuda.gather_blocks(
            pool.data_ptr(), piece - 16, 16, ids.data_ptr(), 4, out.data_ptr(), piece, stream
        )
    with pytest.raises(ValueError, match="not a kernel version"):
        _cuda.gather_blocks(
            pool.data_ptr(), piece, 16, ids.data_ptr(), 4, out.data_ptr(), piece, stream, 9
        )


@pytest.mark.parametrize("piece_numel", [1, 2, 4, 12])
def test_narrow_vector_widths(piece_numel):
    # fp16 pieces of 2, 4, 8 and 24 bytes: the 2-, 4- and 8-byte instances of the fallback.
    pool = torch.randn(50, piece_numel, device="cuda").to(torch.float16)
    ids = torch.randperm(50)[:37]
    out = _poison(torch.empty(37, piece_numel, dtype=torch.float16, device="cuda"))
    kernels.gather_blocks(pool, ids, out)
    _assert_same_bytes(out, pool[ids.cuda()])
    dst = _poison(torch.empty_like(pool))
    kernels.scatter_blocks(out, ids, dst)
    _assert_same_bytes(dst[ids.cuda()], out)
