"""The KV copy wrappers' argument checks that need no GPU, and the clear error when there is none."""

from __future__ import annotations

import pytest
import torch
from pdserve.cache import kernels

NUM_BLOCKS = 8
PIECE_SHAPE = (2, 16, 2, 4)  # K/V, block_size, num_kv_heads, head_dim


def _pool(num_blocks: int = NUM_BLOCKS, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(num_blocks, *PIECE_SHAPE).to(dtype)


def _packed(n: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.empty(n, *PIECE_SHAPE, dtype=dtype)


no_gpu = pytest.mark.skipif(kernels.is_available(), reason="checks the no-GPU error path")


@no_gpu
def test_is_available_is_false_without_gpu():
    assert kernels.is_available() is False


@no_gpu
@pytest.mark.parametrize("op", ["gather", "scatter", "copy"])
def test_valid_call_without_gpu_raises_runtime_error(op):
    pool, packed = _pool(), _packed(3)
    with pytest.raises(RuntimeError, match=r"(no CUDA GPU|pdserve\._cuda is not available)"):
        if op == "gather":
            kernels.gather_blocks(pool, [1, 2, 1], packed)
        elif op == "scatter":
            kernels.scatter_blocks(packed, [4, 0, 2], pool)
        else:
            kernels.copy_blocks(pool, _pool(), [0, 1, 2], [3, 4, 5])


def test_missing_extension_says_it_was_not_built(monkeypatch):
    monkeypatch.setattr(kernels, "_cuda", None)
    monkeypatch.setattr(kernels, "_CUDA_IMPORT_ERROR", "No module named 'pdserve._cuda'")
    with pytest.raises(RuntimeError, match="installed without nvcc"):
        kernels.gather_blocks(_pool(), [0], _packed(1))
    assert kernels.is_available() is False


def test_dtype_mismatch():
    with pytest.raises(ValueError, match=r"out dtype torch.float32 differs .* torch.float16"):
        kernels.gather_blocks(_pool(), [0, 1], _packed(2, torch.float32))


def test_packed_size_must_match_ids():
    with pytest.raises(ValueError, match=r"out has 256 elements .* expected 3 ids x 256"):
        kernels.gather_blocks(_pool(), [0, 1, 2], _packed(1))
    with pytest.raises(ValueError, match=r"src has 512 elements"):
        kernels.scatter_blocks(_packed(2), [0], _pool())


def test_packed_must_be_contiguous():
    out = torch.empty(256, 2, dtype=torch.float16)[:, 0]
    with pytest.raises(ValueError, match="out must be contiguous"):
        kernels.gather_blocks(_pool(), [0], out)


@pytest.mark.parametrize("bad_id", [-1, NUM_BLOCKS, 2**40])
def test_ids_out_of_range(bad_id):
    with pytest.raises(
        ValueError, match=rf"block_ids holds id {bad_id}, outside the pool's \[0, 8\)"
    ):
        kernels.gather_blocks(_pool(), [0, bad_id], _packed(2))


def test_ids_must_be_integers_and_1d():
    with pytest.raises(ValueError, match="sequence of ints"):
        kernels.gather_blocks(_pool(), [0.5], _packed(1))
    with pytest.raises(ValueError, match="must hold integers"):
        kernels.gather_blocks(_pool(), torch.tensor([0.0]), _packed(1))
    with pytest.raises(ValueError, match="must be 1-D"):
        kernels.gather_blocks(_pool(), torch.zeros(1, 1, dtype=torch.int32), _packed(1))
    with pytest.raises(ValueError, match="got str"):
        kernels.gather_blocks(_pool(), "01", _packed(2))


def test_destination_ids_must_be_distinct():
    with pytest.raises(ValueError, match="dst_ids holds repeated ids"):
        kernels.copy_blocks(_pool(), _pool(), [0, 1], [3, 3])
    with pytest.raises(ValueError, match="block_ids holds repeated ids"):
        kernels.scatter_blocks(_packed(2), [5, 5], _pool())


def test_pool_pieces_must_be_contiguous():
    kv = torch.zeros(NUM_BLOCKS, 2, 16, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="pieces must be contiguous"):
        kernels.gather_blocks(kv[..., :4], [0], _packed(1))


def test_pool_needs_a_block_dim():
    with pytest.raises(ValueError, match="at least 2 dims"):
        kernels.gather_blocks(torch.zeros(16), [0], torch.zeros(1))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        kernels.gather_blocks([1, 2], [0], _packed(1))


def test_copy_blocks_shape_checks():
    with pytest.raises(ValueError, match="src_ids has 2 ids but dst_ids has 1"):
        kernels.copy_blocks(_pool(), _pool(), [0, 1], [2])
    with pytest.raises(ValueError, match="piece shapes differ"):
        kernels.copy_blocks(_pool(), torch.zeros(NUM_BLOCKS, 4, dtype=torch.float16), [0], [0])
    with pytest.raises(ValueError, match="src_pool dtype torch.float16 differs"):
        kernels.copy_blocks(_pool(), _pool(dtype=torch.bfloat16), [0], [0])


def test_block_major_layer_view_is_accepted_geometry():
    # [num_blocks, num_layers, *piece]: the layer view strides over all layers of a block.
    kv = torch.zeros(NUM_BLOCKS, 3, *PIECE_SHAPE, dtype=torch.float16)
    pool = kernels._pool_geometry("test", "kv", kv[:, 1])
    piece_nbytes = 2 * 16 * 2 * 4 * 2
    assert (pool.num_blocks, pool.piece_nbytes, pool.stride_nbytes) == (
        NUM_BLOCKS,
        piece_nbytes,
        3 * piece_nbytes,
    )
