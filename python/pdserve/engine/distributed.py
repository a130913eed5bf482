"""Process groups of one tensor-parallel engine: a compute group (gloo on CPU, NCCL on CUDA) for the
model's all-reduce / gather, and a gloo control group the driver uses to hand every step to the workers.
On CUDA the model's collectives go to the IPC collectives first (ipc_collectives.py: one kernel each,
captured in the decode CUDA graphs) when the runner enabled them; NCCL takes what they do not.

Groups are explicit objects, not torch's default group, so one process may hold several TP engines
(a prefill and a decode engine in one test). Layers reach the group of the model being run through
`use_group` (set around every forward by the runner that owns the model).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pdserve.engine.ipc_collectives import IpcCollectives

# Idle workers wait on the control group for the next step; an idle server must not time them out.
CONTROL_TIMEOUT = datetime.timedelta(days=365)
# A compute collective waits at most this long for a peer that is alive but stuck.
COMPUTE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("PDSERVE_TP_TIMEOUT_S", "600")))
# NVLink multicast (NVLS) stays off: it reserves memory per communicator and is not lent (KINDS.md).
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0"}
# The control group's first message per command: length + the start of the pickle
_HEAD_NBYTES = 64 << 10


class WorkerFailure(RuntimeError):
    """A tensor-parallel worker died or raised; the engine cannot step any more."""


@dataclass
class TPGroup:
    """One rank's view of a tensor-parallel engine: its rank, the group size, its device, and the
    compute (`pg`) and control (`control_pg`) process groups. The store is the driver's TCPStore.
    shared_device: the ranks share one GPU (a test set-up: the compute group is then gloo, and every
    device collective goes through `ipc`)."""

    rank: int
    world_size: int
    device: torch.device
    pg: dist.ProcessGroup | None
    control_pg: dist.ProcessGroup | None
    store: dist.Store | None
    shared_device: bool = False
    ipc: IpcCollectives | None = None

    def enable_ipc(self, capacity_nbytes: int) -> None:
        """Sets up the IPC collectives (every rank at the same point; CUDA only)."""
        if self.ipc is None:
            timeout_s = COMPUTE_TIMEOUT.total_seconds()
            self.ipc = IpcCollectives(
                self.rank, self.world_size, self.device, capacity_nbytes, self.all_objects,
                timeout_s,
            )  # fmt: skip

    def _ipc_takes(self, x: torch.Tensor) -> bool:
        # sizes beyond one buffer half are chunked only where there is no NCCL to take them
        return self.ipc is not None and self.ipc.can_take(x, chunks=self.shared_device)

    # ---- compute collectives (on `device`) -----------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x in place over the ranks; returns x."""
        if self._ipc_takes(x):
            return self.ipc.all_reduce(x)
        self.pg.allreduce([x]).wait()
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0 gets the ranks' x concatenated along the last dim; other ranks get x[..., :0]."""
        x = x.contiguous()
        if self._ipc_takes(x):
            parts = self.ipc.gather(x, root=0)
            return torch.cat(parts.unbind(0), dim=-1) if self.rank == 0 else x[..., :0]
        if self.device.type == "cuda":
            # NCCL has no gather; all-gather costs one extra copy of a [num_sampled, vocab] tensor
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            self.pg.allgather([parts], [x]).wait()
        else:
            opts = dist.GatherOptions()
            opts.rootRank = 0
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            self.pg.gather([parts] if self.rank == 0 else [], [x], opts).wait()
        return torch.cat(parts, dim=-1) if self.rank == 0 else x[..., :0]

    def min_int(self, value: int) -> int:
        """The smallest of the ranks' values (e.g. the KV blocks every rank can hold)."""
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.control_pg.allreduce([t], opts).wait()
        return int(t.item())

    # ---- control (gloo, host objects) ----------------------------------------------------------
    def broadcast_object(self, obj: object = None) -> object:
        """Rank 0 sends obj (pickled) to every rank; every rank returns it. One collective when the
        pickle fits the fixed-size first message (a step's inputs usually do), two otherwise."""
        head = torch.empty(_HEAD_NBYTES, dtype=torch.uint8)
        data = b""
        if self.rank == 0:
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            first = data[: _HEAD_NBYTES - 8]
            head[:8] = torch.frombuffer(
                bytearray(len(data).to_bytes(8, "little")), dtype=torch.uint8
            )
            head[8 : 8 + len(first)] = torch.frombuffer(bytearray(first), dtype=torch.uint8)
        _broadcast(self.control_pg, head)
        if self.rank == 0:
            if len(data) > _HEAD_NBYTES - 8:
                rest = torch.frombuffer(bytearray(data[_HEAD_NBYTES - 8 :]), dtype=torch.uint8)
                _broadcast(self.control_pg, rest)
            return obj
        head_bytes = head.numpy().tobytes()
        nbytes = int.from_bytes(head_bytes[:8], "little")
        data = head_bytes[8 : 8 + nbytes]
        if nbytes > _HEAD_NBYTES - 8:
            rest = torch.empty(nbytes - (_HEAD_NBYTES - 8), dtype=torch.uint8)
            _broadcast(self.control_pg, rest)
            data += rest.numpy().tobytes()
        return pickle.loads(data)

    def gather_objects(self, obj: object) -> list[object] | None:
        """Every rank's obj, in rank order, on rank 0 (None elsewhere)."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.control_pg.allgather([sizes], [size]).wait()
        longest = int(max(s.item() for s in sizes))
        buf = torch.zeros(longest, dtype=torch.uint8)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self.control_pg.allgather([bufs], [buf]).wait()
        if self.rank != 0:
            return None
        return [
            pickle.loads(b[: int(s.item())].numpy().tobytes())
            for b, s in zip(bufs, sizes, strict=True)
        ]

    def all_objects(self, obj: object) -> list[object]:
        """Every rank's obj, in rank order, on every rank."""
        return self.broadcast_object(self.gather_objects(obj))

    def shutdown(self) -> None:
        """Tears the groups down (idempotent); pending collectives on them fail."""
        if self.ipc is not None:
            self.ipc.close()
            self.ipc = None
        for pg in (self.pg, self.control_pg):
            if pg is not None:
                with contextlib.suppress(Exception):
                    pg.shutdown()
        self.pg = self.control_pg = None
        self.store = None

    def abort(self) -> None:
        """Fails every collective in flight at once (a peer died); the group is unusable afterwards."""
        if self.ipc is not None:
            self.ipc.abort()
        for pg in (self.pg, self.control_pg):
            if pg is not None:
                with contextlib.suppress(Exception):
                    pg.abort()


