"""OpenAI-compatible request validation, shared by instances and the scheduler (response shapes: openai_json.py).

One schema source: `COMPLETION_FIELDS` / `CHAT_FIELDS` list every accepted field with its type and range;
`parse_completion` / `parse_chat` check a JSON body against them and raise `ProtocolError` (HTTP 400) with a
message naming the field, the value seen and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

# plain constants (the module needs no torch): the engine's own bounds, so the two never disagree
from pdserve.engine.sampling_params import (
    MAX_ABS_LOGIT_BIAS,
    MAX_ABS_PENALTY,
    MAX_LOGPROBS,
    MAX_TOKEN_ID,
    is_logit_bias_value,
)

MAX_CHOICES = 64  # `n`: each choice is one engine request
MAX_PROMPTS = 256  # prompts in one completions request (a batch), and their choices in all
MAX_LOGIT_BIAS_ENTRIES = 1024  # logit_bias tokens per request (each costs sampling work every step)
MAX_ALLOWED_TOKEN_IDS = 1 << 17  # allowed_token_ids per request: a whole Llama-3 vocabulary fits


class ProtocolError(ValueError):
    """A bad request: `status` is the HTTP status, the message is for people; `kind` is OpenAI's error
    `type` (default: invalid_request_error below 500, server_error from 500)."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, kind: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.param = param
        self.kind = kind

    def to_json(self) -> dict:
        kind = self.kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {
            "error": {"message": str(self), "type": kind, "param": self.param, "code": self.status}
        }


def error_message(data: Any, status: int) -> str:
    """The `error.message` of a reply shaped like `ProtocolError.to_json()`, else the HTTP status and
    the start of the body (for the servers' own calls to each other)."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message"))
    return f"HTTP {status}: {str(data)[:200]}"


@dataclass(frozen=True)
class Field:
    """One accepted request field: JSON types, inclusive numeric range, default."""

    types: tuple[type, ...]
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    doc: str = ""


_NUM = (int, float)
# Sampling fields common to both endpoints (the engine's SamplingParams takes them by these names).
_SAMPLING_FIELDS: dict[str, Field] = {
    "model": Field(
        (str,), None, doc="served model name; any value is accepted when one model is served"
    ),
    "max_tokens": Field(
        (int,), 16, minimum=0, doc="new tokens to generate (0: completions with echo only)"
    ),
    "max_completion_tokens": Field((int,), None, minimum=1, doc="alias of max_tokens (chat)"),
    "temperature": Field(_NUM, 1.0, minimum=0.0, maximum=2.0, doc="0 = greedy"),
    "top_p": Field(_NUM, 1.0, minimum=0.0, maximum=1.0, exclusive_minimum=True),
    "top_k": Field((int,), -1, minimum=-1, doc="-1 = off"),
    "seed": Field((int,), None, doc="per-request sampling seed"),
    "stream": Field((bool,), False),
    "stream_options": Field((dict,), None, doc='{"include_usage": bool}'),
    "stop_token_ids": Field((list,), None, doc="token ids that end the sequence"),
    "ignore_eos": Field((bool,), False),
    "min_tokens": Field(
        (int,),
        0,
        minimum=0,
        doc="tokens generated before a stop id, EOS or stop string may end the answer (<= max_tokens)",
    ),
    "n": Field(
        (int,),
        1,
        minimum=1,
        maximum=MAX_CHOICES,
        doc="choices to sample for the prompt (choice i samples with seed + i when seed is set)",
    ),
    "user": Field((str,), None),
    "stop": Field(
        (str, list),
        None,
        doc="a non-empty string or a list of at most 4 non-empty strings: the text ends just "
        "before the first one generated (finish_reason stop)",
    ),
    "presence_penalty": Field(
        _NUM,
        0.0,
        minimum=-MAX_ABS_PENALTY,
        maximum=MAX_ABS_PENALTY,
        doc="lowers a generated token's logit once",
    ),
    "frequency_penalty": Field(
        _NUM,
        0.0,
        minimum=-MAX_ABS_PENALTY,
        maximum=MAX_ABS_PENALTY,
        doc="lowers a token's logit per time generated",
    ),
    "logit_bias": Field(
        (dict,),
        None,
        doc=f'{{"token id": bias in [-{MAX_ABS_LOGIT_BIAS:g}, {MAX_ABS_LOGIT_BIAS:g}]}}, added to '
        "the token's logit after the penalties",
    ),
    "allowed_token_ids": Field(
        (list,),
        None,
        doc="only these token ids may be generated (vLLM's; the engine checks its vocabulary)",
    ),
}
COMPLETION_FIELDS: dict[str, Field] = {
    "prompt": Field(
        (str, list),
        None,
        doc=f"a string or a list of token ids, or a batch of at most {MAX_PROMPTS} of those "
        f"(prompts x n <= {MAX_PROMPTS}): choice c of the reply is choice c % n of prompt c // n",
    ),
    "echo": Field(
        (bool,),
        False,
        doc="the reply's text starts with the prompt; with logprobs, the prompt tokens' come first",
    ),
    "logprobs": Field(
        (int,),
        None,
        minimum=0,
        maximum=MAX_LOGPROBS,
        doc="log-probabilities of each token and of the n most likely",
    ),
    **_SAMPLING_FIELDS,
}
CHAT_FIELDS: dict[str, Field] = {
    "messages": Field(
        (list,), None, doc='[{"role": "system"|"user"|"assistant", "content": str}, ...]'
    ),
    "logprobs": Field((bool,), False, doc="log-probabilities of each token"),
    "top_logprobs": Field(
        (int,),
        None,
        minimum=0,
        maximum=MAX_LOGPROBS,
        doc="and of the n most likely (logprobs true)",
    ),
    **_SAMPLING_FIELDS,
}
CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4  # OpenAI's limit


@dataclass
class SamplingSpec:
    """The sampling part of a request, as plain data (travels to instances as JSON)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; n: each token's and the n most likely's
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt tokens' too
    logit_bias: dict[int, float] | None = None  # token id -> bias
    allowed_token_ids: list[int] | None = None  # None: any token
    min_tokens: int = 0  # no stop id, EOS or stop string ends the answer before this many tokens
    # a migrated request: the prompt's last n tokens are its earlier output (SamplingParams says how
    # the engine counts them); the scheduler sets it, never a client
    num_prior_output_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict) -> SamplingSpec:
        spec = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        if spec.logit_bias is not None:  # JSON made its keys strings
            if not isinstance(spec.logit_bias, dict):
                raise ValueError(f"sampling.logit_bias must be an object, got {spec.logit_bias!r}")
            spec.logit_bias = {
                int(t): b for t, b in spec.logit_bias.items()
            }  # SamplingParams checks
        return spec


