"""One request's state inside the engine: its tokens, its KV blocks and how far its KV is computed.

No torch here: the scheduler and block manager work on plain ints, and tests drive them without a model.
"""

from __future__ import annotations

import enum
from array import array
from dataclasses import dataclass, field

from pdserve.engine.sampling_params import SamplingParams


class RequestMode(enum.Enum):
    """The three ways into the engine (DESIGN §3)."""

    COLOCATED = "colocated"  # prompt in, tokens out
    PREFILL_ONLY = "prefill_only"  # stop after the first token; blocks pinned until release_request
    DECODE_ONLY = "decode_only"  # start from reserved, filled blocks plus the first token


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and to be recomputed)
    RUNNING = "running"  # holds blocks, scheduled every step until finished
    PINNED = "pinned"  # prefill-only and done: holds its blocks until release_request
    FINISHED = "finished"  # holds nothing


# finish reasons, as OpenAI spells them, plus the prefill-only hand-over
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"
FINISH_PREFILLED = "prefill_done"  # PREFILL_ONLY: first token made, the decode instance goes on


@dataclass
class Sequence:
    """A request. Tokens [0, num_computed_tokens) have their KV written in `block_ids`.

    Invariant: len(block_ids) * block_size >= num_computed_tokens, and the engine holds exactly one
    pool reference on every id in block_ids (shared prefix blocks included).
    """

    request_id: str
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    params: SamplingParams
    mode: RequestMode = RequestMode.COLOCATED
    arrival_index: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix tokens whose KV came from the radix tree at admission
    num_tree_blocks: int = 0  # leading blocks of block_ids already offered to the radix tree
    num_peer_cached_tokens: int = 0  # PREFILL_ONLY: tokens the decode peer already holds
    num_sent_blocks: int = 0  # PREFILL_ONLY: blocks already handed to layer_hook
    num_new_tokens_unreported: int = 0  # generated tokens not yet returned by step()
    finish_reason: str | None = None
    num_preemptions: int = 0
    pin_on_finish: bool = False  # keep the blocks after finishing until release_request (dcache)
    # params.logprobs set: one entry per token this engine sampled (a DECODE_ONLY request's first
    # token was sampled by the prefill instance, and its entry travelled with it)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # params.prompt_logprobs set: entry p is prompt token p's (None for token 0), filled as the
    # prompt's chunks are computed; reported once, with the first generated token
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    _output_ids: array = field(default_factory=lambda: array("q"), repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_position(self) -> int:
        """Tokens generated for this request so far, those before a migration included (the prompt's
        last params.num_prior_output_tokens): what max_tokens, min_tokens and seeds count."""
        return self.num_output_tokens + self.params.num_prior_output_tokens

    def output_id_array(self) -> array:
        """The ids generated for this request (output_position of them) as an array('q') kept across
        steps (caught up from token_ids, which stay the truth), so penalties read them in place
        instead of converting every id every step."""
        start = self.num_prompt_tokens - self.params.num_prior_output_tokens
        have = len(self._output_ids)
        if start + have < len(self.token_ids):
            self._output_ids.extend(self.token_ids[start + have :])
        return self._output_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """True while prompt log-probabilities are asked and not all computed yet."""
        return (
            self.params.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.PINNED)


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model (log-softmax of its raw logits) and the
    `SamplingParams.logprobs` most likely tokens' as (token id, log-probability), most likely first."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What one step() produced for one request.

    new_token_ids: tokens generated since the last output for this request (may be empty on finish).
    finish_reason: None while running; "stop", "length", "abort", or "prefill_done" (PREFILL_ONLY:
    the first token is in new_token_ids, and the blocks stay pinned until release_request).
    """

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprobs] | None = (
        None  # one per new token, when params.logprobs is set
    )
    # params.prompt_logprobs set: one per prompt token (None for the first), in the output that
    # carries the first generated token; else None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
