"""Turns a stream of generated token ids into an OpenAI response (SSE or one JSON), for instances and scheduler.

The producer is an async iterator of `TokenDelta`s; the renderer detokenizes incrementally, writes SSE
chunks (then an optional usage chunk and `data: [DONE]`) or one JSON body, and records TTFT/TPOT.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from pdserve.server.metrics import ServerMetrics
from pdserve.server.protocol import (
    SSE_DONE,
    GenerateRequest,
    IncrementalDetokenizer,
    ProtocolError,
    chunk_json,
    response_json,
    sse,
    usage_chunk_json,
    usage_json,
)


@dataclass
class TokenDelta:
    new_token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int | None = None  # set once, when known


class StreamTimer:
    """TTFT and mean TPOT of one request."""

    def __init__(self):
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.num_tokens = 0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.num_tokens += n

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start

    @property
    def tpot(self) -> float | None:
        if self.first is None or self.num_tokens < 2:
            return None
        return (self.last - self.first) / (self.num_tokens - 1)


async def render_response(
    http_request: web.Request,
    req: GenerateRequest,
    request_id: str,
    model: str,
    num_prompt_tokens: int,
    deltas: AsyncIterator[TokenDelta],
    decode,
    metrics: ServerMetrics | None = None,
) -> web.StreamResponse:
    """Consumes `deltas` to the end (or until the client leaves: the caller's iterator is then closed)."""
    created = int(time.time())
    detok = IncrementalDetokenizer(decode)
    timer = StreamTimer()
    token_ids: list[int] = []
    finish_reason = None
    num_cached_tokens = 0
    if req.stream:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(http_request)
        try:
            first = True
            unsent_ids: list[int] = []  # tokens whose text is held back (a split UTF-8 character)
            async for d in deltas:
                if d.num_cached_tokens is not None:
                    num_cached_tokens = d.num_cached_tokens
                timer.tokens(len(d.new_token_ids))
                token_ids.extend(d.new_token_ids)
                unsent_ids.extend(d.new_token_ids)
                finish_reason = d.finish_reason or finish_reason
                text = detok.add(d.new_token_ids, final=d.finish_reason is not None)
                if text or d.finish_reason is not None or (unsent_ids and first):
                    chunk = chunk_json(
                        req.kind,
                        request_id,
                        model,
                        text,
                        unsent_ids,
                        d.finish_reason,
                        created,
                        first,
                    )
                    await resp.write(sse(chunk))
                    unsent_ids = []
                    first = False
            usage = usage_json(num_prompt_tokens, len(token_ids), num_cached_tokens)
            if req.include_usage:
                await resp.write(sse(usage_chunk_json(req.kind, request_id, model, created, usage)))
            await resp.write(SSE_DONE)
            await resp.write_eof()
        except ConnectionResetError:
            return resp  # the client left: the producer's `finally` releases the request
        except Exception as exc:  # noqa: BLE001 - headers are out: report in-band, as OpenAI does
            status = getattr(exc, "status", 500)
            try:
                await resp.write(sse(ProtocolError(f"generation failed: {exc}", status).to_json()))
                await resp.write(SSE_DONE)
                await resp.write_eof()
            except ConnectionResetError:
                pass
            return resp
    else:
        try:
            async for d in deltas:
                if d.num_cached_tokens is not None:
                    num_cached_tokens = d.num_cached_tokens
                timer.tokens(len(d.new_token_ids))
                token_ids.extend(d.new_token_ids)
                finish_reason = d.finish_reason or finish_reason
        except Exception as exc:  # noqa: BLE001 - one JSON error for people
            status = getattr(exc, "status", 500)
            if not isinstance(status, int) or status < 400:
                status = 500
            if isinstance(exc, ValueError):
                status = 400
            return web.json_response(
                ProtocolError(f"generation failed: {exc}", status).to_json(), status=status
            )
        text = decode(token_ids)
        usage = usage_json(num_prompt_tokens, len(token_ids), num_cached_tokens)
        resp = web.json_response(
            response_json(
                req.kind, request_id, model, text, token_ids, finish_reason, usage, created
            )
        )
    if metrics is not None:
        metrics.observe_request(
            timer.ttft, timer.tpot, finish_reason, num_prompt_tokens, len(token_ids)
        )
    return resp
