"""Building blocks of the Llama model: tensor-parallel linears and embeddings, RMSNorm, rotary embedding.

Linears are column/row-parallel: with tp_size > 1 each rank holds its slice, row-parallel outputs are
all-reduced and the vocab-parallel logits gathered to rank 0, over the group the runner activated
(`distributed.use_group`). Each parameter carries a `weight_loader(param, loaded_weight[, shard_id])`
that copies this rank's slice of a checkpoint tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pdserve.engine import distributed
from pdserve.ops.linear import linear


def _tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        distributed.active_group().all_reduce(x)
    return x


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} != expected {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split along its output rows: rank r holds rows [r*out/tp, (r+1)*out/tp)."""

    def __init__(self, in_features: int, out_features: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        if out_features % tp_size:
            raise ValueError(f"out_features {out_features} not divisible by tp_size {tp_size}")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.weight = nn.Parameter(torch.empty(out_features // tp_size, in_features))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears sharing one input, fused into one GEMM (gate_proj + up_proj)."""

    def __init__(
        self, in_features: int, output_sizes: list[int], tp_size: int = 1, tp_rank: int = 0
    ):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        shard_rows = self.output_sizes[shard_id] // self.tp_size
        start = sum(self.output_sizes[:shard_id]) // self.tp_size
        src = loaded.narrow(0, self.tp_rank * shard_rows, shard_rows)
        param.data.narrow(0, start, shard_rows).copy_(src)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj, v_proj in one GEMM; heads split across ranks (kv heads replicated if fewer than tp)."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        tp_size: int = 1,
        tp_rank: int = 0,
    ):
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads {num_heads} not divisible by tp_size {tp_size}")
        self.head_dim = head_dim
        self.num_heads_per_rank = num_heads // tp_size
        self.num_kv_heads = num_kv_heads
        self.num_kv_heads_per_rank = max(1, num_kv_heads // tp_size)
        out = (self.num_heads_per_rank + 2 * self.num_kv_heads_per_rank) * head_dim * tp_size
        super().__init__(hidden_size, out, tp_size, tp_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q_rows = self.num_heads_per_rank * self.head_dim
        kv_rows = self.num_kv_heads_per_rank * self.head_dim
        start, rows = {"q": (0, q_rows), "k": (q_rows, kv_rows), "v": (q_rows + kv_rows, kv_rows)}[
            shard_id
        ]
        rank_slot = self.tp_rank
        if shard_id != "q" and self.num_kv_heads < self.tp_size:
            # fewer kv heads than ranks: each kv head is replicated on tp_size // num_kv_heads ranks
            rank_slot = self.tp_rank * self.num_kv_heads // self.tp_size
        src = loaded.narrow(0, rank_slot * rows, rows)
        param.data.narrow(0, start, rows).copy_(src)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split along its input columns; partial sums are all-reduced across ranks."""

    def __init__(self, in_features: int, out_features: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        if in_features % tp_size:
            raise ValueError(f"in_features {in_features} not divisible by tp_size {tp_size}")
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        cols = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tp_all_reduce(linear(x, self.weight), self.tp_size)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks (rows outside a rank's range read as 0)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__()
        self.tp_size, self.tp_rank = tp_size, tp_rank
        self.vocab_per_rank = math.ceil(vocab_size / tp_size)
        self.vocab_start = tp_rank * self.vocab_per_rank
        self.weight = nn.Parameter(torch.empty(self.vocab_per_rank, hidden_size))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = min(self.vocab_per_rank, loaded.shape[0] - self.vocab_start)
        param.data.zero_()
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return _tp_all_reduce(out * in_range.unsqueeze(-1).to(out.dtype), self.tp_size)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits over the vocabulary; each rank computes its slice, gathered to full width on rank 0
    (the rank that samples); other ranks get an empty [N, 0] tensor."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_size: int = 1, tp_rank: int = 0):
        super().__init__(vocab_size, hidden_size, tp_size, tp_rank)
        self.vocab_size = vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = F.linear(hidden, self.weight)
        if self.tp_size > 1:
            logits = distributed.active_group().gather_last_dim(logits)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in fp32 like the reference implementation, cast back before the scale."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel (fp32 accumulation) instead of seven
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] fp32, with linear or llama3 (Llama 3.1) scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are divided by factor, short ones kept, the middle band interpolated
    low_ff, high_ff = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Applies RoPE (rotate-half convention) to q [T, H, D] and k [T, KVH, D] at positions [T]."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, D] fp32
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for positions [T]; computed once per forward and shared by all layers."""
        return (
            self.cos_cached[positions].to(dtype).unsqueeze(1),
            self.sin_cached[positions].to(dtype).unsqueeze(1),
        )

    def forward(self, cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (q and k heads side by side) rotated by cos_sin (from cos_sin())."""
        cos, sin = cos_sin
        return x * cos + self._rotate_half(x) * sin