@dataclass
class GenerateRequest:
    """A validated public request. Exactly one of `prompt` / `prompt_token_ids` / `messages` /
    `prompt_batch` is set."""

    kind: str  # "completion" | "chat"
    sampling: SamplingSpec
    model: str | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict] | None = None
    # completions with several prompts, each a string or token ids (see each_prompt)
    prompt_batch: list[str | list[int]] | None = None
    stream: bool = False
    include_usage: bool = False
    # Stop strings act on text, so whoever renders the text applies them (detokenize.ChoiceText);
    # they stay out of SamplingSpec, which is what the engines see.
    stop: list[str] = field(default_factory=list)
    n: int = 1  # choices: one engine request each (see choices.start_choices)
    echo: bool = False  # completions: the reply's text (and logprobs) start with the prompt's
    echo_only: bool = False  # echo with max_tokens 0: the reply leaves out the one token sampled

    def each_prompt(self) -> list[GenerateRequest]:
        """One request per prompt: a batch's prompts, in order, each with `prompt` or
        `prompt_token_ids` set and the rest of this request; [self] when there is one prompt."""
        if self.prompt_batch is None:
            return [self]
        return [
            dataclasses.replace(
                self,
                prompt_batch=None,
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=None if isinstance(p, str) else list(p),
            )
            for p in self.prompt_batch
        ]

    def choice_sampling(self, index: int) -> SamplingSpec:
        """The sampling of choice `index`: the request's, with seed + index when a seed is set (so
        choice 0 is what the same request with n = 1 returns, and the choices differ). Only choice
        0 computes the prompt's log-probabilities (every choice echoes them)."""
        if index == 0:
            return self.sampling
        changes: dict[str, Any] = {"prompt_logprobs": None}
        if self.sampling.seed is not None:
            changes["seed"] = self.sampling.seed + index
        return dataclasses.replace(self.sampling, **changes)


def _type_names(types: tuple[type, ...]) -> str:
    names = {
        int: "integer",
        float: "number",
        str: "string",
        bool: "boolean",
        list: "array",
        dict: "object",
    }
    return " or ".join(names.get(t, t.__name__) for t in types)


