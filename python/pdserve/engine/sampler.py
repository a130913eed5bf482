"""Picks the next token of each sequence from its logits: presence/frequency penalties, logit bias,
allowed token ids and min_tokens, then greedy, temperature, top-k, top-p, seeded. Also the model
runner's glue from a step's logits rows to its sequences (`sample_rows`, `sample_graph_rows`) and the
prompt log-probabilities (`prompt_logprobs`).

A seeded request draws its noise from a generator keyed by (seed, output position), so its tokens do
not depend on the batch it shares, nor on which instance (prefill or decode) samples them.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import TokenLogprobs

_POSITION_STRIDE = 1_000_003  # mixes the output position into the seed
PROMPT_LOGPROB_ROWS = 256  # rows of prompt logits made at once (each is vocab_size fp32 values)


@dataclass
class Sampled:
    """One step's sampling, per sequence of the batch: its new token (None: it sampled nothing) and,
    where its params ask for them, that token's log-probabilities (`logprobs` None: none asked)."""

    token_ids: list[int | None]
    logprobs: list[TokenLogprobs | None] | None = None
    # sequence index -> the log-probabilities of the prompt tokens its rows predicted this step, in
    # order (see StepInputs.prompt_logprob_rows); None: no sequence asked
    prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_positions: list[int],
    output_token_ids: list[Sequence[int] | None] | None = None,
) -> list[int]:
    """logits [B, V] fp32 (any device) -> B token ids. output_positions[i]: how many tokens row i has
    generated; output_token_ids[i]: those tokens, needed for the rows with penalties (else None)."""
    if any(p.has_penalties for p in params):
        logits = apply_penalties(logits, params, output_token_ids)
    if any(p.logit_bias for p in params):
        logits = apply_logit_bias(logits, params)
    if any(p.allowed_token_ids for p in params):
        logits = apply_allowed_token_ids(logits, params)
    if any(p.min_tokens_banned_ids for p in params):
        logits = apply_min_tokens(logits, params, output_positions)
    greedy_ids = logits.argmax(dim=-1)
    if all(p.is_greedy for p in params):
        return greedy_ids.tolist()
    result = greedy_ids.tolist()
    for row, p in enumerate(params):
        if p.is_greedy:
            continue
        scaled = logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            drop = cumulative - sorted_probs > p.top_p  # keep the smallest prefix reaching top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        generator = None
        if p.seed is not None:
            generator = torch.Generator(device=logits.device)
            generator.manual_seed((p.seed + _POSITION_STRIDE * output_positions[row]) % (2**63))
        noise = torch.empty_like(probs).exponential_(generator=generator)
        # argmax(p / Exp(1)) draws from p (the exponential-race form of categorical sampling)
        result[row] = int((probs / noise).argmax())
    return result


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    output_token_ids: list[Sequence[int] | None] | None,
) -> torch.Tensor:
    """A copy of logits [B, V] with row i's logit of token t lowered by frequency_penalty x (times t
    was generated) + presence_penalty x (t was generated at all), OpenAI's definition.
    output_token_ids[i]: row i's generated ids (a list, or an array('q') read without a copy per id),
    needed where params[i] has penalties. One count for the whole batch (ids flattened to row * V +
    id, one copy to the device, one scatter): a fixed number of kernels however many rows ask."""
    num_rows, vocab = logits.shape
    pieces = []
    for row, p in enumerate(params):
        if not p.has_penalties:
            continue
        generated = output_token_ids[row] if output_token_ids is not None else None
        if generated is None:
            raise ValueError(f"row {row} has penalties but its output token ids were not given")
        if len(generated):
            pieces.append(_long_tensor(generated) + row * vocab)
    out = logits.clone()
    if not pieces:
        return out
    dev = logits.device
    flat_ids = torch.cat(pieces).to(dev, non_blocking=True)
    counts = torch.zeros(num_rows * vocab, dtype=logits.dtype, device=dev)
    counts.scatter_add_(
        0, flat_ids, torch.ones((), dtype=logits.dtype, device=dev).expand_as(flat_ids)
    )
    counts = counts.view(num_rows, vocab)
    coefficients = torch.tensor(
        [[p.frequency_penalty, p.presence_penalty] for p in params], dtype=logits.dtype
    ).to(dev, non_blocking=True)
    out -= coefficients[:, :1] * counts + coefficients[:, 1:] * (counts > 0)
    return out


