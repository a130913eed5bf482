"""Which bytes of the KV cache go where: (local_addr, remote_addr, nbytes) pieces from two KV layouts.

DESIGN §2: the piece of (layer l, block b) starts at `base + l * layer_stride + b * block_stride` and is
`piece_nbytes` long in both layouts. Adjacent pieces that are contiguous on both sides merge, so a
block-major (`--use-agg-block`) whole-request transfer becomes one piece per run of consecutive blocks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayoutInfo:
    """A KV layout as it crosses the wire (the fields of the engine's `KVLayout`)."""

    base_addr: int
    nbytes: int
    num_layers: int
    num_blocks: int
    piece_nbytes: int
    layer_stride_nbytes: int
    block_stride_nbytes: int
    device: str = "cpu"

    @classmethod
    def from_any(cls, obj) -> LayoutInfo:
        get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
        return cls(
            base_addr=int(get("base_addr")),
            nbytes=int(get("nbytes")),
            num_layers=int(get("num_layers")),
            num_blocks=int(get("num_blocks")),
            piece_nbytes=int(get("piece_nbytes")),
            layer_stride_nbytes=int(get("layer_stride_nbytes")),
            block_stride_nbytes=int(get("block_stride_nbytes")),
            device=str(get("device", "cpu")),
        )

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def piece_addr(self, layer_idx: int, block_id: int) -> int:
        if not (0 <= layer_idx < self.num_layers and 0 <= block_id < self.num_blocks):
            raise ValueError(
                f"piece (layer {layer_idx}, block {block_id}) out of range: "
                f"{self.num_layers} layers, {self.num_blocks} blocks"
            )
        return (
            self.base_addr
            + layer_idx * self.layer_stride_nbytes
            + block_id * self.block_stride_nbytes
        )

    def compatible_with(self, other: LayoutInfo) -> str | None:
        """None when KV can move between the two; else why not (for people)."""
        if self.piece_nbytes != other.piece_nbytes or self.num_layers != other.num_layers:
            return (
                f"KV shapes differ: {self.num_layers} layers x {self.piece_nbytes} B per piece here, "
                f"{other.num_layers} x {other.piece_nbytes} B on the peer (same model, dtype and block size needed)"
            )
        return None


Piece = tuple[int, int, int]  # (local_addr, remote_addr, nbytes)


def build_pieces(
    local: LayoutInfo,
    remote: LayoutInfo,
    layer_ids: list[int],
    local_block_ids: list[int],
    remote_block_ids: list[int],
) -> list[Piece]:
    """Pieces copying `local_block_ids[i]` to `remote_block_ids[i]` for every listed layer, merged."""
    if len(local_block_ids) != len(remote_block_ids):
        raise ValueError(
            f"block lists differ in length: {len(local_block_ids)} local vs {len(remote_block_ids)} remote"
        )
    n = local.piece_nbytes
    raw = [
        (local.piece_addr(layer, lb), remote.piece_addr(layer, rb), n)
        for layer in layer_ids
        for lb, rb in zip(local_block_ids, remote_block_ids, strict=True)
    ]
    return merge_pieces(raw)


def merge_pieces(pieces: list[Piece]) -> list[Piece]:
    """Merge pieces contiguous on both sides (order by local address first)."""
    merged: list[list[int]] = []
    for local_addr, remote_addr, nbytes in sorted(pieces):
        if merged:
            last = merged[-1]
            if last[0] + last[2] == local_addr and last[1] + last[2] == remote_addr:
                last[2] += nbytes
                continue
        merged.append([local_addr, remote_addr, nbytes])
    return [tuple(p) for p in merged]
