"""Generation on an instance: each engine request's outputs as a stream of deltas (`EngineStream`), the
OpenAI endpoints of a colocated instance, and the NDJSON streams the scheduler reads (`generate` here,
`decode` in instance_pd.py). A mixin of InstanceServer, over its engine loop and tokenizer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.choices import (
    CancelledOnDisconnect,
    TokenDelta,
    choice_request_id,
    start_choices,
)
from pdserve.server.engine_loop import ENGINE_DEAD, RequestCancelled
from pdserve.server.instance_prefill import json_error, start_error
from pdserve.server.openai_render import render_response
from pdserve.server.protocol import (
    ProtocolError,
    SamplingSpec,
    parse_chat,
    parse_completion,
)

if TYPE_CHECKING:
    from pdserve.server.instance import InstanceServer

log = logging.getLogger("pdserve.instance")
PROMPT_LOGPROBS_PER_LINE = 128  # prompt log-probability entries per NDJSON line (echo)


class EngineStream:
    """A started request's TokenDeltas, as an async iterator. `aclose()` (idempotent) ends it: unless
    it finished, the request is aborted and its blocks released (the client left, an error)."""

    def __init__(self, server: InstanceServer, request_id: str, queue: asyncio.Queue):
        self._server = server
        self._request_id = request_id
        self._queue = queue
        self._finished = False
        self._closed = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._finished or self._closed:
            raise StopAsyncIteration
        loop_thread = self._server.loop_thread
        out = loop_thread.check(await self._queue.get())
        if out is ENGINE_DEAD:
            raise RuntimeError(f"engine failed: {loop_thread.error!r}")
        _, new_ids, finish, num_cached = ea.output_fields(out)
        # set before returning it: a consumer closing us at the last delta ends nothing
        self._finished = finish is not None
        return TokenDelta(
            new_ids, finish, num_cached, ea.output_logprobs(out), ea.output_prompt_logprobs(out)
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.loop_thread.close_stream(self._request_id)
        if not self._finished:
            await self._server._abort_and_release(self._request_id)


class GenerateHandlersMixin:
    """Handlers and helpers of generation; the state lives on InstanceServer."""

    async def _engine_stream(self, request_id: str, add_fn) -> EngineStream:
        """Adds a request through `add_fn(engine)` and returns its deltas. What the engine raised while
        adding (ValueError: it refused the request, e.g. a prompt past the context) is raised here,
        before the caller answered anything, and leaves nothing held. Close the stream (`aclose`)
        on every way out: a request that did not finish is aborted and its blocks released."""
        q = self.loop_thread.open_stream(request_id)
        try:
            await self.call(add_fn)
        except BaseException:
            self.loop_thread.close_stream(request_id)
            await self._abort_and_release(request_id)
            raise
        return EngineStream(self, request_id, q)

    async def _abort_and_release(self, request_id: str) -> None:
        """Ends the request here: aborted in the engine, its blocks released, and a handler still
        reading its stream woken (an aborted request writes nothing more into it)."""
        self.loop_thread.cancel_stream(request_id, "aborted")

        def both(engine):
            try:
                ea.abort(engine, request_id)
            except (KeyError, ValueError):
                pass
            try:
                ea.release(engine, request_id)
            except (KeyError, ValueError):
                pass

        try:
            await self.call(both, after_failure=True)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("releasing %s failed", request_id)

    # ----------------------------------------------------------------- public API
    async def _public(self, request: web.Request, parse) -> web.StreamResponse:
        try:
            self._check_role("both")
            req = parse(await self._body(request))
            token_ids = [self._tokenize(part) for part in req.each_prompt()]
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        request_id = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        arrived = time.perf_counter()
        self.num_requests_served += 1

        async def start(i: int) -> EngineStream:
            choice_id = choice_request_id(request_id, i)
            spec, prompt = req.choice_sampling(i % req.n), token_ids[i // req.n]
            return await self._engine_stream(
                choice_id, lambda e: ea.add_colocated(e, choice_id, prompt, spec)
            )

        streams = []
        try:
            async with CancelledOnDisconnect(request):  # the client leaving ends every choice
                try:
                    streams = await start_choices(req.n, start, len(token_ids))
                except Exception as exc:  # noqa: BLE001 - refused or failed: nothing was sent yet
                    return start_error(request_id, exc)
                return await render_response(
                    request,
                    req,
                    request_id,
                    self.config.served_model_name,
                    token_ids,
                    streams,
                    self.tokenizer.decode,
                    self.metrics,
                    started=arrived,
                )
        finally:
            for stream in streams:
                await stream.aclose()

    def _tokenize(self, req) -> list[int]:
        if req.prompt_token_ids is not None:
            return req.prompt_token_ids
        if req.messages is not None:
            return list(self.tokenizer.encode_chat(req.messages))
        return list(self.tokenizer.encode(req.prompt))

    async def h_completions(self, request):
        return await self._public(request, parse_completion)

    async def h_chat(self, request):
        return await self._public(request, parse_chat)

    # ----------------------------------------------------------------- internal API
    async def h_tokenize(self, request):
        try:
            body = await self._body(request)
            if "messages" in body:
                ids = list(self.tokenizer.encode_chat(body["messages"]))
            else:
                ids = list(self.tokenizer.encode(body["prompt"]))
        except (ProtocolError, KeyError, TypeError) as exc:
            return json_error(400, f"tokenize needs 'prompt' (string) or 'messages': {exc}")
        return web.json_response({"token_ids": ids})

    async def _ndjson(
        self, request: web.Request, deltas, first: dict | None = None
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            if first is not None:
                await resp.write((json.dumps(first) + "\n").encode())
            async for d in deltas:
                line = {"token_ids": d.new_token_ids, "finish_reason": d.finish_reason}
                if d.num_cached_tokens is not None:
                    line["num_cached_tokens"] = d.num_cached_tokens
                if d.logprobs is not None:
                    line["logprobs"] = d.logprobs
                for lo in range(0, len(d.prompt_logprobs or ()), PROMPT_LOGPROBS_PER_LINE):
                    # lines of their own before the delta's: one line stays far below a reader's
                    # line limit (aiohttp's is 512 KiB; 20 top entries are ~600 bytes a token)
                    part = d.prompt_logprobs[lo : lo + PROMPT_LOGPROBS_PER_LINE]
                    await resp.write((json.dumps({"prompt_logprobs": part}) + "\n").encode())
                await resp.write((json.dumps(line) + "\n").encode())
            await resp.write_eof()
        except ConnectionResetError:
            # the scheduler went away (its client left): the caller's `finally` aborts and releases
            log.info("stream of %s closed by the peer", request.path)
        except RequestCancelled as exc:
            # aborted through `release` by the scheduler, which reads this stream no more
            log.info("stream of %s ended: %s", request.path, exc)
        return resp

    async def h_generate(self, request):
        """Colocated generation for the scheduler: NDJSON lines {token_ids, finish_reason}."""
        try:
            self._check_role("both")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
            spec = SamplingSpec.from_dict(body.get("sampling", {}))
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"generate needs request_id and prompt_token_ids: {exc}")
        self.num_requests_served += 1
        try:
            deltas = await self._engine_stream(
                request_id, lambda e: ea.add_colocated(e, request_id, token_ids, spec)
            )
        except Exception as exc:  # noqa: BLE001 - refused (400: the scheduler passes it on) or failed
            return start_error(request_id, exc)
        try:
            return await self._ndjson(request, deltas)
        finally:
            await deltas.aclose()
