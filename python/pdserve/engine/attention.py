"""Paged attention: writes new K/V into the block-paged cache and attends over each sequence's blocks.

`TorchPagedAttention` is the reference path (CPU and GPU, via SDPA). A kernel (issue 5) replaces it
by implementing the same `forward(q, k, v, kv_layer, meta)`; the metadata is built once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    The batch is flattened: T tokens, B sequences, sequence i owning tokens
    [query_start_loc[i], query_start_loc[i+1]) of q/k/v.
    """

    slot_block_ids: torch.Tensor  # [T] int64, device: cache block of each new token
    slot_offsets: torch.Tensor  # [T] int64, device: offset of each new token inside its block
    block_tables: torch.Tensor  # [B, max_num_blocks] int64, device: padded with 0
    context_lens: torch.Tensor  # [B] int64, device: KV length of each sequence after this step
    query_start_loc: list[int]  # B + 1 host ints
    context_lens_host: list[int]  # B host ints
    block_size: int
    is_decode_only: bool  # every sequence has exactly one new token
    decode_plan: DecodePlan | None = None  # GPU: built by the first layer, shared by all layers


@dataclass
class DecodePlan:
    """The sequences of a step that have one new token and earlier context (GPU batched path)."""

    seq_indices: list[int]  # which sequences of the batch
    rows: torch.Tensor  # [B'] int64: their token rows in q
    block_tables: torch.Tensor  # [B', num_blocks] int64, num_blocks covering the longest context
    mask: torch.Tensor  # [B', 1, 1, num_blocks * block_size] bool: key position < context length


def write_kv(
    kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
) -> None:
    """kv_layer [num_blocks, 2, block_size, KVH, D] (a view; may be strided for block-major)."""
    kv_layer[meta.slot_block_ids, :, meta.slot_offsets] = torch.stack([k, v], dim=1)


def _gather_seq(kv_layer: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[2, num_tokens, KVH, D] of one sequence from its block ids."""
    pieces = kv_layer[block_ids]  # [nb, 2, bs, KVH, D]
    kv = pieces.transpose(0, 1).reshape(2, -1, *pieces.shape[-2:])
    return kv[:, :num_tokens]


class TorchPagedAttention:
    """Reference paged attention. Decode batches are attended in one padded SDPA call; prefill
    (possibly a chunk after a cached prefix) per sequence with exact lengths, so unwritten cache
    slots are never read."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H * D]; writes k/v into kv_layer first."""
        write_kv(kv_layer, k, v, meta)
        gqa = self.num_heads != self.num_kv_heads
        plan = None
        if (
            q.is_cuda
        ):  # one padded call for every single-token sequence (cache zeroed: padding is finite)
            if meta.decode_plan is None:
                meta.decode_plan = self._decode_plan(meta, q.device)
            plan = meta.decode_plan
            if meta.is_decode_only:
                return self._decode_padded(q, kv_layer, plan)
        batched = set(plan.seq_indices) if plan is not None else set()
        out = torch.empty_like(q)
        # sequences with no cached prefix attend to their fresh k/v (no gather), equal lengths in one call
        fresh: dict[int, list[int]] = {}
        for i, ctx in enumerate(meta.context_lens_host):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            q_len = end - start
            if q_len == ctx:
                fresh.setdefault(q_len, []).append(start)
                continue
            if i in batched:
                continue
            num_blocks = -(-ctx // meta.block_size)
            kv = _gather_seq(kv_layer, meta.block_tables[i, :num_blocks], ctx)
            qi = q[start:end].transpose(0, 1)  # [H, q_len, D]
            ki, vi = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # [KVH, ctx, D]
            # query j sits at position ctx - q_len + j and sees keys 0 .. that position
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)[:, None]
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos
            oi = F.scaled_dot_product_attention(
                qi, ki, vi, attn_mask=mask, scale=self.scale, enable_gqa=gqa
            )
            out[start:end] = oi.transpose(0, 1)
        for length, starts in fresh.items():
            rows = torch.cat([torch.arange(s0, s0 + length) for s0 in starts]).to(q.device)
            # [G, heads, length, D]
            qg, kg, vg = (
                x.index_select(0, rows).view(len(starts), length, *x.shape[1:]).transpose(1, 2)
                for x in (q, k, v)
            )
            og = F.scaled_dot_product_attention(
                qg, kg, vg, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
            out.index_copy_(0, rows, og.transpose(1, 2).reshape(-1, *q.shape[1:]))
        if batched:
            dec = self._decode_padded(q.index_select(0, plan.rows), kv_layer, plan)
            out.index_copy_(0, plan.rows, dec.view(-1, *q.shape[1:]))
        return out.reshape(q.shape[0], -1)

    @staticmethod
    def _decode_plan(meta: AttentionMetadata, device: torch.device) -> DecodePlan:
        qsl, ctx_host = meta.query_start_loc, meta.context_lens_host
        idx = [i for i, ctx in enumerate(ctx_host) if qsl[i + 1] - qsl[i] == 1 and ctx > 1]
        if meta.is_decode_only:
            idx = list(range(len(ctx_host)))
        if not idx:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return DecodePlan([], empty, empty, empty)
        num_blocks = -(-max(ctx_host[i] for i in idx) // meta.block_size)
        host = torch.tensor([[qsl[i] for i in idx], idx], dtype=torch.long).to(device)
        tables = meta.block_tables.index_select(0, host[1])[:, :num_blocks]
        ctx = meta.context_lens.index_select(0, host[1])
        keys = torch.arange(num_blocks * meta.block_size, device=device)
        return DecodePlan(idx, host[0], tables, (keys[None, :] < ctx[:, None])[:, None, None, :])

    def _decode_padded(
        self, q: torch.Tensor, kv_layer: torch.Tensor, plan: DecodePlan
    ) -> torch.Tensor:
        """q [B', H, D] (one query per sequence) -> [B', H * D]; keys padded to the longest context."""
        num_seqs = q.shape[0]
        pieces = kv_layer[plan.block_tables]  # [B', nb, 2, bs, KVH, D]
        kv = pieces.permute(2, 0, 4, 1, 3, 5).reshape(
            2, num_seqs, self.num_kv_heads, -1, self.head_dim
        )
        # GQA without expanding K/V: the G = H / KVH query heads sharing a kv head become G queries
        # of that head (head h uses kv head h // G), so SDPA keeps its fused kernels
        group = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(num_seqs, self.num_kv_heads, group, self.head_dim),  # [B', KVH, G, D]
            kv[0],
            kv[1],
            attn_mask=plan.mask,
            scale=self.scale,
        )
        return out.reshape(num_seqs, -1)


def causal_attention_no_cache(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain causal attention of one sequence without a cache (memory profiling). q [T, H, D] -> [T, H*D]."""
    gqa = q.shape[1] != k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        is_causal=True,
        scale=scale,
        enable_gqa=gqa,
    )
    return out.transpose(0, 1).reshape(q.shape[0], -1)
