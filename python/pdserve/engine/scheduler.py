"""Continuous batching: each step picks which sequences compute how many tokens, within the token and
sequence budgets, growing their blocks and preempting (by recompute) when blocks run out.

Prefill, chunked prefill and decode are one thing here: a step computes tokens
[num_computed_tokens, num_computed_tokens + n) of a sequence, and samples when that reaches its end.
Running sequences go first (oldest first), then waiting ones (FIFO). No torch: tests drive it on ints.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.sequence import (
    FINISH_LENGTH,
    FINISH_PREFILLED,
    FINISH_STOP,
    RequestMode,
    Sequence,
    SequenceStatus,
    TokenLogprobs,
)


@dataclass
class ScheduledBatch:
    """seqs[i] computes num_new_tokens[i] tokens from its num_computed_tokens on."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def samples(self, i: int) -> bool:
        """True when seqs[i]'s chunk reaches its last token, so the step samples a next token for it."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        eos_token_ids: list[int],
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool,
    ):
        self.block_manager = block_manager
        self.eos_token_ids = set(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_computed_prefill_tokens = 0  # prompt tokens actually computed (not cache hits)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -----------------------------------------------------------------------------
    def schedule(self) -> tuple[ScheduledBatch, list[Sequence]]:
        """Returns the batch to run and sequences finished without running (cannot ever fit)."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        dropped: list[Sequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            target = seq.num_computed_tokens + n
            if bm.num_blocks_for(target) > bm.num_total_blocks:
                self.running.pop(i)  # longer than the whole cache: can never continue
                self._finish(seq, FINISH_LENGTH)
                dropped.append(seq)
                continue
            if bm.num_missing_blocks(seq, target):  # most decode steps need no new block
                while not bm.can_grow(seq, target) and self.running[-1] is not seq:
                    self._preempt(self.running.pop())
                    preempted = True
                if not bm.can_grow(seq, target):
                    self._preempt(self.running.pop(i))
                    preempted = True
                    break
                bm.grow(seq, target)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1
        while (
            self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            admitted_now = not seq.block_ids and seq.num_computed_tokens == 0
            if admitted_now:
                bm.admit(seq)
            n = seq.num_uncomputed_tokens
            if n > budget and not self.enable_chunked_prefill:
                if admitted_now:
                    bm.release(seq, cache=False)
                break
            n = min(n, budget)
            target = seq.num_computed_tokens + n
            if not bm.can_grow(seq, target):
                if admitted_now:
                    bm.release(seq, cache=False)
                break
            bm.grow(seq, target)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts), dropped

    def _preempt(self, seq: Sequence) -> None:
        """Recompute preemption: computed whole blocks go to the radix tree (when on), the rest is freed."""
        self.block_manager.release(seq, cache=True)
        seq.status = SequenceStatus.WAITING
        # num_sent_blocks stays: the peer already holds those blocks, and recomputed KV is identical
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self,
        batch: ScheduledBatch,
        sampled_token_ids: list[int | None],
        sampled_logprobs: list[TokenLogprobs | None] | None = None,
        prompt_logprobs: dict[int, list[TokenLogprobs]] | None = None,
    ) -> list[Sequence]:
        """Advances the batch by one step; sampled_token_ids[i] is the new token of batch.seqs[i]
        (None when it did not sample), sampled_logprobs[i] its log-probabilities (None: not asked),
        prompt_logprobs[i] the entries of the prompt tokens after those it has (see
        StepInputs.prompt_logprob_rows). Returns the sequences that finished (or got pinned)."""
        finished: list[Sequence] = []
        for i, (seq, n, token_id) in enumerate(
            zip(batch.seqs, batch.num_new_tokens, sampled_token_ids, strict=True)
        ):
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.num_computed_prefill_tokens += min(
                    n, seq.num_prompt_tokens - seq.num_computed_tokens
                )
            seq.num_computed_tokens += n
            if prompt_logprobs is not None and i in prompt_logprobs:
                seq.prompt_logprobs.extend(prompt_logprobs[i])
            self.block_manager.cache_computed(seq)
            if token_id is None:
                continue
            seq.token_ids.append(token_id)
            seq.num_new_tokens_unreported += 1
            if sampled_logprobs is not None and sampled_logprobs[i] is not None:
                seq.output_logprobs.append(sampled_logprobs[i])
            reason = self.check_stop(seq)
            if reason is None and seq.mode is RequestMode.PREFILL_ONLY:
                reason = FINISH_PREFILLED
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def check_stop(self, seq: Sequence) -> str | None:
        """The finish reason after seq's last token, or None to go on."""
        last = seq.token_ids[-1]
        params = seq.params
        if last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids):
            return FINISH_STOP
        if seq.output_position >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FINISH_LENGTH
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.pin_on_finish or seq.mode is RequestMode.PREFILL_ONLY:
            seq.status = SequenceStatus.PINNED  # blocks stay until release_request
        else:
            self.block_manager.release(seq, cache=True)
            seq.status = SequenceStatus.FINISHED

    def remove(self, request_id: str) -> Sequence | None:
        """Takes a waiting or running sequence out of the queues (abort); the caller releases it."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                return seq
        return None
