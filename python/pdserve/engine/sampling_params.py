"""Per-request sampling settings (vLLM-compatible names), validated at construction with errors for people."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field, replace

MAX_LOGPROBS = 20  # most likely tokens returned per generated token, at most
MAX_ABS_PENALTY = 2.0  # presence/frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_ABS_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100] (OpenAI's range)
MAX_TOKEN_ID = 1 << 31  # token ids a request may name lie below this (vocabularies are far smaller)


def is_logit_bias_value(bias: object) -> bool:
    """True for a number (not a bool) in [-MAX_ABS_LOGIT_BIAS, MAX_ABS_LOGIT_BIAS]."""
    return (
        isinstance(bias, (int, float))
        and not isinstance(bias, bool)
        and -MAX_ABS_LOGIT_BIAS <= bias <= MAX_ABS_LOGIT_BIAS
    )


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p 1.0 disables top-p.
    seed makes one request's sampling reproducible independently of the batch it runs in.
    logprobs (None: off; k in [0, 20]) returns each generated token's log-probability under the
    model's own distribution (log-softmax of the raw logits: before penalties, temperature, top-k and
    top-p) and the k most likely tokens' (vLLM's default).
    presence_penalty / frequency_penalty (OpenAI's, in [-2, 2]) lower each token's logit by
    presence_penalty once it was generated and frequency_penalty per time generated (the prompt does
    not count), before temperature, top-k and top-p; greedy picks apply them too.
    logit_bias ({token id: bias in [-100, 100]}, OpenAI's) adds each bias to its token's logit after
    the penalties (-100 in effect bans a token, +100 forces it); the engine checks the ids against
    its vocabulary.
    allowed_token_ids (vLLM's) restricts sampling to those ids: every other token's logit becomes
    -inf after the penalties and the bias (greedy picks too); kept sorted without repeats; the
    engine checks the ids against its vocabulary. Log-probabilities stay the model's own.
    prompt_logprobs (vLLM's; None: off; k in [0, 20]) returns each prompt token's log-probability
    given the tokens before it (the first has none) and the k most likely there; such a prompt is
    computed whole, its cached prefix not used (cached KV has no logits).
    min_tokens (vLLM's, <= max_tokens): until that many tokens are generated, the stop token ids and
    (unless ignore_eos) the EOS ids cannot be sampled; the engine resolves which ids those are.
    num_prior_output_tokens (pdserve's, < max_tokens; set by the global scheduler when a request
    migrates): the prompt's last n tokens are this request's own earlier output, so max_tokens,
    min_tokens, the penalties and the seeded noise count them as generated, and the request goes on
    as if it had never moved.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    min_tokens: int = 0
    num_prior_output_tokens: int = 0
    # allowed_token_ids as int64s, made once here and read in place by the sampler every step
    allowed_token_id_array: array | None = field(init=False, repr=False, compare=False)
    # the ids min_tokens holds back (stop ids, EOS unless ignore_eos): set by the engine on its own copy
    min_tokens_banned_ids: list[int] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool):
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise ValueError(f"top_k must be an int (-1 or 0 disables it), got {self.top_k!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or >= 1, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(
                    f"{name} must be a number in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], "
                    f"got {value!r}"
                )
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise ValueError(
                    f"{name} must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {value}"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not 0 <= value <= MAX_LOGPROBS
            ):
                raise ValueError(
                    f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {value!r}"
                )
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool):
            raise ValueError(f"min_tokens must be an int >= 0, got {self.min_tokens!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}"
            )
        prior = self.num_prior_output_tokens
        if (
            not isinstance(prior, int)
            or isinstance(prior, bool)
            or not 0 <= prior < self.max_tokens
        ):
            raise ValueError(
                f"num_prior_output_tokens must be an int in [0, max_tokens = {self.max_tokens}), "
                f"got {prior!r}"
            )
        self._check_logit_bias()
        self._check_allowed_token_ids()
        self.stop_token_ids = list(self.stop_token_ids or [])
        for token_id in self.stop_token_ids:
            if not isinstance(token_id, int) or token_id < 0:
                raise ValueError(f"stop_token_ids must be non-negative ints, got {token_id!r}")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(
                f"logit_bias must be a dict {{token id: bias}}, got {type(self.logit_bias).__name__}"
            )
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token_id!r}")
            if not is_logit_bias_value(bias):
                raise ValueError(
                    f"logit_bias[{token_id}] must be a number in [-{MAX_ABS_LOGIT_BIAS:g}, "
                    f"{MAX_ABS_LOGIT_BIAS:g}], got {bias!r}"
                )
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None

    def _check_allowed_token_ids(self) -> None:
        self.allowed_token_id_array = None
        if self.allowed_token_ids is None:
            return
        ids = self.allowed_token_ids
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(
                f"allowed_token_ids must be a non-empty list of token ids, got {ids!r:.80}"
            )
        for token_id in ids:
            if (
                not isinstance(token_id, int)
                or isinstance(token_id, bool)
                or not 0 <= token_id < MAX_TOKEN_ID
            ):
                raise ValueError(
                    f"allowed_token_ids must be token ids (ints in [0, 2**31)), got {token_id!r:.40}"
                )
        self.allowed_token_ids = sorted(set(ids))
        self.allowed_token_id_array = array("q", self.allowed_token_ids)

    def with_min_tokens_resolved(self, eos_token_ids: list[int], vocab_size: int) -> SamplingParams:
        """This params' copy whose `min_tokens_banned_ids` are the stop ids and, unless ignore_eos,
        `eos_token_ids`, those inside the vocabulary (self when min_tokens is 0). Raises ValueError
        when allowed_token_ids leaves nothing else to sample before min_tokens."""
        if not self.min_tokens:
            return self
        banned = set(self.stop_token_ids) | (set() if self.ignore_eos else set(eos_token_ids))
        banned = {t for t in banned if t < vocab_size}  # an id past it is never sampled anyway
        if self.allowed_token_ids is not None and set(self.allowed_token_ids) <= banned:
            raise ValueError(
                "min_tokens holds back every id of allowed_token_ids (they are all stop or EOS ids): "
                "nothing could be sampled"
            )
        resolved = replace(self)
        resolved.min_tokens_banned_ids = sorted(banned)
        return resolved

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