def _check_fields(body: Any, fields: dict[str, Field]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ProtocolError(
            f"unknown field(s) {unknown}; accepted: {', '.join(sorted(fields))}", param=unknown[0]
        )
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        value = body.get(name, None)
        if value is None:
            values[name] = spec.default
            continue
        # bool is an int in Python: accept it only where booleans are declared
        ok = isinstance(value, spec.types) and not (
            isinstance(value, bool) and bool not in spec.types
        )
        if not ok:
            raise ProtocolError(
                f"'{name}' must be {_type_names(spec.types)}, got {json.dumps(value)[:80]}"
                + (f" ({spec.doc})" if spec.doc else ""),
                param=name,
            )
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low_bad = spec.minimum is not None and (
                value <= spec.minimum if spec.exclusive_minimum else value < spec.minimum
            )
            high_bad = spec.maximum is not None and value > spec.maximum
            if low_bad or high_bad:
                lo = "-inf" if spec.minimum is None else spec.minimum
                hi = "inf" if spec.maximum is None else spec.maximum
                bracket = "(" if spec.exclusive_minimum else "["
                raise ProtocolError(
                    f"'{name}' must be in {bracket}{lo}, {hi}], got {value}"
                    + (f" ({spec.doc})" if spec.doc else ""),
                    param=name,
                )
        values[name] = value
    return values


def _stop_strings(value: str | list | None) -> list[str]:
    """`stop` as a list: a string or a list of at most MAX_STOP_STRINGS non-empty strings ([] = none)."""
    if value is None:
        return []
    strings = [value] if isinstance(value, str) else value
    if len(strings) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in strings):
        raise ProtocolError(
            f"'stop' must be a non-empty string or a list of at most {MAX_STOP_STRINGS} non-empty "
            f"strings, got {json.dumps(value)[:80]}",
            param="stop",
        )
    return list(strings)


def _sampling_from(
    values: dict[str, Any], logprobs: int | None = None, echo: bool = False
) -> SamplingSpec:
    """The sampling fields as a SamplingSpec. max_tokens 0 (only with `echo`: the prompt alone comes
    back) becomes 1: the prefill that makes the prompt's log-probabilities samples a token, which
    the reply leaves out (GenerateRequest.echo_only)."""
    stop_ids = values["stop_token_ids"] or []
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids):
        raise ProtocolError(
            f"'stop_token_ids' must be non-negative integers, got {stop_ids}",
            param="stop_token_ids",
        )
    top_k = values["top_k"]
    if top_k == 0:
        raise ProtocolError("'top_k' must be -1 (off) or >= 1, got 0", param="top_k")
    max_tokens = values["max_completion_tokens"] or values["max_tokens"]
    if max_tokens == 0 and not echo:
        raise ProtocolError(
            "'max_tokens' must be >= 1 (0 only on completions with echo: the prompt alone)",
            param="max_tokens",
        )
    if values["min_tokens"] > max_tokens:
        raise ProtocolError(
            f"'min_tokens' ({values['min_tokens']}) must not exceed max_tokens ({max_tokens})",
            param="min_tokens",
        )
    return SamplingSpec(
        max_tokens=max(1, int(max_tokens)),
        temperature=float(values["temperature"]),
        top_p=float(values["top_p"]),
        top_k=int(top_k),
        seed=values["seed"],
        stop_token_ids=list(stop_ids),
        ignore_eos=bool(values["ignore_eos"]),
        presence_penalty=float(values["presence_penalty"]),
        frequency_penalty=float(values["frequency_penalty"]),
        logprobs=logprobs,
        logit_bias=_logit_bias(values["logit_bias"]),
        allowed_token_ids=_allowed_token_ids(values["allowed_token_ids"]),
        min_tokens=int(values["min_tokens"]),
    )


def _allowed_token_ids(value: list | None) -> list[int] | None:
    """A non-empty list of at most MAX_ALLOWED_TOKEN_IDS token ids, sorted without repeats
    (None: any token); ProtocolError naming the field otherwise."""
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_ALLOWED_TOKEN_IDS:
        raise ProtocolError(
            f"'allowed_token_ids' must list 1 to {MAX_ALLOWED_TOKEN_IDS} token ids, got {len(value)}",
            param="allowed_token_ids",
        )
    for t in value:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < MAX_TOKEN_ID:
            raise ProtocolError(
                f"'allowed_token_ids' must be non-negative integers below 2**31, got "
                f"{json.dumps(t)[:24]}",
                param="allowed_token_ids",
            )
    return sorted(set(value))