def _broadcast(pg: dist.ProcessGroup, t: torch.Tensor) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([t], opts).wait()


def create_store(world_size: int) -> dist.TCPStore:
    """The driver's rendezvous store on a free local port (workers connect to store.port)."""
    return dist.TCPStore(
        "127.0.0.1", 0, world_size, True, timeout=datetime.timedelta(seconds=300),
        wait_for_workers=False,
    )  # fmt: skip


def connect_store(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, world_size, False, timeout=datetime.timedelta(seconds=300)
    )


def init_group(
    store: dist.Store, rank: int, world_size: int, device: torch.device, shared_device: bool = False
) -> TPGroup:
    """Builds rank's compute group (NCCL on CUDA, gloo on CPU or when the ranks share one GPU, which
    NCCL refuses) and its gloo control group.

    Every rank must call it; it returns once all ranks have joined.
    """
    control = dist.ProcessGroupGloo(
        dist.PrefixStore("control/", store), rank, world_size, CONTROL_TIMEOUT
    )
    compute_store = dist.PrefixStore("compute/", store)
    if device.type == "cuda" and shared_device:
        torch.cuda.set_device(device)
        compute = dist.ProcessGroupGloo(compute_store, rank, world_size, COMPUTE_TIMEOUT)
    elif device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError(
                "tensor parallelism on CUDA needs NCCL, which this torch build lacks"
            )
        os.environ.update(NCCL_ENV)
        torch.cuda.set_device(device)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = COMPUTE_TIMEOUT
        compute = dist.ProcessGroupNCCL(compute_store, rank, world_size, opts)
        # eager communicator set-up (one warm-up all-reduce), so a missing peer fails here, not mid-step
        t = torch.zeros(1, device=device)
        compute.allreduce([t]).wait()
        torch.cuda.synchronize(device)
    else:
        compute = dist.ProcessGroupGloo(compute_store, rank, world_size, COMPUTE_TIMEOUT)
    return TPGroup(rank, world_size, device, compute, control, store, shared_device)


# ---- the group of the model being run (layers read it) -------------------------------------------
_active: list[TPGroup] = []


@contextlib.contextmanager
def use_group(group: TPGroup | None) -> Iterator[None]:
    """Makes `group` the one tensor-parallel layers use inside the block (None: single rank)."""
    _active.append(group)
    try:
        yield
    finally:
        _active.pop()


def active_group() -> TPGroup:
    group = _active[-1] if _active else None
    if group is None:
        raise RuntimeError(
            "a tensor-parallel layer ran outside use_group(): run the model through its runner"
        )
    return group


# ---- checks ------------------------------------------------------------------------------------
def check_tp_size(
    tp_size: int, num_heads: int, num_kv_heads: int, vocab_size: int, intermediate_size: int
) -> None:
    """Raises ValueError when the model cannot be split over tp_size ranks, saying what would work."""
    if tp_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp_size}")
    if tp_size == 1:
        return
    problems = []
    if num_heads % tp_size:
        problems.append(f"num_attention_heads={num_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        problems.append(f"num_key_value_heads={num_kv_heads} (nor does tp divide it)")
    if intermediate_size % tp_size:
        problems.append(f"intermediate_size={intermediate_size}")
    if problems:
        valid = [
            n
            for n in range(1, num_heads + 1)
            if _splits(n, num_heads, num_kv_heads, intermediate_size)
        ]
        raise ValueError(
            f"tensor_parallel_size={tp_size} does not divide {', '.join(problems)}; "
            f"sizes that split this model: {valid}"
        )
    del vocab_size  # padded per rank (ceil(vocab / tp) rows each): any size works


def _splits(n: int, num_heads: int, num_kv_heads: int, intermediate_size: int) -> bool:
    return (
        num_heads % n == 0
        and (num_kv_heads % n == 0 or n % num_kv_heads == 0)
        and intermediate_size % n == 0
    )


# Test set-up: every rank on the one given GPU (ranks then talk through the IPC collectives only)
SHARE_DEVICE_ENV = "PDSERVE_TP_SHARE_DEVICE"


def rank_devices(device: torch.device, tp_size: int) -> list[torch.device]:
    """One device per rank: CPU for every rank, or consecutive GPUs from the given index (default 0);
    with PDSERVE_TP_SHARE_DEVICE=1, every rank on the given GPU (testing on one GPU).

    Raises ValueError when fewer GPUs are visible than ranks need."""
    if device.type != "cuda":
        return [device] * tp_size
    if os.environ.get(SHARE_DEVICE_ENV) == "1":
        return [torch.device("cuda", device.index or 0)] * tp_size
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + tp_size > available:
        raise ValueError(
            f"tensor_parallel_size={tp_size} from cuda:{first} needs GPUs {first}..{first + tp_size - 1}, "
            f"but {available} are visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
            f"use at most {available - first}, or device='cpu'"
        )
    return [torch.device("cuda", first + r) for r in range(tp_size)]
