"""Where each KV piece lives in memory (DESIGN §2): the one `KVLayout` the engine returns and the
transfer engine moves bytes by.

It stays apart from `pdserve.transfer` (whose package import loads the native `_transfer` extension)
and from torch, so the engine imports it without either; `pdserve.transfer` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

LAYER_MAJOR = "layer-major"
BLOCK_MAJOR = "block-major"


@dataclass(frozen=True)
class KVLayout:
    """Where the KV piece of (layer l, block b) lives: `base_addr + l * layer_stride_nbytes +
    b * block_stride_nbytes`, `piece_nbytes` contiguous bytes (K then V of one block in one layer).

    layer-major `[L, B, 2, bs, h, d]`: layer_stride = B * piece, block_stride = piece.
    block-major `[B, L, 2, bs, h, d]`: layer_stride = piece, block_stride = L * piece.
    """

    base_addr: int
    nbytes: int
    num_layers: int
    num_blocks: int
    piece_nbytes: int
    layer_stride_nbytes: int
    block_stride_nbytes: int
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("base_addr", "nbytes", "num_layers", "num_blocks", "piece_nbytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"KVLayout.{name} must be > 0, got {getattr(self, name)}")
        if self.layer_stride_nbytes < 0 or self.block_stride_nbytes < 0:
            raise ValueError("KVLayout strides must be >= 0")
        end = (
            (self.num_layers - 1) * self.layer_stride_nbytes
            + (self.num_blocks - 1) * self.block_stride_nbytes
            + self.piece_nbytes
        )
        if end > self.nbytes:
            raise ValueError(
                f"KVLayout: the last piece ends at byte {end}, past nbytes={self.nbytes}"
            )

    @classmethod
    def layer_major(
        cls,
        base_addr: int,
        num_layers: int,
        num_blocks: int,
        piece_nbytes: int,
        device: str = "cpu",
    ) -> KVLayout:
        nbytes = num_layers * num_blocks * piece_nbytes
        return cls(
            base_addr, nbytes, num_layers, num_blocks, piece_nbytes,
            num_blocks * piece_nbytes, piece_nbytes, device,
        )  # fmt: skip

    @classmethod
    def block_major(
        cls,
        base_addr: int,
        num_layers: int,
        num_blocks: int,
        piece_nbytes: int,
        device: str = "cpu",
    ) -> KVLayout:
        nbytes = num_layers * num_blocks * piece_nbytes
        return cls(
            base_addr, nbytes, num_layers, num_blocks, piece_nbytes,
            piece_nbytes, num_layers * piece_nbytes, device,
        )  # fmt: skip

    @classmethod
    def from_tensor(cls, kv: Any, layout: str = LAYER_MAJOR) -> KVLayout:
        """Layout of a contiguous KV tensor shaped `[L, B, ...]` (layer-major) or `[B, L, ...]`
        (block-major); duck-typed on torch.Tensor / numpy.ndarray."""
        if layout not in (LAYER_MAJOR, BLOCK_MAJOR):
            raise ValueError(f"layout must be {LAYER_MAJOR!r} or {BLOCK_MAJOR!r}, got {layout!r}")
        if hasattr(kv, "data_ptr"):
            if not kv.is_contiguous():
                raise ValueError("KVLayout.from_tensor: tensor must be contiguous")
            addr, itemsize, device = kv.data_ptr(), kv.element_size(), str(kv.device)
        else:
            if not kv.flags.c_contiguous:
                raise ValueError("KVLayout.from_tensor: array must be C-contiguous")
            addr, itemsize, device = kv.ctypes.data, kv.itemsize, "cpu"
        shape = tuple(kv.shape)
        if len(shape) < 3:
            raise ValueError(f"KVLayout.from_tensor: need >= 3 dims, got shape {shape}")
        piece_nbytes = math.prod(shape[2:]) * itemsize
        if layout == LAYER_MAJOR:
            return cls.layer_major(addr, shape[0], shape[1], piece_nbytes, device)
        return cls.block_major(addr, shape[1], shape[0], piece_nbytes, device)

    def piece_addr(self, layer_idx: int, block_id: int) -> int:
        return (
            self.base_addr
            + layer_idx * self.layer_stride_nbytes
            + block_id * self.block_stride_nbytes
        )

    def request_nbytes(self, num_blocks: int) -> int:
        """Bytes of `num_blocks` blocks over all layers."""
        return self.num_layers * num_blocks * self.piece_nbytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        return cls(**d)
