"""Tensor-parallel weight loading, checked without processes: the shards two ranks load recombine to
the full layer (column-parallel outputs concatenate, row-parallel partial sums add up), GQA included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pdserve.engine.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, tp_size", [(4, 4, 2), (4, 2, 2), (4, 1, 2), (8, 2, 4)]
)
def test_qkv_shards_recombine(num_heads, num_kv_heads, tp_size):
    torch.manual_seed(0)
    hidden, head_dim = 16, 4
    wq = torch.randn(num_heads * head_dim, hidden)
    wk, wv = torch.randn(2, num_kv_heads * head_dim, hidden)
    x = torch.randn(3, hidden)
    q_parts, k_heads = [], []
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, tp_size, rank)
        for shard, w in (("q", wq), ("k", wk), ("v", wv)):
            layer.weight_loader(layer.weight, w, shard)
        q_size = layer.num_heads_per_rank * head_dim
        kv_size = layer.num_kv_heads_per_rank * head_dim
        q, k, _ = layer(x).split([q_size, kv_size, kv_size], dim=-1)
        q_parts.append(q)
        k_heads.append(k)
    torch.testing.assert_close(torch.cat(q_parts, -1), x @ wq.T)
    full_k = (x @ wk.T).view(3, num_kv_heads, head_dim)
    for rank, k in enumerate(k_heads):
        # rank r's query heads are [r*H/tp, (r+1)*H/tp); they need kv head (first q head) // (H / KVH)
        first_kv = rank * (num_heads // tp_size) // (num_heads // num_kv_heads)
        expected = full_k[:, first_kv : first_kv + k.shape[-1] // head_dim].reshape(3, -1)
        torch.testing.assert_close(k, expected)


def test_mlp_shards_recombine():
    torch.manual_seed(0)
    hidden, inter, tp_size = 8, 12, 2
    w_gate, w_up = torch.randn(2, inter, hidden)
    w_down = torch.randn(hidden, inter)
    x = torch.randn(5, hidden)
    full = F.linear(F.silu(x @ w_gate.T) * (x @ w_up.T), w_down)
    total = torch.zeros_like(full)
    for rank in range(tp_size):
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], tp_size, rank)
        gate_up.weight_loader(gate_up.weight, w_gate, 0)
        gate_up.weight_loader(gate_up.weight, w_up, 1)
        down = RowParallelLinear(inter, hidden, tp_size, rank)
        down.weight_loader(down.weight, w_down)
        gate, up = gate_up(x).chunk(2, dim=-1)
        total += F.linear(F.silu(gate) * up, down.weight)  # the partial sum all_reduce would add
    torch.testing.assert_close(total, full)
