"""Turns streams of generated token ids into an OpenAI response (SSE or one JSON), for instances and scheduler.

One producer per choice (`n` per prompt; a completions batch has several prompts), each an async
iterator of `TokenDelta`s, started by `choices.start_choices`; the renderer reads them as they arrive,
detokenizes each choice incrementally, cuts it at the request's stop strings (then tells the caller
through `on_stop` and closes that producer, which ends its request where it runs), writes SSE chunks
under each choice's index (then an optional usage chunk and `data: [DONE]`) or one JSON body, and
records TTFT/TPOT.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from pdserve.server.choices import Arrivals, ChoiceStream, TokenDelta
from pdserve.server.detokenize import ChoiceText
from pdserve.server.metrics import ServerMetrics
from pdserve.server.openai_json import (
    SSE_DONE,
    choice_json,
    chunk_json,
    response_json,
    sse,
    usage_chunk_json,
    usage_json,
)
from pdserve.server.protocol import GenerateRequest, ProtocolError


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

    def render(self, token_ids: list[int], entries: list[dict | None]) -> dict:
        """`entries[i]` = {"logprob", "top": [[id, logprob], ...]} of token_ids[i] (TokenDelta), or
        None (completions only: an echoed prompt's first token, which has no log-probability)."""
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
        tops: list[dict[str, float] | None] = []
        for entry in entries:
            if entry is None:
                tops.append(None)
                continue
            top: dict[str, float] = {}
            for t, lp in entry["top"]:  # tokens whose texts collide keep the likeliest's value
                top.setdefault(self._decode([t]), lp)
            tops.append(top)
        return {
            "tokens": texts,
            "token_logprobs": [None if e is None else e["logprob"] for e in entries],
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
    """TTFT and mean TPOT of one choice, from `start` (`time.perf_counter()`, default now)."""

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
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


@dataclass
class _Echo:
    """What an `echo` reply puts before each choice's text: the prompt's text, and with logprobs its
    tokens and their entries (None for the first token)."""

    text: str
    token_ids: list[int]
    entries: list[dict | None] | None


class _ChoiceState:
    """One choice while the reply renders: its text, timer, logprobs and what is not sent yet."""

    def __init__(
        self, index: int, req: GenerateRequest, decode, started: float, echo: _Echo | None = None
    ):
        self.index = index
        self.echo = echo
        self.echo_only = req.echo_only  # the one token sampled stays out of the reply
        self.text = ChoiceText(
            decode, req.stop, incremental=req.stream, min_tokens=req.sampling.min_tokens
        )
        self.timer = StreamTimer(started)
        # logprobs asked: one entry per kept token, rendered with the text that carries it
        self.lp = LogprobsRenderer(req.kind, decode) if req.sampling.logprobs is not None else None
        self.entries: list[dict] = []
        self.unsent_ids: list[
            int
        ] = []  # tokens whose text is held back (a split character, a stop)
        self.first = True  # no chunk sent yet
        self.finish_reason: str | None = None
        self.num_cached_tokens = 0

    def add(self, d: TokenDelta) -> tuple[str, str | None]:
        """Takes a delta: (the text that may go out now, the finish reason when the choice ended)."""
        if d.num_cached_tokens is not None:
            self.num_cached_tokens = d.num_cached_tokens
        new_ids = [] if self.echo_only else d.new_token_ids
        kept, text = self.text.add(new_ids, final=d.finish_reason is not None)
        self.timer.tokens(len(kept))
        self.unsent_ids.extend(kept)
        if self.lp is not None:
            self.entries.extend(kept_logprobs(d, kept))
        end = "stop" if self.text.stopped else d.finish_reason
        if end is not None and self.echo_only:
            end = "length"  # the prompt alone, as asked: whatever ended the one token sampled
        self.finish_reason = end or self.finish_reason
        return text, end

    def chunk(
        self, req, request_id, model, text: str, end: str | None, created: int
    ) -> dict | None:
        """The SSE chunk for what `add` returned, or None when nothing is due yet."""
        if not (text or end is not None or (self.first and (self.unsent_ids or self.echo))):
            return None
        logprobs = None
        if self.lp is not None:
            logprobs = self._render_logprobs(self.unsent_ids, self.entries)
            self.entries = []
        if self.first and self.echo is not None:
            text = self.echo.text + text
        chunk = chunk_json(
            req.kind,
            request_id,
            model,
            self.index,
            text,
            self.unsent_ids,
            end,
            created,
            self.first,
            logprobs,
        )
        self.unsent_ids = []
        self.first = False
        return chunk

    def whole(self, kind: str) -> dict:
        """The whole choice, for a non-stream reply."""
        logprobs = self._render_logprobs(self.text.token_ids, self.entries) if self.lp else None
        text = self.text.text if self.echo is None else self.echo.text + self.text.text
        return choice_json(
            kind, self.index, text, self.text.token_ids, self.finish_reason, logprobs
        )

    def _render_logprobs(self, token_ids: list[int], entries: list[dict]) -> dict:
        """The logprobs object of these tokens, after the echoed prompt's when this is the first."""
        if not (self.first and self.echo is not None and self.echo.entries is not None):
            return self.lp.render(token_ids, entries)
        head = self.lp.render(self.echo.token_ids, self.echo.entries)
        tail = self.lp.render(token_ids, entries)
        return {key: head[key] + tail[key] for key in head}


async def render_response(
    http_request: web.Request,
    req: GenerateRequest,
    request_id: str,
    model: str,
    prompt_token_ids: list[list[int]],
    streams: list[ChoiceStream],
    decode,
    metrics: ServerMetrics | None = None,
    on_stop: Callable[[int], None] | None = None,
    started: float | None = None,
) -> web.StreamResponse:
    """Renders the choices' deltas (`streams[i]` is choice i, of prompt i // req.n: `prompt_token_ids`
    has each prompt's tokens, one prompt unless a completions batch) to their ends, or until a stop string
    ends a choice or the client leaves: a choice's stream is closed then (here on a stop string,
    before the reply ends; by the caller when the client leaves), which aborts its request and
    releases its blocks. `on_stop(i)` is called right before a stop string closes choice i (never
    when the client leaves), so the producer can tell the two apart. `started`: the request's
    arrival (`time.perf_counter()`), which TTFT counts from (default: now)."""
    created = int(time.time())
    started = time.perf_counter() if started is None else started
    n = req.n
    if len(streams) != n * len(prompt_token_ids):
        raise RuntimeError(  # our bug: a 500
            f"{len(streams)} choice streams for {len(prompt_token_ids)} prompts of {n} choices"
        )
    echoes = [
        _echo(part, streams[p * n], ids, decode) if req.echo else None
        for p, (part, ids) in enumerate(zip(req.each_prompt(), prompt_token_ids, strict=True))
    ]
    choices = [_ChoiceState(i, req, decode, started, echoes[i // n]) for i in range(len(streams))]
    num_prompt_tokens = sum(len(ids) for ids in prompt_token_ids)
    arrivals = Arrivals(streams)

    async def stop_choice(i: int) -> None:
        if on_stop is not None:
            on_stop(i)
        await arrivals.close(i)  # ends the request now, before the reply ends

    try:
        if req.stream:
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(http_request)
            try:
                while (arrival := await arrivals.next()) is not None:
                    i, d = arrival
                    choice = choices[i]
                    text, end = choice.add(d)
                    chunk = choice.chunk(req, request_id, model, text, end, created)
                    if chunk is not None:
                        await resp.write(sse(chunk))
                    if choice.text.stopped:
                        await stop_choice(i)
                usage = _usage(choices, num_prompt_tokens, n)
                if req.include_usage:
                    await resp.write(
                        sse(usage_chunk_json(req.kind, request_id, model, created, usage))
                    )
                await resp.write(SSE_DONE)
                await resp.write_eof()
            except ConnectionResetError:
                return resp  # the client left: the caller closes the streams
            except Exception as exc:  # noqa: BLE001 - headers are out: report in-band, as OpenAI does
                status = getattr(exc, "status", 500)
                try:
                    await resp.write(
                        sse(ProtocolError(f"generation failed: {exc}", status).to_json())
                    )
                    await resp.write(SSE_DONE)
                    await resp.write_eof()
                except ConnectionResetError:
                    pass
                return resp
        else:
            try:
                while (arrival := await arrivals.next()) is not None:
                    i, d = arrival
                    choices[i].add(d)
                    if choices[i].text.stopped:
                        await stop_choice(i)  # before the reply goes out
            except Exception as exc:  # noqa: BLE001 - one JSON error for people
                status = getattr(exc, "status", 500)
                if not isinstance(status, int) or status < 400:
                    status = 500
                if isinstance(exc, ValueError):
                    status = 400
                return web.json_response(
                    ProtocolError(f"generation failed: {exc}", status).to_json(), status=status
                )
            resp = web.json_response(
                response_json(
                    req.kind,
                    request_id,
                    model,
                    [choice.whole(req.kind) for choice in choices],
                    _usage(choices, num_prompt_tokens, n),
                    created,
                )
            )
    finally:
        await arrivals.aclose()
    if metrics is not None:
        firsts = [c.timer.ttft for c in choices if c.timer.ttft is not None]
        metrics.observe_request(
            min(firsts) if firsts else None,
            choices[0].timer.tpot,
            choices[0].finish_reason,
            num_prompt_tokens,
            sum(len(c.text.token_ids) for c in choices),
        )
    return resp


def _echo(req: GenerateRequest, first: ChoiceStream, prompt_token_ids: list[int], decode) -> _Echo:
    """The echoed prompt of a one-prompt request (`req`; one of a batch's `each_prompt()`): its text
    as sent (a token-id prompt decoded) and, with logprobs, its tokens' entries, which the prompt's
    choice 0's first delta (`first`) carries (only choice 0 computes them)."""
    text = req.prompt if req.prompt is not None else decode(prompt_token_ids)
    entries = None
    delta = first.peek()
    if req.sampling.prompt_logprobs is not None and delta is not None and delta.new_token_ids:
        # (a choice that ended without a token has none to report: its echo is the text alone)
        entries = delta.prompt_logprobs
        if entries is None or len(entries) != len(prompt_token_ids):
            raise RuntimeError(  # an instance's fault, not the client's: a 500
                f"echo with logprobs: the prompt has {len(prompt_token_ids)} tokens, the first "
                f"delta carried {None if entries is None else len(entries)} entries"
            )
    return _Echo(text, list(prompt_token_ids), entries)


def _usage(choices: list[_ChoiceState], num_prompt_tokens: int, n: int) -> dict:
    """Each prompt once (its cache hit as its choice 0 saw it), the completions of every choice."""
    return usage_json(
        num_prompt_tokens,
        sum(len(c.text.token_ids) for c in choices),
        sum(c.num_cached_tokens for c in choices[::n]),
    )
