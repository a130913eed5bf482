"""Typed torch wrappers of the CUDA KV block copy kernels (`pdserve._cuda`).

The kernels move *pieces*: the contiguous bytes of one block in one layer (K then V, DESIGN §2), or of
a whole block when the pool is block-major. A *pool* here is any tensor whose dim 0 indexes blocks and
whose remaining dims are contiguous, so both layouts work without copies:
- layer-major `kv[num_layers, num_blocks, 2, block_size, heads, head_dim]`: layer view `kv[layer_idx]`;
- block-major `kv[num_blocks, num_layers, 2, ...]`: layer view `kv[:, layer_idx]` (dim-0 stride spans all
  layers), or `kv` itself for whole-block tier copies.

Block ids are int32 tensors on the pool's GPU (used as given; validated with one device sync unless
`check_ids=False`), or CPU tensors / sequences of ints (validated on the host for free, then copied to
the GPU on the launch stream). Every function only enqueues work on `stream` (default: the current
stream of the GPU involved) and returns; the caller keeps every tensor alive until that work is done.
Argument errors raise ValueError; a missing extension or GPU raises RuntimeError.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

try:
    from pdserve import _cuda
except ImportError as _exc:  # built without nvcc, or the extension failed to load
    _cuda = None
    _CUDA_IMPORT_ERROR: str | None = str(_exc)
else:
    _CUDA_IMPORT_ERROR = None

# Block-id arguments of the kernels: a tensor or any sequence of ints, pdserve.cache.BlockIds (the
# cache core's result type, a registered Sequence) included. Not that class: a type alias.
BlockIds = torch.Tensor | Sequence[int]

__all__ = ["BlockIds", "copy_blocks", "gather_blocks", "is_available", "scatter_blocks"]


def is_available() -> bool:
    """True when `pdserve._cuda` is built and torch sees a CUDA GPU."""
    return _cuda is not None and torch.cuda.is_available()


def gather_blocks(
    src_layer: torch.Tensor,
    block_ids: BlockIds,
    out: torch.Tensor,
    *,
    check_ids: bool = True,
    stream: torch.cuda.Stream | None = None,
    kernel_version: int = 0,
) -> torch.Tensor:
    """Packs the pieces of `block_ids` of one layer into `out`; returns `out`.

    src_layer: `[num_blocks, *piece_shape]` pool (dims 1.. contiguous), CUDA or pinned CPU.
    block_ids: `n` ids in `[0, num_blocks)`, any order, repeats allowed.
    out: contiguous, same dtype, `n * prod(piece_shape)` elements (e.g. `[n, *piece_shape]`);
      piece i lands at `out.view(n, -1)[i]`. CUDA (same GPU) or pinned CPU.
    kernel_version: 0 picks the fastest kernel; others exist for the benchmark.
    """
    op = "gather_blocks"
    pool = _pool_geometry(op, "src_layer", src_layer)
    ids = _host_side_ids(op, "block_ids", block_ids, pool.num_blocks, unique=False)
    _check_packed(op, "out", out, src_layer, pool, _num_ids(ids))
    device = _device_of(op, {"src_layer": src_layer, "out": out})
    ids_dev, n, stream = _prepare_launch(
        op, device, stream, [("block_ids", ids, pool, False)], check_ids
    )
    if n:
        _launch(
            device,
            _cuda.gather_blocks,
            src_layer.data_ptr(),
            pool.stride_nbytes,
            pool.num_blocks,
            ids_dev[0].data_ptr(),
            n,
            out.data_ptr(),
            pool.piece_nbytes,
            stream.cuda_stream,
            kernel_version,
        )
    return out


def scatter_blocks(
    src: torch.Tensor,
    block_ids: BlockIds,
    dst_layer: torch.Tensor,
    *,
    check_ids: bool = True,
    stream: torch.cuda.Stream | None = None,
    kernel_version: int = 0,
) -> torch.Tensor:
    """Unpacks `src` into the pieces of `block_ids` of one layer; returns `dst_layer`.

    src: contiguous, `n * prod(piece_shape)` elements, same dtype as `dst_layer`.
    block_ids: `n` distinct ids in `[0, num_blocks)` (repeats would race; checked with `check_ids`).
    dst_layer: `[num_blocks, *piece_shape]` pool (dims 1.. contiguous). CUDA or pinned CPU, one GPU.
    """
    op = "scatter_blocks"
    pool = _pool_geometry(op, "dst_layer", dst_layer)
    ids = _host_side_ids(op, "block_ids", block_ids, pool.num_blocks, unique=True)
    _check_packed(op, "src", src, dst_layer, pool, _num_ids(ids))
    device = _device_of(op, {"src": src, "dst_layer": dst_layer})
    ids_dev, n, stream = _prepare_launch(
        op, device, stream, [("block_ids", ids, pool, True)], check_ids
    )
    if n:
        _launch(
            device,
            _cuda.scatter_blocks,
            src.data_ptr(),
            ids_dev[0].data_ptr(),
            n,
            dst_layer.data_ptr(),
            pool.stride_nbytes,
            pool.num_blocks,
            pool.piece_nbytes,
            stream.cuda_stream,
            kernel_version,
        )
    return dst_layer


def copy_blocks(
    src_pool: torch.Tensor,
    dst_pool: torch.Tensor,
    src_ids: BlockIds,
    dst_ids: BlockIds,
    *,
    check_ids: bool = True,
    stream: torch.cuda.Stream | None = None,
    kernel_version: int = 0,
) -> torch.Tensor:
    """Copies piece `src_ids[i]` of `src_pool` to piece `dst_ids[i]` of `dst_pool`; returns `dst_pool`.

    For tier moves (demote GPU → pinned host, promote pinned host → GPU) and copies inside one tier.
    src_pool, dst_pool: `[num_blocks, *piece_shape]` pools (dims 1.. contiguous) of one dtype and
      equal piece shape; each a CUDA tensor or a pinned CPU tensor, at least one on a GPU.
    src_ids, dst_ids: equally long; dst ids distinct (checked with `check_ids`).
    """
    op = "copy_blocks"
    src = _pool_geometry(op, "src_pool", src_pool)
    dst = _pool_geometry(op, "dst_pool", dst_pool)
    if src_pool.dtype != dst_pool.dtype:
        raise ValueError(
            f"{op}: src_pool dtype {src_pool.dtype} differs from dst_pool dtype {dst_pool.dtype}"
        )
    if src_pool.shape[1:] != dst_pool.shape[1:]:
        raise ValueError(
            f"{op}: piece shapes differ: src_pool {tuple(src_pool.shape[1:])}, "
            f"dst_pool {tuple(dst_pool.shape[1:])}"
        )
    s_ids = _host_side_ids(op, "src_ids", src_ids, src.num_blocks, unique=False)
    d_ids = _host_side_ids(op, "dst_ids", dst_ids, dst.num_blocks, unique=True)
    if _num_ids(s_ids) != _num_ids(d_ids):
        raise ValueError(
            f"{op}: src_ids has {_num_ids(s_ids)} ids but dst_ids has {_num_ids(d_ids)}"
        )
    device = _device_of(op, {"src_pool": src_pool, "dst_pool": dst_pool})
    ids_dev, n, stream = _prepare_launch(
        op,
        device,
        stream,
        [("src_ids", s_ids, src, False), ("dst_ids", d_ids, dst, True)],
        check_ids,
    )
    if n:
        _launch(
            device,
            _cuda.copy_blocks,
            src_pool.data_ptr(),
            src.stride_nbytes,
            src.num_blocks,
            dst_pool.data_ptr(),
            dst.stride_nbytes,
            dst.num_blocks,
            ids_dev[0].data_ptr(),
            ids_dev[1].data_ptr(),
            n,
            src.piece_nbytes,
            stream.cuda_stream,
            kernel_version,
        )
    return dst_pool


# ---- argument checks (shared) ----


class _Pool:
    """Byte geometry of a pool tensor: num_blocks pieces of piece_nbytes, stride_nbytes apart."""

    __slots__ = ("num_blocks", "piece_nbytes", "stride_nbytes")

    def __init__(self, num_blocks: int, piece_nbytes: int, stride_nbytes: int) -> None:
        self.num_blocks = num_blocks
        self.piece_nbytes = piece_nbytes
        self.stride_nbytes = stride_nbytes


def _pool_geometry(op: str, name: str, t: object) -> _Pool:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2:
        raise ValueError(
            f"{op}: {name} must be [num_blocks, *piece_shape] with at least 2 dims, "
            f"got shape {tuple(t.shape)}"
        )
    if t.shape[0] < 1 or t.shape[0] > 2**31 - 1:
        raise ValueError(f"{op}: {name} has {t.shape[0]} blocks; expected 1 .. 2^31-1")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} has empty pieces (shape {tuple(t.shape)})")
    expected = 1
    for dim in range(t.dim() - 1, 0, -1):
        if t.shape[dim] != 1 and t.stride(dim) != expected:
            raise ValueError(
                f"{op}: {name} pieces must be contiguous (dims 1.. of shape {tuple(t.shape)}), "
                f"got strides {t.stride()}"
            )
        expected *= t.shape[dim]
    piece_numel = expected
    if t.shape[0] > 1 and t.stride(0) < piece_numel:
        raise ValueError(
            f"{op}: {name} blocks overlap: dim-0 stride {t.stride(0)} < piece of {piece_numel} elements"
        )
    stride = t.stride(0) if t.shape[0] > 1 else piece_numel
    return _Pool(int(t.shape[0]), piece_numel * t.element_size(), stride * t.element_size())


def _check_packed(
    op: str, name: str, t: object, pool_tensor: torch.Tensor, pool: _Pool, num_ids: int
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != pool_tensor.dtype:
        raise ValueError(
            f"{op}: {name} dtype {t.dtype} differs from the pool's {pool_tensor.dtype}"
        )
    if not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()})"
        )
    piece_numel = pool.piece_nbytes // pool_tensor.element_size()
    if t.numel() != num_ids * piece_numel:
        raise ValueError(
            f"{op}: {name} has {t.numel()} elements (shape {tuple(t.shape)}); expected "
            f"{num_ids} ids x {piece_numel} elements per piece = {num_ids * piece_numel}"
        )


def _host_side_ids(
    op: str, name: str, ids: object, num_blocks: int, *, unique: bool
) -> torch.Tensor:
    """Returns ids as a 1-D tensor; CPU ids are range-checked here (no GPU needed)."""
    if isinstance(ids, torch.Tensor):
        t = ids
    elif isinstance(ids, Sequence) and not isinstance(ids, str | bytes):
        try:
            t = torch.tensor([operator.index(i) for i in ids], dtype=torch.int64)
        except (TypeError, OverflowError, RuntimeError) as exc:
            raise ValueError(f"{op}: {name} must be a sequence of ints ({exc})") from None
    else:
        raise ValueError(
            f"{op}: {name} must be an int32 CUDA tensor, a CPU integer tensor or a sequence of ints, "
            f"got {type(ids).__name__}"
        )
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must hold integers, got dtype {t.dtype}")
    if t.is_cuda:
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} on the GPU must be int32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous")
        return t
    if t.device.type != "cpu":
        raise ValueError(f"{op}: {name} must be on a CUDA device or the CPU, got {t.device}")
    _check_id_values(op, name, t, num_blocks, unique)
    return t


def _check_id_values(op: str, name: str, t: torch.Tensor, num_blocks: int, unique: bool) -> None:
    if t.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(t.to(torch.int64)))
    if lo < 0 or hi >= num_blocks:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: {name} holds id {bad}, outside the pool's [0, {num_blocks})")
    if unique and torch.unique(t).numel() != t.numel():
        raise ValueError(f"{op}: {name} holds repeated ids; destination ids must be distinct")


def _num_ids(ids: torch.Tensor) -> int:
    return int(ids.numel())


def _device_of(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """The one GPU the tensors live on; raises unless each is on it or pinned host memory."""
    if _cuda is None:
        raise RuntimeError(
            f"{op}: pdserve._cuda is not available ({_CUDA_IMPORT_ERROR}); pdserve was installed "
            "without nvcc, so the CUDA kernels were not built"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"{op}: no CUDA GPU is available (torch.cuda.is_available() is False)")
    devices = {name: t.device for name, t in tensors.items() if t.is_cuda}
    if not devices:
        raise ValueError(
            f"{op}: at least one of {', '.join(tensors)} must be a CUDA tensor; got "
            + ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
        )
    if len(set(devices.values())) > 1:
        raise ValueError(
            f"{op}: tensors are on different GPUs: "
            + ", ".join(f"{name} on {d}" for name, d in devices.items())
        )
    for name, t in tensors.items():
        if not t.is_cuda and not (t.device.type == "cpu" and t.is_pinned()):
            raise ValueError(
                f"{op}: {name} is on {t.device} but not pinned; expected a CUDA tensor or "
                "pinned host memory (tensor.pin_memory())"
            )
    return next(iter(devices.values()))


def _prepare_launch(
    op: str,
    device: torch.device,
    stream: torch.cuda.Stream | None,
    id_sets: list[tuple[str, torch.Tensor, _Pool, bool]],
    check_ids: bool = True,
) -> tuple[list[torch.Tensor], int, torch.cuda.Stream]:
    """Puts every id set on `device` as int32 (copies enqueued on the launch stream)."""
    if stream is None:
        stream = torch.cuda.current_stream(device)
    elif stream.device != device:
        raise ValueError(f"{op}: stream is on {stream.device} but the tensors are on {device}")
    # The device/stream context managers cost tens of microseconds per call, so they are entered
    # only where work is enqueued from Python (id checks, host-to-device id copies).
    out = []
    for name, ids, pool, unique in id_sets:
        if ids.is_cuda:
            if ids.device != device:
                raise ValueError(f"{op}: {name} is on {ids.device} but the tensors are on {device}")
            if check_ids:
                with torch.cuda.device(device), torch.cuda.stream(stream):
                    _check_id_values(op, name, ids, pool.num_blocks, unique)
            out.append(ids)
        else:
            host = ids.to(torch.int32).pin_memory()
            with torch.cuda.device(device), torch.cuda.stream(stream):
                out.append(host.to(device, non_blocking=True))
    return out, int(out[0].numel()), stream


def _launch(device: torch.device, fn: Callable[..., None], *args: int) -> None:
    """Calls a `pdserve._cuda` launcher with `device` current (the launchers use the current one)."""
    if torch.cuda.current_device() == device.index:
        fn(*args)
        return
    with torch.cuda.device(device):
        fn(*args)
