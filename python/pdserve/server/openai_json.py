"""OpenAI's response shapes, for instances and the scheduler: whole replies and their choices, SSE chunks
(ending with `data: [DONE]`), usage (with `prompt_tokens_details.cached_tokens`), the model list.
`token_ids` on every choice is our extension (the generated ids).
"""

from __future__ import annotations

import json
import time


def usage_json(num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int) -> dict:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


def choice_json(
    kind: str,
    index: int,
    text: str,
    token_ids: list[int],
    finish_reason: str | None,
    logprobs: dict | None = None,
) -> dict:
    """One whole choice of a (non-stream) reply. `token_ids` is an extension field; `logprobs` the
    choice's OpenAI logprobs object (None: not asked)."""
    if kind == "chat":
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }
    return _text_choice(index, text, token_ids, finish_reason, logprobs)


def response_json(
    kind: str,
    request_id: str,
    model: str,
    choices: list[dict],
    usage: dict,
    created: int | None = None,
) -> dict:
    """A whole (non-stream) completion or chat completion of `choices` (`choice_json`s)."""
    created = int(time.time()) if created is None else created
    return {
        "id": request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def _text_choice(
    index: int,
    text: str,
    token_ids: list[int],
    finish_reason: str | None,
    logprobs: dict | None = None,
) -> dict:
    """A choice of a completions reply or stream chunk (the two have the same shape)."""
    return {
        "index": index,
        "text": text,
        "finish_reason": finish_reason,
        "token_ids": token_ids,
        "logprobs": logprobs,
    }


def chunk_json(
    kind: str,
    request_id: str,
    model: str,
    index: int,
    text: str,
    token_ids: list[int],
    finish_reason: str | None,
    created: int,
    first: bool = False,
    logprobs: dict | None = None,
) -> dict:
    """One SSE chunk carrying new text of choice `index` (and its tokens' logprobs object when
    asked); `first`: the choice's first chunk (chat adds the role)."""
    if kind == "chat":
        delta: dict = {"content": text}
        if first:
            delta["role"] = "assistant"
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "token_ids": token_ids,
        }
        obj = "chat.completion.chunk"
    else:
        choice = _text_choice(index, text, token_ids, finish_reason, logprobs)
        obj = "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk_json(kind: str, request_id: str, model: str, created: int, usage: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {
        "id": request_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage,
    }


def sse(obj: dict | str) -> bytes:
    """`data: ...\\n\\n`; a str is sent as is (`[DONE]`)."""
    payload = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")


def models_json(model: str, created: int) -> dict:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "pdserve"}],
    }
