"""A minimal OpenAI-compatible HTTP client that times every streamed chunk.

It sends one completions or chat-completions request on an aiohttp session, parses the SSE stream
(`data: {...}` lines, then `data: [DONE]`) and fills the timing, usage and error fields of a
`RequestRecord`. It never raises for a failed request: HTTP errors, error events, broken streams
and timeouts are recorded (status + message) so one bad request cannot end a run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from pdserve.client.metrics import RequestRecord

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_MAX_ERROR_CHARS = 500


def endpoint_url(base_url: str, endpoint: str) -> str:
    """Full URL of `endpoint` ('completions' or 'chat') under a server's base URL."""
    if endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {endpoint!r}")
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + ENDPOINT_PATHS[endpoint]


def _error_message(body: str) -> str:
    """The `error.message` (or `message`/`detail`) of a JSON error body, else the body itself."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()[:_MAX_ERROR_CHARS] or "(empty body)"
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            for key in ("message", "detail"):
                if isinstance(error.get(key), str):
                    return error[key][:_MAX_ERROR_CHARS]
        elif isinstance(error, str):
            return error[:_MAX_ERROR_CHARS]
    return body.strip()[:_MAX_ERROR_CHARS]


def _apply_usage(record: RequestRecord, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    record.usage_reported = True
    if isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]
    if isinstance(usage.get("completion_tokens"), int):
        record.completion_tokens = usage["completion_tokens"]
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        record.cached_tokens = details["cached_tokens"]


def chunk_output(chunk: dict, endpoint: str) -> tuple[str | None, str | None, bool]:
    """(text, finish_reason, is_output) of one streamed chunk's first choice. `is_output` says
    whether the chunk counts as an output-token arrival: it carries text, or it is an empty-text
    chunk that neither announces the chat role nor only closes the stream (a token that decodes
    to nothing yet). Returns (None, None, False) for chunks without choices (e.g. usage only)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None, None, False
    choice = choices[0]
    finish_reason = choice.get("finish_reason")
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is None or (text == "" and "role" in delta):
            return None, finish_reason, False
    else:
        text = choice.get("text")
        if text is None:
            return None, finish_reason, False
    return text, finish_reason, bool(text) or finish_reason is None


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    *,
    endpoint: str,
    timeout_s: float | None = None,
) -> RequestRecord:
    """POSTs `body` to `url` and fills `record` (stream mode when `body["stream"]`). Returns
    `record`, with `ok` False and `error` set on any failure; never raises except on cancel."""
    stream = bool(body.get("stream"))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    sent_at = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=timeout) as response:
            record.http_status = response.status
            if response.status != 200:
                record.error = _error_message(await response.text())
                return record
            if stream:
                await _read_stream(response, record, endpoint, sent_at)
            else:
                await _read_whole(response, record, endpoint)
                record.e2e_s = time.perf_counter() - sent_at
    except asyncio.TimeoutError:
        record.error = f"timed out after {timeout_s} s"
    except aiohttp.ClientError as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
    except ValueError as exc:  # e.g. an SSE line longer than aiohttp's read buffer
        record.error = f"unreadable response: {exc}"[:_MAX_ERROR_CHARS]
    if record.error is None:
        record.ok = True
        if record.completion_tokens is None:
            record.completion_tokens = record.num_chunks if stream else None
    return record


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, endpoint: str, sent_at: float
) -> None:
    last_output_at: float | None = None
    texts: list[str] = []
    done = False
    async for raw_line in response.content:
        line = raw_line.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, comments (": ping"), event/id fields
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            done = True
            break
        now = time.perf_counter()
        try:
            chunk = json.loads(data)
        except ValueError:
            record.error = f"malformed SSE data: {data[:200]!r}"
            return
        if not isinstance(chunk, dict):
            continue
        if "error" in chunk:
            record.error = "error event: " + _error_message(data)
            return
        _apply_usage(record, chunk.get("usage"))
        text, finish_reason, is_output = chunk_output(chunk, endpoint)
        if finish_reason is not None:
            record.finish_reason = finish_reason
        if text:
            texts.append(text)
        if not is_output:
            continue
        if last_output_at is None:
            record.ttft_s = now - sent_at
        else:
            record.itl_s.append(now - last_output_at)
        last_output_at = now
        record.num_chunks += 1
    record.e2e_s = time.perf_counter() - sent_at
    record.output_text = "".join(texts)
    if not done:
        record.error = "stream ended without data: [DONE]"


async def _read_whole(
    response: aiohttp.ClientResponse, record: RequestRecord, endpoint: str
) -> None:
    try:
        payload = await response.json(content_type=None)
    except ValueError:
        record.error = "response body is not JSON"
        return
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list):
        record.error = "response has no choices: " + _error_message(json.dumps(payload))
        return
    _apply_usage(record, payload.get("usage"))
    choice = payload["choices"][0] if payload["choices"] else {}
    if endpoint == "chat":
        text = (choice.get("message") or {}).get("content") or ""
    else:
        text = choice.get("text") or ""
    record.output_text = text
    record.finish_reason = choice.get("finish_reason")


async def fetch_model_id(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float = 10.0
) -> str:
    """The first model id listed by `GET /v1/models`. Raises `RuntimeError` saying what failed."""
    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            body = await response.text()
            if response.status != 200:
                hint = (
                    " (pass --api-key, or set $PDSERVE_API_KEY or $OPENAI_API_KEY)"
                    if response.status == 401
                    else ""
                )
                raise RuntimeError(
                    f"GET {url} returned {response.status}: {_error_message(body)}{hint}"
                )
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise RuntimeError(
            f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server up? (or pass --model)"
        ) from exc
    try:
        models = json.loads(body)["data"]
        return str(models[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RuntimeError(f"GET {url} listed no model: {body[:200]!r} (pass --model)") from exc
