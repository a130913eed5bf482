"""The paged attention reference against plain causal attention over whole sequences: equal and
ragged lengths, cached prefixes (chunks), GQA ratios, both KV layouts. A kernel must pass the same."""

from __future__ import annotations

import pytest
import torch
from pdserve.engine.attention import AttentionMetadata, TorchPagedAttention


def _naive(q, k, v, scale):
    """q [L, H, D], k/v [L, KVH, D] of one whole sequence, causal."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)


MIXED = [(7, 0), (7, 0), (5, 0), (13, 8), (9, 8), (6, 5), (10, 9)]  # fresh, chunks, decodes
DECODES = [(6, 5), (10, 9), (17, 16), (1, 0)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("seqs", [MIXED, DECODES], ids=["mixed", "decodes"])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("layout", ["layer-major", "block-major"])
def test_paged_attention_matches_naive(num_heads, num_kv_heads, layout, seqs, device):
    """seqs: (total length, tokens already cached) per sequence."""
    torch.manual_seed(0)
    head_dim, block_size, num_blocks, num_layers = 8, 4, 40, 2
    shape = (2, block_size, num_kv_heads, head_dim)
    if layout == "layer-major":
        kv = torch.zeros(num_layers, num_blocks, *shape, device=device)
        kv_layer = kv[1]
    else:
        kv = torch.zeros(num_blocks, num_layers, *shape, device=device)
        kv_layer = kv[:, 1]
    attn = TorchPagedAttention(num_heads, num_kv_heads, head_dim)
    full = [
        (
            torch.randn(n, num_heads, head_dim),
            torch.randn(n, num_kv_heads, head_dim),
            torch.randn(n, num_kv_heads, head_dim),
        )
        for n, _ in seqs
    ]
    free = list(range(num_blocks))[::-1]
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n, _ in seqs]
    for (_n, cached), (_, k, v), table in zip(
        seqs, full, tables, strict=True
    ):  # the cached prefixes
        for t in range(cached):
            kv_layer[table[t // block_size], 0, t % block_size] = k[t]
            kv_layer[table[t // block_size], 1, t % block_size] = v[t]
    qs, ks, vs, blocks, offsets, starts = [], [], [], [], [], [0]
    for (n, cached), (q, k, v), table in zip(seqs, full, tables, strict=True):
        qs.append(q[cached:]), ks.append(k[cached:]), vs.append(v[cached:])
        blocks += [table[t // block_size] for t in range(cached, n)]
        offsets += [t % block_size for t in range(cached, n)]
        starts.append(starts[-1] + n - cached)
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_block_ids=torch.tensor(blocks),
        slot_offsets=torch.tensor(offsets),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        context_lens=torch.tensor([n for n, _ in seqs]),
        query_start_loc=starts,
        context_lens_host=[n for n, _ in seqs],
        block_size=block_size,
        is_decode_only=all(n - cached == 1 for n, cached in seqs),
    )
    dev = torch.device(device)
    for name in ("slot_block_ids", "slot_offsets", "block_tables", "context_lens"):
        setattr(meta, name, getattr(meta, name).to(dev))
    out = attn.forward(
        torch.cat(qs).to(dev), torch.cat(ks).to(dev), torch.cat(vs).to(dev), kv_layer, meta
    ).cpu()
    for i, ((n, cached), (q, k, v)) in enumerate(zip(seqs, full, strict=True)):
        expected = _naive(q, k, v, attn.scale)[cached:].reshape(n - cached, -1)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected, rtol=1e-5, atol=1e-5)
