"""Paged attention: writes new K/V into the block-paged cache and attends over each sequence's blocks.

`TorchPagedAttention` is the reference path (CPU and GPU, via SDPA). `TritonPagedAttention` is the GPU
fast path (issue 5): RoPE fused with the KV write, the split-K paged decode kernel, the paged prefill
kernel for chunks after a cached prefix; it needs no host data in decode-only steps, so CUDA graphs can
capture it. Both implement `forward(q, k, v, kv_layer, meta)`; the metadata is built once per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pdserve.ops.paged_decode import DecodeWork


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what each sequence attends to.

    The batch is flattened: T tokens, B sequences, sequence i owning tokens
    [query_start_loc[i], query_start_loc[i+1]) of q/k/v.
    """

    slot_block_ids: torch.Tensor | None  # [T] int64, device: cache block of each new token
    slot_offsets: (
        torch.Tensor | None
    )  # [T] int64, device: offset of each new token inside its block
    block_tables: torch.Tensor  # [B, max_num_blocks] int64, device: padded with 0
    context_lens: torch.Tensor  # [B] int64, device: KV length of each sequence after this step
    query_start_loc: list[int]  # B + 1 host ints
    context_lens_host: list[int]  # B host ints
    block_size: int
    is_decode_only: bool  # every sequence has exactly one new token
    decode_plan: DecodePlan | None = None  # GPU: built by the first layer, shared by all layers
    positions: torch.Tensor | None = (
        None  # [T] int64, device: position of each new token (fused RoPE)
    )
    kernel: KernelInputs | None = None  # Triton backend: built by the first layer (or a CUDA graph)


@dataclass
class KernelInputs:
    """Index tensors in the layouts the Triton kernels take; built once per step, shared by all layers.
    In a captured CUDA graph these are the graph's static buffers, refilled before every replay."""

    slot_mapping: (
        torch.Tensor
    )  # [T] int64: block_id * block_size + offset; -1 = padding, not stored
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: KV length of each sequence after this step
    max_seq_len: int  # host bound on seq_lens: sizes the decode kernel's context split
    # the decode kernel's work list (ops/paged_decode.py DecodeWork) or None: a prompt-chunk CUDA
    # graph's rows read their context once per tile of rows
    work: DecodeWork | None = None


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


class TritonPagedAttention(TorchPagedAttention):
    """GPU fast path. `forward` takes q and k *before* RoPE (`fuses_rope`): one kernel rotates q and k
    in place and writes k, v into the cache. Decode-only steps are two more launches (split-K decode and
    its reduction) and read nothing from the host; mixed steps route single-token sequences to the decode
    kernel, sequences with a cached prefix to the paged prefill kernel (one launch), and fresh prompts to
    SDPA's flash kernel (no cache read)."""

    fuses_rope = True

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rope_cos_sin: Callable):
        super().__init__(num_heads, num_kv_heads, head_dim)
        self._rope_cos_sin = rope_cos_sin  # () -> [max_position, head_dim] fp32 (cos | sin halves)

    @staticmethod
    def kernel_inputs(meta: AttentionMetadata) -> KernelInputs:
        """Builds (once per step) the kernels' index tensors from the eager metadata."""
        if meta.kernel is None:
            meta.kernel = KernelInputs(
                slot_mapping=meta.slot_block_ids * meta.block_size + meta.slot_offsets,
                block_tables=meta.block_tables.to(torch.int32),
                seq_lens=meta.context_lens.to(torch.int32),
                max_seq_len=max(meta.context_lens_host),
            )
        return meta.kernel

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_layer: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] (unrotated; q and k are rotated in place) -> [T, H * D]."""
        from pdserve.ops.fused import rope_and_store_kv
        from pdserve.ops.paged_decode import paged_decode_attention

        ki = self.kernel_inputs(meta)
        k_cache, v_cache = kv_layer[:, 0], kv_layer[:, 1]  # [num_blocks, block_size, KVH, D] views
        rope_and_store_kv(
            q, k, v, meta.positions, self._rope_cos_sin(), k_cache, v_cache, ki.slot_mapping
        )
        num_tokens = q.shape[0]
        out = torch.empty(
            (num_tokens, self.num_heads, self.head_dim), dtype=q.dtype, device=q.device
        )
        if meta.is_decode_only:
            paged_decode_attention(
                q,
                k_cache,
                v_cache,
                ki.block_tables,
                ki.seq_lens,
                self.scale,
                ki.max_seq_len,
                out=out,
                work=ki.work,
            )
            return out.view(num_tokens, -1)
        self._mixed(q, k, v, k_cache, v_cache, meta, ki, out)
        return out.view(num_tokens, -1)

    def _mixed(self, q, k, v, k_cache, v_cache, meta, ki, out) -> None:
        from pdserve.ops.paged_decode import paged_decode_attention
        from pdserve.ops.paged_prefill import paged_prefill_attention

        qsl, ctx_host = meta.query_start_loc, meta.context_lens_host
        decode, prefix, fresh = [], [], []
        for i, ctx in enumerate(ctx_host):
            q_len = qsl[i + 1] - qsl[i]
            (fresh if q_len == ctx else decode if q_len == 1 else prefix).append(i)
        gqa = self.num_heads != self.num_kv_heads
        for i in fresh:  # no cached prefix: causal attention over the fresh k/v (flash kernel)
            s0, s1 = qsl[i], qsl[i + 1]
            # contiguous [1, heads, len, D]: rows of the fused qkv tensor would send SDPA to its
            # unfused math kernel (seen: prefill 2.3x slower)
            qf, kf, vf = (x[s0:s1].contiguous().unsqueeze(0).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(
                qf, kf, vf, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
            out[s0:s1] = o[0].transpose(0, 1)
        if decode:
            seqs = torch.tensor(decode, dtype=torch.long).to(q.device, non_blocking=True)
            rows = torch.tensor([qsl[i] for i in decode], dtype=torch.long).to(q.device)
            o = paged_decode_attention(
                q.index_select(0, rows),
                k_cache,
                v_cache,
                ki.block_tables.index_select(0, seqs),
                ki.seq_lens.index_select(0, seqs),
                self.scale,
                max(ctx_host[i] for i in decode),
            )
            out.index_copy_(0, rows, o)
        if prefix:
            seqs = torch.tensor(prefix, dtype=torch.long).to(q.device, non_blocking=True)
            rows_host = [r for i in prefix for r in range(qsl[i], qsl[i + 1])]
            cu = [0]
            for i in prefix:
                cu.append(cu[-1] + qsl[i + 1] - qsl[i])
            rows = torch.tensor(rows_host, dtype=torch.long).to(q.device)
            o = paged_prefill_attention(
                q.index_select(0, rows),
                k_cache,
                v_cache,
                ki.block_tables.index_select(0, seqs),
                torch.tensor(cu, dtype=torch.int32).to(q.device),
                ki.seq_lens.index_select(0, seqs),
                self.scale,
                max(qsl[i + 1] - qsl[i] for i in prefix),
            )
            out.index_copy_(0, rows, o)


def triton_attention_available(device: torch.device, head_dim: int) -> bool:
    """True when the Triton backend can run here: a CUDA device, Triton installed, a supported head_dim."""
    if device.type != "cuda" or head_dim not in (16, 32, 64, 128, 256):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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