def _logit_bias(value: dict | None) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} as {token id: bias}; ProtocolError naming the field otherwise."""
    if not value:
        return None
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ProtocolError(
            f"'logit_bias' may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}",
            param="logit_bias",
        )
    bias: dict[int, float] = {}
    for key, b in value.items():
        if not (isinstance(key, str) and re.fullmatch(r"[0-9]{1,10}", key)):
            raise ProtocolError(
                "'logit_bias' keys must be token ids (non-negative integers as strings, at most 10 "
                f"digits), got {str(key)[:24]!r}",
                param="logit_bias",
            )
        if not is_logit_bias_value(b):
            raise ProtocolError(
                f"'logit_bias' values must be numbers in [-{MAX_ABS_LOGIT_BIAS:g}, "
                f"{MAX_ABS_LOGIT_BIAS:g}], got {b!r} for token {key}",
                param="logit_bias",
            )
        bias[int(key)] = float(b)
    return bias


def _stream_flags(values: dict[str, Any]) -> tuple[bool, bool]:
    opts = values["stream_options"] or {}
    include_usage = opts.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ProtocolError(
            "'stream_options.include_usage' must be a boolean", param="stream_options"
        )
    return bool(values["stream"]), include_usage


def parse_completion(body: Any) -> GenerateRequest:
    """Validate a `/v1/completions` body; raises ProtocolError naming the offending field."""
    values = _check_fields(body, COMPLETION_FIELDS)
    prompt = values["prompt"]
    if prompt is None:
        raise ProtocolError(
            "'prompt' is required (a string or a list of token ids)", param="prompt"
        )
    echo = bool(values["echo"])
    req = GenerateRequest(
        kind="completion",
        sampling=_sampling_from(values, values["logprobs"], echo=echo),
        model=values["model"],
        stop=_stop_strings(values["stop"]),
        n=int(values["n"]),
        echo=echo,
        echo_only=echo and values["max_tokens"] == 0,
    )
    if echo:
        req.sampling.prompt_logprobs = values["logprobs"]
    prompts = _prompts(prompt)
    if len(prompts) * req.n > MAX_PROMPTS:
        raise ProtocolError(
            f"{len(prompts)} prompts x n = {req.n} make {len(prompts) * req.n} choices; at most "
            f"{MAX_PROMPTS} per request",
            param="prompt",
        )
    if len(prompts) > 1:
        req.prompt_batch = prompts
    elif isinstance(prompts[0], str):
        req.prompt = prompts[0]
    else:
        req.prompt_token_ids = prompts[0]
    req.stream, req.include_usage = _stream_flags(values)
    return req


def _prompts(prompt: str | list) -> list[str | list[int]]:
    """A completions `prompt` as a list of prompts, each a non-empty string or list of token ids."""

    def is_token_id(t: object) -> bool:
        return isinstance(t, int) and not isinstance(t, bool) and t >= 0

    if isinstance(prompt, str) or (prompt and all(is_token_id(t) for t in prompt)):
        prompts, where = [prompt], ["'prompt'"]
    elif prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts, where = prompt, [f"'prompt[{i}]'" for i in range(len(prompt))]
    elif prompt:
        raise ProtocolError(
            "'prompt' as a list must hold non-negative token ids (one prompt) or prompts (a batch: "
            f"strings or lists of token ids), got {json.dumps(prompt)[:80]}",
            param="prompt",
        )
    else:
        prompts, where = [prompt], ["'prompt'"]
    if len(prompts) > MAX_PROMPTS:
        raise ProtocolError(
            f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
            param="prompt",
        )
    for p, name in zip(prompts, where, strict=True):
        if not p:
            raise ProtocolError(f"{name} must not be empty", param="prompt")
        if not isinstance(p, str) and not all(is_token_id(t) for t in p):
            raise ProtocolError(
                f"{name} as a list must hold non-negative token ids, got {json.dumps(p)[:80]}",
                param="prompt",
            )
    return [p if isinstance(p, str) else list(p) for p in prompts]


def parse_chat(body: Any) -> GenerateRequest:
    """Validate a `/v1/chat/completions` body."""
    values = _check_fields(body, CHAT_FIELDS)
    messages = values["messages"]
    if not messages:
        raise ProtocolError("'messages' is required and must not be empty", param="messages")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in CHAT_ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise ProtocolError(
                f"messages[{i}] must be {{'role': one of {list(CHAT_ROLES)}, 'content': string}}, "
                f"got {json.dumps(m)[:120]}",
                param="messages",
            )
    top = values["top_logprobs"]
    if top is not None and not values["logprobs"]:
        raise ProtocolError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    req = GenerateRequest(
        kind="chat",
        sampling=_sampling_from(values, (top or 0) if values["logprobs"] else None),
        model=values["model"],
        stop=_stop_strings(values["stop"]),
        n=int(values["n"]),
    )
    req.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    req.stream, req.include_usage = _stream_flags(values)
    return req
