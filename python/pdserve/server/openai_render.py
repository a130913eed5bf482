"""Turns a stream of generated token ids into an OpenAI response (SSE or one JSON), for instances and scheduler.

The producer is an async generator of `TokenDelta`s; the renderer detokenizes incrementally, cuts the
text at the request's stop strings (then tells the caller through `on_stop` and closes the producer,
which ends the request where it runs), writes SSE chunks (then an optional usage chunk and
`data: [DONE]`) or one JSON body, and records TTFT/TPOT.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from aiohttp import web

from pdserve.server.metrics import ServerMetrics
from pdserve.server.protocol import (
    SSE_DONE,
    GenerateRequest,
    IncrementalDetokenizer,
    ProtocolError,
    StopStringMatcher,
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
    # when the request asked for them: one {"logprob", "top": [[id, logprob], ...]} per new token
    logprobs: list[dict] | None = None


class ChoiceText:
    """One choice's text as its tokens arrive: incremental detokenization, then the stop strings.

    With stop strings the tokens are detokenized one at a time, so the token that completes a stop
    string is known: it is the last one kept (usage counts up to it) and later ones are dropped.
    Not `incremental` (a whole reply without stop strings), the text is decoded once, at the end.
    """

    def __init__(self, decode, stop: list[str], incremental: bool = True):
        self._decode = decode  # decode(list[int]) -> str
        self._detok = IncrementalDetokenizer(decode)
        self._stop = StopStringMatcher(stop) if stop else None
        self._incremental = incremental or self._stop is not None
        self._parts: list[str] = []  # the text handed out so far
        self.token_ids: list[int] = []  # the tokens kept: all received, or up to the stop string

    @property
    def stopped(self) -> bool:
        return self._stop is not None and self._stop.stopped

    @property
    def text(self) -> str:
        """All of the text so far (after the last `add`, the whole reply)."""
        return "".join(self._parts) if self._incremental else self._decode(self.token_ids)

    def add(self, new_token_ids: list[int], final: bool) -> tuple[list[int], str]:
        """(the tokens of `new_token_ids` kept, the text that may go out now); `final`: no more follow."""
        if self.stopped:
            return [], ""
        if not self._incremental:
            self.token_ids.extend(new_token_ids)
            return list(new_token_ids), ""
        if self._stop is None:
            kept, text = list(new_token_ids), self._detok.add(new_token_ids, final)
        else:
            kept, text = self._add_until_stop(new_token_ids, final)
        self.token_ids.extend(kept)
        self._parts.append(text)
        return kept, text

    def _add_until_stop(self, new_token_ids: list[int], final: bool) -> tuple[list[int], str]:
        kept: list[int] = []
        parts: list[str] = []
        for token_id in new_token_ids:
            kept.append(token_id)
            parts.append(self._stop.add(self._detok.add([token_id])))
            if self._stop.stopped:
                return kept, "".join(parts)
        if final:  # the detokenizer's held bytes, then the text held for the stop strings
            parts.append(self._stop.add(self._detok.add([], final=True)))
            if not self._stop.stopped:
                parts.append(self._stop.flush())
        return kept, "".join(parts)


class LogprobsRenderer:
    """OpenAI's logprobs object for a choice's tokens, piece by piece (a stream's chunks) or at once.

    Completions: {tokens, token_logprobs, top_logprobs, text_offset}; chat: {content: [{token, logprob,
    bytes, top_logprobs: [{token, logprob, bytes}]}]}. A token's text is its own decoding (a byte of
    a character split over tokens reads U+FFFD), text_offset the sum of the texts before it; in a
    completions top_logprobs dict, tokens whose texts collide show once, with the likeliest's value.
    """

    def __init__(self, kind: str, decode):
        self._kind = kind
        self._decode = decode
        self._text_offset = 0

    def render(self, token_ids: list[int], entries: list[dict]) -> dict:
        """`entries[i]` = {"logprob", "top": [[id, logprob], ...]} of token_ids[i] (TokenDelta)."""
        texts = [self._decode([t]) for t in token_ids]
        if self._kind == "chat":

            def item(text: str, logprob: float) -> dict:
                return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

            content = []
            for text, entry in zip(texts, entries, strict=True):
                tops = [item(self._decode([t]), lp) for t, lp in entry["top"]]
                content.append({**item(text, entry["logprob"]), "top_logprobs": tops})
            return {"content": content}
        offsets = []
        for text in texts:
            offsets.append(self._text_offset)
            self._text_offset += len(text)
        tops = []
        for entry in entries:
            top: dict[str, float] = {}
            for t, lp in entry["top"]:  # tokens whose texts collide keep the likeliest's value
                top.setdefault(self._decode([t]), lp)
            tops.append(top)
        return {
            "tokens": texts,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def kept_logprobs(d: TokenDelta, kept: list[int]) -> list[dict]:
    """The delta's entries for its first len(kept) tokens (the ones a stop string left)."""
    if d.logprobs is None or len(d.logprobs) < len(d.new_token_ids):
        raise RuntimeError(  # an instance's fault, not the client's: a 500
            f"logprobs were asked for, but a delta of {len(d.new_token_ids)} tokens carried "
            f"{0 if d.logprobs is None else len(d.logprobs)}"
        )
    return d.logprobs[: len(kept)]


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
    deltas: AsyncGenerator[TokenDelta, None],
    decode,
    metrics: ServerMetrics | None = None,
    on_stop: Callable[[], None] | None = None,
) -> web.StreamResponse:
    """Consumes `deltas` to the end, or until a stop string or the client's leaving: the producer is
    closed then (here on a stop string, before the stream ends; by the caller when the client leaves),
    which aborts the request and releases its blocks. `on_stop()` is called right before a stop string
    closes the producer (never when the client leaves), so the producer can tell the two apart."""
    created = int(time.time())
    choice = ChoiceText(decode, req.stop, incremental=req.stream)
    timer = StreamTimer()
    # logprobs asked: one entry per kept token, rendered with the text that carries it
    lp_renderer = LogprobsRenderer(req.kind, decode) if req.sampling.logprobs is not None else None
    kept_entries: list[dict] = []
    finish_reason = None
    num_cached_tokens = 0
    if req.stream:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(http_request)
        try:
            first = True
            unsent_ids: list[int] = []  # tokens whose text is held back (a split character, a stop)
            async for d in deltas:
                if d.num_cached_tokens is not None:
                    num_cached_tokens = d.num_cached_tokens
                kept, text = choice.add(d.new_token_ids, final=d.finish_reason is not None)
                timer.tokens(len(kept))
                unsent_ids.extend(kept)
                if lp_renderer is not None:
                    kept_entries.extend(kept_logprobs(d, kept))
                end = "stop" if choice.stopped else d.finish_reason
                finish_reason = end or finish_reason
                if text or end is not None or (unsent_ids and first):
                    logprobs = None
                    if lp_renderer is not None:
                        logprobs = lp_renderer.render(unsent_ids, kept_entries)
                        kept_entries = []
                    chunk = chunk_json(
                        req.kind, request_id, model, text, unsent_ids, end, created, first, logprobs
                    )
                    await resp.write(sse(chunk))
                    unsent_ids = []
                    first = False
                if choice.stopped:
                    if on_stop is not None:
                        on_stop()
                    await deltas.aclose()  # ends the request now, before the stream's end
                    break
            usage = usage_json(num_prompt_tokens, len(choice.token_ids), num_cached_tokens)
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
                kept, _ = choice.add(d.new_token_ids, final=d.finish_reason is not None)
                timer.tokens(len(kept))
                if lp_renderer is not None:
                    kept_entries.extend(kept_logprobs(d, kept))
                finish_reason = "stop" if choice.stopped else (d.finish_reason or finish_reason)
                if choice.stopped:
                    if on_stop is not None:
                        on_stop()
                    await deltas.aclose()  # ends the request before the reply goes out
                    break
        except Exception as exc:  # noqa: BLE001 - one JSON error for people
            status = getattr(exc, "status", 500)
            if not isinstance(status, int) or status < 400:
                status = 500
            if isinstance(exc, ValueError):
                status = 400
            return web.json_response(
                ProtocolError(f"generation failed: {exc}", status).to_json(), status=status
            )
        usage = usage_json(num_prompt_tokens, len(choice.token_ids), num_cached_tokens)
        resp = web.json_response(
            response_json(
                req.kind,
                request_id,
                model,
                choice.text,
                choice.token_ids,
                finish_reason,
                usage,
                created,
                lp_renderer.render(choice.token_ids, kept_entries) if lp_renderer else None,
            )
        )
    if metrics is not None:
        metrics.observe_request(
            timer.ttft, timer.tpot, finish_reason, num_prompt_tokens, len(choice.token_ids)
        )
    return resp
