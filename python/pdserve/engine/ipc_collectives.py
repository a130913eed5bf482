"""All-reduce and gather between the tensor-parallel ranks of one machine through each other's device
memory (CUDA IPC): one kernel per call, no NCCL, capturable in CUDA graphs (cuda/ipc_collectives.cu).

Why: a 13B decode step all-reduces a [batch, 5120] activation twice per layer (80 times a step); at
batch 1 that is 10 KiB, where a collective's cost is all latency. One kernel that copies its input
into a shared buffer, meets the peers at a flag barrier and sums their buffers takes a few µs over
NVLink, and it lives inside the decode CUDA graph like any other kernel.

Each rank allocates one region (a signal area and two data halves of `capacity_nbytes`), exports its
IPC handle, and maps every peer's region. A tensor larger than a half is done in chunks (one call per
chunk); `TPGroup` gives such tensors to NCCL instead when it has NCCL. Ranks may share a device (the
one-GPU test of tensor parallelism): the kernels then take turns on the GPU, slowly but correctly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ALIGN = 16  # the kernels move 16-byte vectors


def _cuda_module():
    try:
        from pdserve import _cuda
    except ImportError as exc:
        raise RuntimeError(
            "IPC collectives need pdserve._cuda, which was not built (nvcc missing at install time)"
        ) from exc
    return _cuda


class IpcCollectives:
    """One rank's side of the IPC collectives of a group of `world_size` ranks.

    `exchange(obj)` must return every rank's obj in rank order (the group's all-gather of host
    objects); it is called twice here, in the same order on every rank. Every rank must issue the same
    calls with the same sizes in the same order (the tensor-parallel lockstep); a rank that stops
    calling leaves its peers waiting `timeout_s`, after which their kernels trap. `abort()` makes
    waiting kernels give up at once (with garbage results): use it when a peer died."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        device: torch.device,
        capacity_nbytes: int,
        exchange: Callable[[object], list[object]],
        timeout_s: float,
    ):
        _cuda = _cuda_module()
        if device.type != "cuda":
            raise ValueError(f"IPC collectives need a CUDA device, got {device}")
        if not 1 <= world_size <= _cuda.IPC_MAX_RANKS:
            raise ValueError(
                f"IPC collectives take 1..{_cuda.IPC_MAX_RANKS} ranks, got {world_size}"
            )
        if capacity_nbytes < _ALIGN or capacity_nbytes % _ALIGN:
            raise ValueError(
                f"capacity_nbytes must be a positive multiple of 16, got {capacity_nbytes}"
            )
        self._cuda = _cuda
        self.rank, self.world_size, self.device = rank, world_size, device
        self.capacity_nbytes = capacity_nbytes
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._index = index
        self._region = _cuda.ipc_alloc(index, _cuda.IPC_SIGNAL_NBYTES + 2 * capacity_nbytes)
        self._opened: list[int] = []
        try:
            handles = exchange(_cuda.ipc_handle(index, self._region))
            regions = []
            for r, handle in enumerate(handles):
                if r == rank:
                    regions.append(self._region)
                else:
                    regions.append(_cuda.ipc_open(index, handle))
                    self._opened.append(regions[-1])
            # per-CTA call counters (device) and the abort flag (mapped pinned host memory)
            self._counters = torch.zeros(_cuda.IPC_MAX_BLOCKS, dtype=torch.int32, device=device)
            self._abort = torch.zeros(1, dtype=torch.int32).pin_memory()
            call = _cuda.IpcCall()
            call.device, call.regions, call.rank = index, regions, rank
            call.counters_addr = self._counters.data_ptr()
            call.abort_addr = self._abort.data_ptr()
            call.capacity = capacity_nbytes
            call.timeout_ns = int(timeout_s * 1e9)
            self._call = call
            torch.cuda.synchronize(device)
            exchange(None)  # every rank has mapped every region before anyone signals
        except BaseException:
            self.close()
            raise

    # ---- collectives ----------------------------------------------------------------------------
    def can_take(self, x: torch.Tensor, chunks: bool) -> bool:
        """True when all_reduce can sum x: a CUDA tensor of this device in fp32/fp16/bf16 that fits
        one half (or any size with chunks=True)."""
        return (
            x.device == self.device
            and x.dtype in _DTYPE_CODES
            and (chunks or x.numel() * x.element_size() <= self.capacity_nbytes)
        )

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place; returns x. Raises ValueError when can_take(x, True) fails."""
        if not self.can_take(x, chunks=True):
            raise ValueError(
                f"IPC all-reduce takes fp32/fp16/bf16 tensors on {self.device}, got {x.dtype} on "
                f"{x.device}"
            )
        work = self._staged(x)
        flat = work.view(-1)
        per_chunk = self.capacity_nbytes // flat.element_size()
        stream = torch.cuda.current_stream(self.device).cuda_stream
        code = _DTYPE_CODES[x.dtype]
        for start in range(0, flat.numel(), per_chunk):
            part = flat[start : start + per_chunk]
            nbytes = part.numel() * part.element_size()
            ptr = part.data_ptr()
            self._cuda.ipc_all_reduce(self._call, ptr, ptr, nbytes, code, stream)
        if work is not x:
            x.copy_(work.view(-1)[: x.numel()].view_as(x))
        return x

    def gather(self, x: torch.Tensor, root: int = 0) -> torch.Tensor | None:
        """Every rank's x stacked in rank order ([world_size, *x.shape]) on `root`; None elsewhere
        (root=-1: on every rank). Any dtype."""
        if x.device != self.device:
            raise ValueError(f"IPC gather takes tensors on {self.device}, got {x.device}")
        work = self._staged(x)
        nbytes_total = work.numel() * work.element_size()
        out = None
        if root < 0 or root == self.rank:
            out = torch.empty((self.world_size, work.numel()), dtype=work.dtype, device=self.device)
        # ranks that only contribute never write `out`: the kernel gets their input as a stand-in
        out_ptr = out.data_ptr() if out is not None else work.data_ptr()
        stream = torch.cuda.current_stream(self.device).cuda_stream
        per_chunk = self.capacity_nbytes
        for start in range(0, nbytes_total, per_chunk):
            nbytes = min(per_chunk, nbytes_total - start)
            self._cuda.ipc_gather(
                self._call, work.data_ptr() + start, out_ptr + start, nbytes, nbytes_total, root,
                stream,
            )  # fmt: skip
        if out is None:
            return None
        return out[:, : x.numel()].reshape(self.world_size, *x.shape)

    def _staged(self, x: torch.Tensor) -> torch.Tensor:
        """x itself when the kernels can use it in place (contiguous, 16-byte aligned address and
        size), else a zero-padded contiguous copy."""
        nbytes = x.numel() * x.element_size()
        if x.is_contiguous() and x.data_ptr() % _ALIGN == 0 and nbytes % _ALIGN == 0:
            return x
        per = _ALIGN // x.element_size()
        padded = -(-x.numel() // per) * per
        work = torch.zeros(padded, dtype=x.dtype, device=x.device)
        work[: x.numel()].copy_(x.reshape(-1))
        return work

    # ---- lifetime -------------------------------------------------------------------------------
    def abort(self) -> None:
        """Kernels waiting for a peer give up (their results are garbage); no call may follow."""
        self._abort.fill_(1)

    def close(self) -> None:
        """Waits for this rank's calls in flight (abort() first if a peer is gone), then unmaps the
        peers' regions and frees this rank's (idempotent)."""
        cuda, index = self._cuda, self._index
        if self._region or self._opened:
            with contextlib.suppress(RuntimeError):  # a broken context: nothing left to wait for
                torch.cuda.synchronize(self.device)
        for addr in self._opened:
            with contextlib.suppress(RuntimeError):
                cuda.ipc_close(index, addr)
        self._opened = []
        if self._region:
            with contextlib.suppress(RuntimeError):
                cuda.ipc_free(index, self._region)
            self._region = 0
