"""Host staging of KV that lives on a GPU, for the transports that move host memory (TCP).

Without `--enable-direct` (SPEC §1) the KV goes GPU -> pinned host slots -> wire -> pinned host slots
-> GPU. A slot holds one block of every layer (`[num_slots, num_layers, *piece]`, block-major), so the
arena is itself a KV layout the transfer engine registers, and a block's position in a request maps to
one slot on each side. Gather and scatter run on the engine thread (they touch the KV tensor); slot
allocation is thread-safe. On a CPU instance staging is not needed, but it works the same (tests).
Under tensor parallelism every rank has its own host arena of the same slot count; a slot id names the
same block position in all of them, so rank i's slots go to the peer's rank i's slots.
"""

from __future__ import annotations

import threading

import torch

from pdserve.transfer import KVLayout


class NoStagingRoom(RuntimeError):
    """Every staging slot is in use; nothing was taken."""


class StagingArena:
    def __init__(self, kvs: torch.Tensor | list[torch.Tensor], block_major: bool, num_slots: int):
        if isinstance(kvs, torch.Tensor):
            kvs = [kvs]
        if num_slots < 1:
            raise ValueError(f"the staging arena needs at least one slot, got {num_slots}")
        if not kvs:
            raise ValueError("the staging arena needs at least one KV tensor")
        # one KV tensor per tensor-parallel rank: [L, B, *piece] (layer-major) or [B, L, *piece]
        # (block-major), any device
        self.kvs = list(kvs)
        self.block_major = block_major
        self.hosts: list[torch.Tensor] = []  # per rank: [num_slots, L, *piece], host memory
        self.layouts: list[KVLayout] = []  # per rank: what the transfer engine registers
        for kv in self.kvs:
            num_layers = kv.shape[1] if block_major else kv.shape[0]
            host = torch.empty(
                (num_slots, num_layers, *kv.shape[2:]), dtype=kv.dtype, pin_memory=kv.is_cuda
            )
            piece_nbytes = host[0, 0].numel() * host.element_size()
            self.hosts.append(host)
            self.layouts.append(
                KVLayout.block_major(host.data_ptr(), num_layers, num_slots, piece_nbytes, "cpu")
            )
        self.layout = self.layouts[0]  # rank 0's (the only one at TP 1)
        self.host = self.hosts[0]
        self._free = list(range(num_slots - 1, -1, -1))
        self._lock = threading.Lock()

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def alloc(self, num_slots: int) -> list[int]:
        """Takes `num_slots` slots; raises NoStagingRoom (taking nothing) when fewer are free."""
        with self._lock:
            if num_slots > len(self._free):
                raise NoStagingRoom(
                    f"need {num_slots} staging slots, {len(self._free)} free of {self.layout.num_blocks} "
                    "(raise --staging-gb)"
                )
            taken = [self._free.pop() for _ in range(num_slots)]
        return taken

    def free(self, slots: list[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def gather(self, block_ids: list[int], slots: list[int], layer_idx: int | None = None) -> None:
        """KV blocks -> host slots on every rank (one layer, or all with layer_idx None). Synchronous:
        when it returns, the bytes are in host memory (the device copy waits for the layer's kernels)."""
        if not block_ids:
            return
        s = torch.tensor(slots, dtype=torch.long)
        if len(self.kvs) > 1 and self.kvs[0].is_cuda:
            # the other ranks' KV is written on their own streams: once rank 0's stream has passed the
            # layer's all-reduce, every rank has written that layer (DESIGN §3)
            torch.cuda.current_stream(self.kvs[0].device).synchronize()
        for kv, host in zip(self.kvs, self.hosts, strict=True):
            b = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
            if layer_idx is None:
                src = kv[b] if self.block_major else kv[:, b].transpose(0, 1)
                host[s] = src.to("cpu")
            else:
                src = kv[b, layer_idx] if self.block_major else kv[layer_idx, b]
                host[s, layer_idx] = src.to("cpu")

    def scatter(self, block_ids: list[int], slots: list[int]) -> None:
        """Host slots -> KV blocks, every layer, every rank."""
        if not block_ids:
            return
        s = torch.tensor(slots, dtype=torch.long)
        for kv, host in zip(self.kvs, self.hosts, strict=True):
            b = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
            src = host[s].to(kv.device)
            if self.block_major:
                kv[b] = src
            else:
                kv[:, b] = src.transpose(0, 1)
            if kv.is_cuda and len(self.kvs) > 1:
                # the worker ranks read these blocks on their own streams, in their own processes
                torch.cuda.current_stream(kv.device).synchronize()
