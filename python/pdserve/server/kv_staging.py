"""Host staging of KV that lives on a GPU, for the transports that move host memory (TCP).

Without `--enable-direct` (SPEC §1) the KV goes GPU -> pinned host slots -> wire -> pinned host slots
-> GPU. A slot holds one block of every layer (`[num_slots, num_layers, *piece]`, block-major), so the
arena is itself a KV layout the transfer engine registers, and a block's position in a request maps to
one slot on each side. Gather and scatter run on the engine thread (they touch the KV tensor); slot
allocation is thread-safe. On a CPU instance staging is not needed, but it works the same (tests).
"""

from __future__ import annotations

import threading

import torch

from pdserve.transfer import KVLayout


class NoStagingRoom(RuntimeError):
    """Every staging slot is in use; nothing was taken."""


class StagingArena:
    def __init__(self, kv: torch.Tensor, block_major: bool, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"the staging arena needs at least one slot, got {num_slots}")
        self.kv = kv  # [L, B, *piece] (layer-major) or [B, L, *piece] (block-major), any device
        self.block_major = block_major
        num_layers = kv.shape[1] if block_major else kv.shape[0]
        piece_shape = tuple(kv.shape[2:])
        self.host = torch.empty(
            (num_slots, num_layers, *piece_shape), dtype=kv.dtype, pin_memory=kv.is_cuda
        )
        piece_nbytes = self.host[0, 0].numel() * self.host.element_size()
        self.layout = KVLayout.block_major(
            self.host.data_ptr(), num_layers, num_slots, piece_nbytes, "cpu"
        )
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
        """KV blocks -> host slots (one layer, or all with layer_idx None). Synchronous: when it
        returns, the bytes are in host memory (the device copy waits for the layer's kernels)."""
        if not block_ids:
            return
        b = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        s = torch.tensor(slots, dtype=torch.long)
        if layer_idx is None:
            src = self.kv[b] if self.block_major else self.kv[:, b].transpose(0, 1)
            self.host[s] = src.to("cpu")
        else:
            src = self.kv[b, layer_idx] if self.block_major else self.kv[layer_idx, b]
            self.host[s, layer_idx] = src.to("cpu")

    def scatter(self, block_ids: list[int], slots: list[int]) -> None:
        """Host slots -> KV blocks, every layer."""
        if not block_ids:
            return
        b = torch.tensor(block_ids, dtype=torch.long, device=self.kv.device)
        src = self.host[torch.tensor(slots, dtype=torch.long)].to(self.kv.device)
        if self.block_major:
            self.kv[b] = src
        else:
            self.kv[:, b] = src.transpose(0, 1)
