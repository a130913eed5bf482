"""The instance server: one engine (prefill, decode or both) behind the OpenAI API and the internal API.

Request path pieces on this side (SPEC §4): decode instances *reserve* blocks and expect KV bytes;
prefill instances run PREFILL_ONLY requests whose layer hook pushes each layer's KV to the decode
peer; decode instances wait for the KV, then decode and stream. Blocks on P stay pinned until the
scheduler says D has them (`release`). Every path out of a request releases what it holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.cli_serve import ConfigError, ServeConfig
from pdserve.server.engine_loop import ENGINE_DEAD, EngineLoop
from pdserve.server.kv_pieces import LayoutInfo, build_pieces, merge_pieces
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.openai_render import TokenDelta, render_response
from pdserve.server.protocol import (
    ProtocolError,
    SamplingSpec,
    models_json,
    parse_chat,
    parse_completion,
)
from pdserve.server.transport import KVTransport, TransferAborted, make_transport

log = logging.getLogger("pdserve.instance")
MAX_EVENT_LOG = 200_000


@dataclass
class PrefillState:
    """A PREFILL_ONLY request on P: where its KV goes. `sent_per_layer[l]` counts blocks handed over."""

    request_id: str
    peer_id: str
    peer_block_ids: list[int]
    layerwise: bool
    sent_per_layer: list[int]
    whole_items: list[tuple[int, list[int], list[int]]] = field(
        default_factory=list
    )  # (layer, local, remote)
    error: str | None = None
    nbytes_sent: int = 0


@dataclass
class Peer:
    peer_id: str
    url: str
    layout: LayoutInfo
    incarnation: str | None = None


def json_error(status: int, message: str) -> web.Response:
    return web.json_response(ProtocolError(message, status).to_json(), status=status)


class InstanceServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.incarnation = uuid.uuid4().hex[:8]
        host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
        self.url = f"http://{host}:{config.port}"
        self.instance_id = f"{config.role}@{host}:{config.port}"
        self.metrics = ServerMetrics("instance")
        self.engine = None
        self.loop_thread: EngineLoop | None = None
        self.tokenizer = None
        self.layout: LayoutInfo | None = None
        self.transport: KVTransport | None = None
        self.peers: dict[str, Peer] = {}
        self.prefills: dict[
            str, PrefillState
        ] = {}  # written on the event loop, read by the layer hook
        self.reservations: dict[str, asyncio.TimerHandle] = {}  # decode side: request id -> expiry
        # prefill side, back-transfer: request id -> (cached block ids, new block ids receiving D's KV)
        self.dcache_reservations: dict[str, tuple[list[int], list[int]]] = {}
        self.event_log: list[dict] = []
        self.event_log_first_seq = 0  # seq of event_log[0]
        self.num_prefill_computed_tokens = 0
        self.num_requests_served = 0
        self.started = time.time()
        self.scheduler_state = "none" if not config.scheduler_url else "connecting"
        self._session: aiohttp.ClientSession | None = None
        self._bg_tasks: list[asyncio.Task] = []

    # ----------------------------------------------------------------- lifecycle
    async def start(self, app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        self.engine = await loop.run_in_executor(None, ea.build_engine, self.config)
        self.tokenizer = ea.engine_tokenizer(self.engine)
        self.layout = ea.kv_layout(self.engine)
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "::", "") else self.config.host
        try:
            self.transport = make_transport(
                self.config.kv_transport,
                loop,
                host,
                self.config.transfer_port,
                self.url,
                self.layout,
                self.config.transfer_timeout,
            )
        except ValueError as exc:
            if self.config.role != "both":
                raise ConfigError(str(exc)) from exc
            self.transport = make_transport("http", loop, host, 0, self.url, self.layout, 1.0)
        ea.set_layer_hook(self.engine, self._layer_hook)
        self.loop_thread = EngineLoop(self.engine, loop, ea.has_work)
        self.loop_thread.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        if self.config.scheduler_url:
            self._bg_tasks.append(asyncio.create_task(self._register_loop()))

    async def stop(self, app: web.Application) -> None:
        for t in self._bg_tasks:
            t.cancel()
        if self.loop_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.loop_thread.stop)
        if self.transport is not None:
            await self.transport.aclose()
        if self._session is not None:
            await self._session.close()

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        r = app.router
        r.add_post("/v1/completions", self.h_completions)
        r.add_post("/v1/chat/completions", self.h_chat)
        r.add_get("/v1/models", self.h_models)
        r.add_get("/health", self.h_health)
        r.add_get("/metrics", self.h_metrics)
        r.add_get("/internal/v1/info", self.h_info)
        r.add_get("/internal/v1/stats", self.h_stats)
        r.add_post("/internal/v1/tokenize", self.h_tokenize)
        r.add_post("/internal/v1/generate", self.h_generate)
        r.add_post("/internal/v1/reserve", self.h_reserve)
        r.add_post("/internal/v1/prefill", self.h_prefill)
        r.add_post("/internal/v1/decode", self.h_decode)
        r.add_post("/internal/v1/release", self.h_release)
        r.add_post("/internal/v1/link", self.h_link)
        r.add_post("/internal/v1/kv/{request_id}", self.h_kv)
        r.add_post("/internal/v1/dcache/reserve", self.h_dcache_reserve)
        r.add_post("/internal/v1/dcache/send", self.h_dcache_send)
        r.add_post("/internal/v1/dcache/commit", self.h_dcache_commit)
        r.add_get("/internal/v1/cache_events", self.h_cache_events)
        return app

    # ----------------------------------------------------------------- helpers
    async def call(self, fn):
        return await self.loop_thread.call(fn)

    def info(self) -> dict:
        c = self.config
        return {
            "instance_id": self.instance_id,
            "incarnation": self.incarnation,
            "url": self.url,
            "role": c.role,
            "model": c.served_model_name,
            "block_size": c.block_size,
            "tensor_parallel_size": c.tensor_parallel_size,
            "dtype": c.dtype,
            "layout": self.layout.to_dict() if self.layout else None,
            "transfer": self.transport.endpoint() if self.transport else None,
            "num_total_blocks": self.layout.num_blocks if self.layout else 0,
            "flags": {
                "enable_radix_caching": c.enable_radix_caching,
                "enable_layer": c.enable_layer,
                "enable_dcache": c.enable_dcache,
                "use_agg_block": c.use_agg_block,
                "enable_trans_to_dram": c.enable_trans_to_dram,
                "enable_radix_evictor": c.enable_radix_evictor,
            },
        }

    async def stats(self, events_since: int | None = None) -> dict:
        def collect(engine):
            return ea.stats(engine), ea.check_invariants(engine), ea.drain_cache_events(engine)

        engine_stats, invariant_error, events = await self.call(collect)
        self._append_events(events)
        s = dict(engine_stats)
        s.update(
            {
                "instance_id": self.instance_id,
                "incarnation": self.incarnation,
                "role": self.config.role,
                "invariant_error": invariant_error,
                "num_reservations": len(self.reservations),
                "num_pinned_prefills": len(self.prefills),
                "num_dcache_reservations": len(self.dcache_reservations),
                "num_pending_transfers": self.transport.num_pending(),
                "kv_bytes_sent": self.transport.bytes_sent,
                "kv_bytes_received": self.transport.bytes_received,
                "kv_seconds_receiving": self.transport.seconds_receiving,
                "num_prefill_computed_tokens": self.num_prefill_computed_tokens,
                "num_requests_served": self.num_requests_served,
                "event_seq": self.event_log_first_seq + len(self.event_log),
            }
        )
        s.setdefault("num_total_blocks", self.layout.num_blocks)
        if events_since is not None:
            s["events"], s["events_first_seq"] = self._events_since(events_since)
        return s

    def _append_events(self, events: list[dict]) -> None:
        self.event_log.extend(events)
        overflow = len(self.event_log) - MAX_EVENT_LOG
        if overflow > 0:
            del self.event_log[:overflow]
            self.event_log_first_seq += overflow

    def _events_since(self, seq: int) -> tuple[list[dict], int]:
        start = max(seq, self.event_log_first_seq)
        return self.event_log[start - self.event_log_first_seq :], start

    def _check_role(self, *roles: str) -> None:
        if self.config.role not in roles:
            raise ProtocolError(
                f"this is a {self.config.role} instance; this endpoint needs role {' or '.join(roles)}"
                + (" (send public requests to the scheduler)" if "both" in roles else ""),
                status=400,
            )

    async def _body(self, request: web.Request) -> dict:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ProtocolError("request body is not valid JSON") from None

    async def _engine_stream(self, request_id: str, add_fn, q=None):
        """Adds a request through `add_fn(engine)` and yields TokenDeltas until it finishes.

        On any early exit (client gone, error) the request is aborted and its blocks released.
        """
        q = q or self.loop_thread.open_stream(request_id)
        finished = False
        try:
            await self.call(add_fn)
            while True:
                out = await q.get()
                if out is ENGINE_DEAD:
                    raise RuntimeError(f"engine thread died: {self.loop_thread.error!r}")
                _, new_ids, finish, num_cached = ea.output_fields(out)
                yield TokenDelta(new_ids, finish, num_cached)
                if finish is not None:
                    finished = True
                    return
        finally:
            self.loop_thread.close_stream(request_id)
            if not finished:
                await self._abort_and_release(request_id)

    async def _abort_and_release(self, request_id: str) -> None:
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
            await self.call(both)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.exception("releasing %s failed", request_id)

    # ----------------------------------------------------------------- public API
    async def _public(self, request: web.Request, parse) -> web.StreamResponse:
        try:
            self._check_role("both")
            req = parse(await self._body(request))
            token_ids = self._tokenize(req)
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        request_id = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        spec = req.sampling
        self.num_requests_served += 1
        deltas = self._engine_stream(
            request_id, lambda e: ea.add_colocated(e, request_id, token_ids, spec)
        )
        try:
            return await render_response(
                request,
                req,
                request_id,
                self.config.served_model_name,
                len(token_ids),
                deltas,
                self.tokenizer.decode,
                self.metrics,
            )
        except ValueError as exc:  # the engine refused the request (too long, ...)
            return json_error(400, str(exc))
        finally:
            await deltas.aclose()

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

    async def h_models(self, request):
        return web.json_response(models_json(self.config.served_model_name, int(self.started)))

    async def h_health(self, request):
        if self.loop_thread is None or self.loop_thread.error is not None:
            return web.json_response(
                {"status": "error", "error": repr(self.loop_thread and self.loop_thread.error)},
                status=503,
            )
        return web.json_response(
            {
                "status": "ok",
                "role": self.config.role,
                "instance_id": self.instance_id,
                "scheduler": self.scheduler_state,
            }
        )

    async def h_metrics(self, request):
        s = await self.stats()
        self.metrics.update_from_stats(s)
        t = self.transport
        self.metrics.sync_transfer(t.bytes_sent, t.bytes_received, t.seconds_receiving)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    # ----------------------------------------------------------------- internal API
    async def h_info(self, request):
        return web.json_response(self.info())

    async def h_stats(self, request):
        since = request.query.get("events_since")
        return web.json_response(await self.stats(int(since) if since is not None else None))

    async def h_cache_events(self, request):
        since = int(request.query.get("since", 0))
        s = await self.stats(since)
        return web.json_response(
            {"events": s["events"], "first_seq": s["events_first_seq"], "next_seq": s["event_seq"]}
        )

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
                await resp.write((json.dumps(line) + "\n").encode())
            await resp.write_eof()
        except ConnectionResetError:
            # the scheduler went away (its client left): the caller's `finally` aborts and releases
            log.info("stream of %s closed by the peer", request.path)
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
        deltas = self._engine_stream(
            request_id, lambda e: ea.add_colocated(e, request_id, token_ids, spec)
        )
        try:
            return await self._ndjson(request, deltas)
        finally:
            await deltas.aclose()

    async def h_reserve(self, request):
        """D: lock the cached prefix, reserve blocks for the rest, expect their KV bytes."""
        try:
            self._check_role("decode")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"reserve needs request_id and prompt_token_ids: {exc}")
        if request_id in self.reservations:
            return json_error(409, f"request {request_id} already holds a reservation here")
        try:
            res = await self.call(lambda e: ea.reserve(e, request_id, token_ids))
        except Exception as exc:  # noqa: BLE001
            if ea.is_no_capacity(exc):
                return web.json_response(
                    ProtocolError(str(exc), 503).to_json(), status=503, headers={"Retry-After": "1"}
                )
            return json_error(400, f"reserve failed: {exc}")
        nbytes = len(res.new_block_ids) * self.layout.num_layers * self.layout.piece_nbytes
        self.transport.expect(request_id, nbytes)
        loop = asyncio.get_running_loop()
        # A reservation nobody uses (scheduler gone) expires instead of holding blocks forever.
        self.reservations[request_id] = loop.call_later(
            self.config.transfer_timeout * 2,
            lambda: asyncio.ensure_future(self._release_reservation(request_id)),
        )
        return web.json_response(
            {
                "request_id": request_id,
                "num_cached_tokens": res.num_cached_tokens,
                "block_ids": res.new_block_ids,
                "num_expected_bytes": nbytes,
            }
        )

    async def _release_reservation(self, request_id: str) -> bool:
        handle = self.reservations.pop(request_id, None)
        if handle is None:
            return False
        handle.cancel()
        await self.transport.abort(request_id)
        await self._abort_and_release(request_id)
        return True

    async def h_prefill(self, request):
        """P: compute the uncached part, push the KV the peer lacks, answer with the first token."""
        try:
            self._check_role("prefill")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
            spec = SamplingSpec.from_dict(body.get("sampling", {}))
            peer_id = str(body["peer_id"])
            num_peer_cached = int(body.get("num_peer_cached_tokens", 0))
            peer_block_ids = [int(b) for b in body["peer_block_ids"]]
            layerwise = bool(body.get("layerwise", self.config.enable_layer))
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(
                400, f"prefill needs request_id, prompt_token_ids, peer_id, peer_block_ids: {exc}"
            )
        peer = self.peers.get(peer_id)
        if peer is None:
            return json_error(
                409, f"no link to decode instance {peer_id}; link first (pdserve link)"
            )
        if request_id in self.prefills:
            return json_error(409, f"request {request_id} is already prefilling here")
        state = PrefillState(
            request_id, peer_id, peer_block_ids, layerwise, [0] * self.layout.num_layers
        )
        self.prefills[request_id] = state
        ok = False
        first_token_id = None
        finish_reason = None
        num_cached = 0
        deltas = self._engine_stream(
            request_id,
            lambda e: ea.add_prefill_only(e, request_id, token_ids, spec, num_peer_cached),
        )
        try:
            async for d in deltas:
                if d.new_token_ids and first_token_id is None:
                    first_token_id = d.new_token_ids[0]
                if d.num_cached_tokens is not None:
                    num_cached = d.num_cached_tokens
                finish_reason = d.finish_reason
            if state.error:
                raise RuntimeError(state.error)
            if not layerwise and state.whole_items:
                self._send_whole(state, peer)
            if state.sent_per_layer and min(state.sent_per_layer) != len(peer_block_ids):
                raise RuntimeError(
                    f"prefill of {request_id} handed {state.sent_per_layer} blocks per layer to the transfer, "
                    f"the decode peer reserved {len(peer_block_ids)}"
                )
            await self.transport.flush(request_id)
            ok = True
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which releases D
            log.warning("prefill %s failed: %s", request_id, exc)
            await self._release_prefill(request_id)
            status = 400 if isinstance(exc, ValueError) else 500
            return json_error(status, f"prefill of {request_id} failed: {exc}")
        finally:
            await deltas.aclose()
            if not ok:
                self.prefills.pop(request_id, None)
        self.num_prefill_computed_tokens += len(token_ids) - num_cached
        if finish_reason == "prefill_done":
            finish_reason = None
        return web.json_response(
            {
                "request_id": request_id,
                "first_token_id": first_token_id,
                "finish_reason": finish_reason,
                "num_cached_tokens": num_cached,
                "num_computed_tokens": len(token_ids) - num_cached,
                "nbytes_sent": state.nbytes_sent,
            }
        )

    def _layer_hook(self, layer_idx: int, items) -> None:
        """Engine thread, after layer `layer_idx`'s KV is written: hand those blocks to the transfer."""
        for request_id, block_ids in items:
            state = self.prefills.get(str(request_id))
            if state is None or state.error:
                continue
            try:
                start = state.sent_per_layer[layer_idx]
                block_ids = [int(b) for b in block_ids]
                remote = state.peer_block_ids[start : start + len(block_ids)]
                if len(remote) != len(block_ids):
                    raise RuntimeError(
                        f"layer {layer_idx}: {start + len(block_ids)} blocks to send, peer reserved "
                        f"{len(state.peer_block_ids)}"
                    )
                state.sent_per_layer[layer_idx] += len(block_ids)
                if state.layerwise:
                    peer = self.peers[state.peer_id]
                    pieces = build_pieces(self.layout, peer.layout, [layer_idx], block_ids, remote)
                    self.transport.send(state.peer_id, state.request_id, pieces)
                    state.nbytes_sent += sum(n for _, _, n in pieces)
                else:
                    state.whole_items.append((layer_idx, block_ids, remote))
            except Exception as exc:  # noqa: BLE001 - never kill the engine thread; the handler reports it
                state.error = f"KV send failed: {exc}"

    def _send_whole(self, state: PrefillState, peer: Peer) -> None:
        pieces = []
        for layer_idx, local, remote in state.whole_items:
            pieces.extend(build_pieces(self.layout, peer.layout, [layer_idx], local, remote))
        pieces = merge_pieces(pieces)
        self.transport.send(state.peer_id, state.request_id, pieces)
        state.nbytes_sent += sum(n for _, _, n in pieces)

    async def _release_prefill(self, request_id: str) -> bool:
        state = self.prefills.pop(request_id, None)
        await self.transport.abort(request_id)
        await self._abort_and_release(request_id)
        return state is not None

    async def h_decode(self, request):
        """D: wait for the reserved KV, then decode from the first token; NDJSON {kv_ready} then tokens."""
        try:
            self._check_role("decode")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
            spec = SamplingSpec.from_dict(body.get("sampling", {}))
            first_token_id = int(body["first_token_id"])
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(
                400, f"decode needs request_id, prompt_token_ids, first_token_id: {exc}"
            )
        handle = self.reservations.get(request_id)
        if handle is None:
            return json_error(
                409, f"request {request_id} holds no reservation here (expired or released)"
            )
        try:
            await self.transport.wait(request_id, self.config.transfer_timeout)
        except (TimeoutError, TransferAborted) as exc:
            await self._release_reservation(request_id)
            return json_error(504 if isinstance(exc, TimeoutError) else 409, str(exc))
        handle.cancel()
        self.reservations.pop(request_id, None)
        self.num_requests_served += 1
        deltas = self._engine_stream(
            request_id, lambda e: ea.add_decode_only(e, request_id, token_ids, spec, first_token_id)
        )
        try:
            return await self._ndjson(request, deltas, first={"kv_ready": True})
        finally:
            await deltas.aclose()

    async def h_release(self, request):
        """Either side: drop everything held for a request (pinned prefill, reservation). Idempotent."""
        try:
            body = await self._body(request)
            request_id = str(body["request_id"])
        except (ProtocolError, KeyError, TypeError) as exc:
            return json_error(400, f"release needs request_id: {exc}")
        released = False
        if request_id in self.prefills:
            released = await self._release_prefill(request_id)
        if request_id in self.reservations:
            released = await self._release_reservation(request_id) or released
        if request_id in self.dcache_reservations:
            released = await self._release_dcache(request_id) or released
        if body.get("abort", False):
            await self._abort_and_release(request_id)
        return web.json_response({"request_id": request_id, "released": released})

    async def h_link(self, request):
        """Connect this instance's transport to a peer's: {peer_url} (its /internal/v1/info is fetched)."""
        try:
            body = await self._body(request)
            peer_url = str(body["peer_url"]).rstrip("/")
        except (ProtocolError, KeyError, TypeError) as exc:
            return json_error(400, f"link needs peer_url: {exc}")
        try:
            info = body.get("peer_info") or await self._get_json(f"{peer_url}/internal/v1/info")
            layout = LayoutInfo.from_any(info["layout"])
            why = self.layout.compatible_with(layout)
            if why:
                return json_error(400, f"cannot link to {info['instance_id']}: {why}")
            known = self.peers.get(info["instance_id"])
            if known is None or known.incarnation != info.get("incarnation"):
                await self.transport.connect(info["instance_id"], info["transfer"])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return json_error(502, f"peer {peer_url} unreachable: {exc}")
        except ValueError as exc:
            return json_error(400, str(exc))
        self.peers[info["instance_id"]] = Peer(
            info["instance_id"], peer_url, layout, info.get("incarnation")
        )
        return web.json_response(
            {"linked": True, "instance_id": self.instance_id, "peer_id": info["instance_id"]}
        )

    async def h_kv(self, request):
        request_id = request.match_info["request_id"]
        body = await request.read()
        try:
            n = self.transport.receive(request_id, body)
        except TransferAborted as exc:
            return json_error(409, str(exc))
        except ValueError as exc:
            return json_error(400, str(exc))
        return web.json_response({"received": n})

    # ---- dcache: D's finished sequence's new blocks go back to P
    async def h_dcache_reserve(self, request):
        """P: reserve blocks for the whole blocks of `token_ids` P lacks; expect their bytes."""
        try:
            self._check_role("prefill")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["token_ids"]]
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"dcache/reserve needs request_id and token_ids: {exc}")
        bs = self.config.block_size
        token_ids = token_ids[: len(token_ids) // bs * bs]
        key = f"{request_id}.dcache"
        try:
            res = await self.call(lambda e: ea.reserve(e, key, token_ids))
        except Exception as exc:  # noqa: BLE001 - dcache is best effort
            return json_error(503, f"no room for the back-transfer: {exc}")
        self.dcache_reservations[request_id] = (res.cached_block_ids, res.new_block_ids)
        nbytes = len(res.new_block_ids) * self.layout.num_layers * self.layout.piece_nbytes
        self.transport.expect(key, nbytes)
        return web.json_response(
            {
                "num_cached_tokens": res.num_cached_tokens,
                "block_ids": res.new_block_ids,
                "num_tokens": len(token_ids),
            }
        )

    async def h_dcache_send(self, request):
        """D: send the blocks of `token_ids` from block `from_block` on to P's `peer_block_ids`."""
        try:
            self._check_role("decode")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["token_ids"]]
            peer_id = str(body["peer_id"])
            from_block = int(body["from_block"])
            peer_block_ids = [int(b) for b in body["peer_block_ids"]]
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(
                400,
                f"dcache/send needs request_id, token_ids, peer_id, from_block, peer_block_ids: {exc}",
            )
        peer = self.peers.get(peer_id)
        if peer is None:
            return json_error(409, f"no link to prefill instance {peer_id}")
        key = f"{request_id}.dcache"
        layout = self.layout

        def lock_and_send(engine):
            # Lock what this instance holds of the sequence (its radix tree kept it at finish) and send it;
            # the blocks stay locked (reserved under `key`) until the send is flushed.
            res = ea.reserve(engine, key, token_ids)
            try:
                held = res.cached_block_ids[from_block : from_block + len(peer_block_ids)]
                if len(held) < len(peer_block_ids):
                    return 0, 0  # evicted meanwhile: send nothing, P drops its reservation
                pieces = build_pieces(
                    layout,
                    peer.layout,
                    list(range(layout.num_layers)),
                    held,
                    peer_block_ids[: len(held)],
                )
                self.transport.send(peer_id, key, pieces)
                return len(held), sum(n for _, _, n in pieces)
            except BaseException:
                ea.release(engine, key)
                raise

        try:
            num_blocks, nbytes = await self.call(lock_and_send)
            await self.transport.flush(key)
        except Exception as exc:  # noqa: BLE001
            await self.transport.abort(key)
            return json_error(500, f"dcache send failed: {exc}")
        finally:
            await self.call(lambda e: ea.release(e, key))
        return web.json_response({"num_blocks": num_blocks, "nbytes": nbytes})

    async def h_dcache_commit(self, request):
        """P: once the bytes are in, insert the blocks into the radix tree and drop the reservation."""
        try:
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["token_ids"]]
            num_blocks = int(body["num_blocks"])  # how many new blocks D actually sent
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"dcache/commit needs request_id, token_ids, num_blocks: {exc}")
        held = self.dcache_reservations.get(request_id)
        if held is None:
            return json_error(409, f"no back-transfer reserved for {request_id}")
        cached_ids, new_ids = held
        key = f"{request_id}.dcache"
        num_inserted = 0
        try:
            if num_blocks == len(new_ids):  # else D no longer held them all: the bytes never come
                await self.transport.wait(key, self.config.transfer_timeout)
                block_ids = cached_ids + new_ids
                bs = self.config.block_size
                num_inserted = await self.call(
                    lambda e: ea.insert_cached(e, token_ids[: len(block_ids) * bs], block_ids)
                )
        except Exception as exc:  # noqa: BLE001 - best effort: the next turn just hits less
            log.warning("dcache commit of %s failed: %s", request_id, exc)
        finally:
            await self._release_dcache(request_id)
        return web.json_response({"num_inserted_blocks": num_inserted})

    async def _release_dcache(self, request_id: str) -> bool:
        if self.dcache_reservations.pop(request_id, None) is None:
            return False
        key = f"{request_id}.dcache"
        await self.transport.abort(key)
        await self._abort_and_release(key)
        return True

    # ----------------------------------------------------------------- registration
    async def _get_json(self, url: str) -> dict:
        async with self._session.get(url) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def _post_json(self, url: str, payload: dict) -> dict:
        async with self._session.post(url, json=payload) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(data.get("error", {}).get("message", f"HTTP {resp.status}"))
            return data

    async def _register_loop(self) -> None:
        """Offer this instance to the scheduler and heartbeat; re-register whenever it forgets us."""
        url = self.config.scheduler_url
        warned = False
        while True:
            try:
                await self._post_json(
                    f"{url}/internal/v1/register", {"url": self.url, "info": self.info()}
                )
                self.scheduler_state = "registered"
                log.info("registered with scheduler %s", url)
                warned = False
                while True:
                    await asyncio.sleep(self.config.heartbeat_interval)
                    s = await self.stats()
                    reply = await self._post_json(
                        f"{url}/internal/v1/heartbeat",
                        {
                            "instance_id": self.instance_id,
                            "incarnation": self.incarnation,
                            "stats": s,
                        },
                    )
                    if not reply.get("known", False):
                        break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the scheduler may not be up yet: retry
                self.scheduler_state = "connecting"
                if not warned:
                    log.warning(
                        "scheduler %s not reachable yet (%s); retrying in the background", url, exc
                    )
                    warned = True
                await asyncio.sleep(min(1.0, self.config.heartbeat_interval))


def serve_forever(config: ServeConfig) -> int:
    server = InstanceServer(config)
    try:
        app = server.build_app()
        web.run_app(
            app,
            host=config.host,
            port=config.port,
            print=None,
            access_log=None,
            handle_signals=True,
        )
    except ConfigError as exc:
        print(f"pdserve serve: error: {exc}", flush=True, file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"pdserve serve: error: cannot listen on {config.host}:{config.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return 0