def _long_tensor(ids: Sequence[int]) -> torch.Tensor:
    """int64 CPU tensor of ids: an array('q') is read in place (the caller's arithmetic copies it)."""
    if isinstance(ids, array) and ids.typecode == "q":
        return torch.frombuffer(ids, dtype=torch.int64)
    return torch.tensor(list(ids), dtype=torch.long)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """A copy of logits [B, V] with row i's logit of each token in params[i].logit_bias raised by its
    bias (ids checked against the vocabulary when the request was added); one scatter for all rows."""
    vocab = logits.shape[-1]
    flat_ids: list[int] = []
    bias: list[float] = []
    for row, p in enumerate(params):
        if p.logit_bias:
            flat_ids += (row * vocab + t for t in p.logit_bias)
            bias += p.logit_bias.values()
    out = logits.clone()
    if flat_ids:
        dev = logits.device
        index = torch.tensor(flat_ids).to(dev, non_blocking=True)
        out.view(-1).index_add_(0, index, torch.tensor(bias, dtype=logits.dtype).to(dev))
    return out


def apply_allowed_token_ids(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """A copy of logits [B, V] where row i keeps only the logits of params[i].allowed_token_ids (the
    rest -inf; rows without the setting keep all); ids checked against the vocabulary when the
    request was added. One mask for the whole batch: the kept ids flattened to row * V + id."""
    num_rows, vocab = logits.shape
    dev = logits.device
    pieces = [
        torch.frombuffer(p.allowed_token_id_array, dtype=torch.int64) + row * vocab
        for row, p in enumerate(params)
        if p.allowed_token_id_array is not None
    ]
    keep = torch.zeros(num_rows * vocab, dtype=torch.bool, device=dev)
    if pieces:
        keep[torch.cat(pieces).to(dev, non_blocking=True)] = True
    keep = keep.view(num_rows, vocab)
    unrestricted = [row for row, p in enumerate(params) if p.allowed_token_id_array is None]
    if unrestricted:
        keep[torch.tensor(unrestricted).to(dev, non_blocking=True)] = True
    return logits.masked_fill(~keep, float("-inf"))


def apply_min_tokens(
    logits: torch.Tensor, params: list[SamplingParams], output_positions: list[int]
) -> torch.Tensor:
    """logits [B, V], or a copy where row i, having generated output_positions[i] < min_tokens tokens,
    has its `min_tokens_banned_ids` (stop and EOS ids, resolved by the engine) at -inf."""
    vocab = logits.shape[-1]
    flat_ids = [
        row * vocab + t
        for row, p in enumerate(params)
        if output_positions[row] < p.min_tokens
        for t in p.min_tokens_banned_ids
    ]
    if not flat_ids:
        return logits
    out = logits.clone()
    out.view(-1)[torch.tensor(flat_ids).to(logits.device, non_blocking=True)] = float("-inf")
    return out


def token_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], token_ids: list[int]
) -> list[TokenLogprobs | None] | None:
    """Per row of logits [B, V] (the raw ones, before `apply_penalties`): token_ids[row]'s
    log-probability and the top `params[row].logprobs`, where asked; None when no row asks."""
    rows = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return None
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor([[token_ids[r]] for r in rows], device=logp.device))
    k = max(params[r].logprobs for r in rows)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0])
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.long().tolist()
    out: list[TokenLogprobs | None] = [None] * len(params)
    for i, row in enumerate(rows):
        n = params[row].logprobs
        out[row] = TokenLogprobs(
            chosen[i][0], list(zip(top_ids[i][:n], top_values[i][:n], strict=True))
        )
    return out


