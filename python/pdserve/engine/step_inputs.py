"""One step's batch as host lists (StepInputs): built once by the driver from the scheduled batch,
picklable, so tensor-parallel workers run the very same step (see ModelRunner.execute).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledBatch


@dataclass
class StepInputs:
    """One step's batch as host lists: everything a rank needs to run it (the driver builds it once)."""

    input_ids: list[int]  # [T]
    positions: list[int]  # [T]
    slot_blocks: list[int]  # [T] cache block of each new token
    slot_offsets: list[int]  # [T] offset inside that block
    context_lens: list[int]  # [B] KV length after this step
    query_start_loc: list[int]  # [B + 1]
    block_tables: list[list[int]]  # [B][max_blocks], padded with 0
    sample_seq_indices: list[int]  # sequences that sample this step
    sample_rows: list[int]  # their last token's row in the flattened batch
    sampling_params: list[SamplingParams]  # per sampling sequence
    output_positions: list[int]  # per sampling sequence: tokens it has generated so far
    is_decode_only: bool
    # replay the decode CUDA graphs (the driver decides, so every tensor-parallel rank does the same)
    use_graph: bool = False
    # per sampling sequence: its generated tokens where its penalties need them, else None
    output_token_ids: list[array | None] | None = None
    # prompt log-probabilities: rows whose next token is a prompt token of a sequence that asked
    # (SamplingParams.prompt_logprobs), with that token, the sequence's index and its top-k
    prompt_logprob_rows: list[int] = field(default_factory=list)
    prompt_logprob_targets: list[int] = field(default_factory=list)
    prompt_logprob_seq_indices: list[int] = field(default_factory=list)
    prompt_logprob_ks: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


def build_step_inputs(batch: ScheduledBatch, block_size: int) -> StepInputs:
    """The batch as host lists (no torch): what ModelRunner.execute() needs on every rank."""
    bs = block_size
    input_ids: list[int] = []
    positions: list[int] = []
    slot_blocks: list[int] = []
    slot_offsets: list[int] = []
    query_start_loc = [0]
    context_lens: list[int] = []
    sample_rows: list[int] = []
    sample_seq_indices: list[int] = []
    lp_rows: list[int] = []
    lp_targets: list[int] = []
    lp_seqs: list[int] = []
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
        start = seq.num_computed_tokens
        if seq.wants_prompt_logprobs:
            # the row at position p predicts token p + 1: rows for the tokens without an entry
            first = max(start, len(seq.prompt_logprobs) - 1)
            for p in range(first, min(start + n, seq.num_prompt_tokens - 1)):
                lp_rows.append(query_start_loc[-1] + p - start)
                lp_targets.append(seq.token_ids[p + 1])
                lp_seqs.append(i)
        input_ids.extend(seq.token_ids[start : start + n])
        span = range(start, start + n)
        positions.extend(span)
        slot_blocks.extend(seq.block_ids[t // bs] for t in span)
        slot_offsets.extend(t % bs for t in span)
        query_start_loc.append(query_start_loc[-1] + n)
        context_lens.append(start + n)
        if batch.samples(i):
            sample_rows.append(query_start_loc[-1] - 1)
            sample_seq_indices.append(i)
    max_blocks = max(-(-c // bs) for c in context_lens)
    tables = [
        seq.block_ids[:max_blocks] + [0] * (max_blocks - len(seq.block_ids[:max_blocks]))
        for seq in batch.seqs
    ]
    return StepInputs(
        input_ids=input_ids,
        positions=positions,
        slot_blocks=slot_blocks,
        slot_offsets=slot_offsets,
        context_lens=context_lens,
        query_start_loc=query_start_loc,
        block_tables=tables,
        sample_seq_indices=sample_seq_indices,
        sample_rows=sample_rows,
        sampling_params=[batch.seqs[i].params for i in sample_seq_indices],
        output_positions=[batch.seqs[i].output_position for i in sample_seq_indices],
        is_decode_only=all(n == 1 for n in batch.num_new_tokens),
        output_token_ids=penalised_outputs([batch.seqs[i] for i in sample_seq_indices]),
        prompt_logprob_rows=lp_rows,
        prompt_logprob_targets=lp_targets,
        prompt_logprob_seq_indices=lp_seqs,
        prompt_logprob_ks=[batch.seqs[i].params.prompt_logprobs for i in lp_seqs],
    )


def penalised_outputs(seqs) -> list[array | None] | None:
    """Per sequence: its generated token ids (array('q')) where its penalties need them, else None
    (None for all: no sequence has penalties, the common case, which then costs nothing)."""
    if not any(seq.params.has_penalties for seq in seqs):
        return None
    return [seq.output_id_array() if seq.params.has_penalties else None for seq in seqs]