def sample_graph_rows(
    logits: torch.Tensor,
    num_seqs: int,
    seq_indices: list[int],
    rows: list[int],
    params: list[SamplingParams],
    output_positions: list[int],
    output_token_ids: list[array | None] | None = None,
) -> Sampled:
    """Samples sequence seq_indices[k] from a replayed graph's logits[rows[k]] (rows increasing); the
    other sequences get None. With nothing to sample it waits for the replay instead: either way the
    step has ended when this returns, which the graphs' reused pinned inputs rely on (see
    DecodeGraphs)."""
    if not rows:
        torch.cuda.current_stream(logits.device).synchronize()
        return Sampled([None] * num_seqs)
    if len(rows) != logits.shape[0]:  # else rows are 0..n-1 (they increase)
        logits = logits[rows]
    return sample_rows(logits, num_seqs, seq_indices, params, output_positions, output_token_ids)


def sample_rows(
    logits: torch.Tensor,
    num_seqs: int,
    seq_indices: list[int],
    params: list[SamplingParams],
    output_positions: list[int],
    output_token_ids: list[array | None] | None,
) -> Sampled:
    """Sequence seq_indices[k] samples from logits[k] [K, V]; the others get None."""
    tokens = sample(logits, params, output_positions, output_token_ids)
    logprobs = token_logprobs(logits, params, tokens)
    result = Sampled([None] * num_seqs, None if logprobs is None else [None] * num_seqs)
    for k, i in enumerate(seq_indices):
        result.token_ids[i] = tokens[k]
        if logprobs is not None:
            result.logprobs[i] = logprobs[k]
    return result


def prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    rows: list[int],
    targets: list[int],
    seq_indices: list[int],
    ks: list[int],
    is_rank0: bool,
) -> dict[int, list[TokenLogprobs]] | None:
    """Prompt log-probabilities by sequence index: row rows[j] of hidden [T, H] predicts token
    targets[j] of sequence seq_indices[j], which wants its top ks[j] too (StepInputs.prompt_logprob_*).
    Logits are made PROMPT_LOGPROB_ROWS rows at a time (a 2,048-token prompt's whole [2048, V] fp32
    logits would be 1 GB for a 128k vocabulary) by `compute_logits`, which every tensor-parallel rank
    calls alike (it gathers); None on other ranks or when no row is asked."""
    if not rows:
        return None
    out: dict[int, list[TokenLogprobs]] = {}
    max_k = max(ks)
    for lo in range(0, len(rows), PROMPT_LOGPROB_ROWS):
        hi = min(lo + PROMPT_LOGPROB_ROWS, len(rows))
        idx = torch.tensor(rows[lo:hi], dtype=torch.long).to(hidden.device, non_blocking=True)
        logits = compute_logits(hidden.index_select(0, idx))
        if not is_rank0:
            continue
        lp = torch.log_softmax(logits.float(), dim=-1)
        target_ids = torch.tensor(targets[lo:hi], dtype=torch.long).to(lp.device)
        chosen = lp.gather(1, target_ids[:, None])[:, 0].tolist()
        top_ids: list[list[int]] = [[] for _ in chosen]
        top_lps: list[list[float]] = [[] for _ in chosen]
        if max_k:
            values, ids = lp.topk(max_k, dim=-1)
            top_ids, top_lps = ids.tolist(), values.tolist()
        for j in range(hi - lo):
            k = ks[lo + j]
            entry = TokenLogprobs(chosen[j], list(zip(top_ids[j][:k], top_lps[j][:k], strict=True)))
            out.setdefault(seq_indices[lo + j], []).append(entry)
    return out if is_rank0 else None
