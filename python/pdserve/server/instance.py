"""The instance server: one engine (prefill, decode or both) behind the OpenAI API and the internal API.

This file holds the lifecycle, stats/events, health and registration with the scheduler; generation
(engine streams, the OpenAI endpoints, the scheduler's generate stream) lives in instance_generate.py
and the prefill/decode request path in instance_pd.py, mixins over the same state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid

import aiohttp
from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.auth import auth_middleware, cluster_headers, describe
from pdserve.server.cli_serve import ConfigError, ServeConfig
from pdserve.server.engine_loop import EngineLoop
from pdserve.server.instance_generate import GenerateHandlersMixin
from pdserve.server.instance_pd import PDHandlersMixin, Peer
from pdserve.server.instance_prefill import PeerTargets, PrefillState
from pdserve.server.kv_staging import StagingArena
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.openai_json import models_json
from pdserve.server.protocol import (
    ProtocolError,
    error_message,
)
from pdserve.server.transport import KVLinks
from pdserve.transfer import KVLayout

log = logging.getLogger("pdserve.instance")
MAX_EVENT_LOG = 200_000


class InstanceServer(PDHandlersMixin, GenerateHandlersMixin):
    def __init__(self, config: ServeConfig):
        self.config = config
        self.incarnation = uuid.uuid4().hex[:8]
        host = config.advertise_host
        self.url = f"http://{host}:{config.port}"
        self.instance_id = f"{config.role}@{host}:{config.port}"
        self.metrics = ServerMetrics("instance")
        self.engine = None
        self.loop_thread: EngineLoop | None = None
        self.tokenizer = None
        self.layout: KVLayout | None = None  # rank 0's KV
        self.layouts: list[KVLayout] = []  # every tensor-parallel rank's KV (index = rank)
        self.kv_dtype: str | None = None
        self.transport: KVLinks | None = None  # None on a colocated instance
        self.arena: StagingArena | None = None  # host staging of GPU KV (no --enable-direct)
        # staged receives: request key -> (KV block ids, the staging slots their bytes land in)
        self.staged: dict[str, tuple[list[int], list[int]]] = {}
        self.peers: dict[str, Peer] = {}
        # prefill side: written on the event loop, read by the layer hook on the engine thread
        self.prefills: dict[str, PrefillState] = {}
        # prefill side: where the KV of prefills not here yet goes (or why they are cancelled), until
        # they come or the entry expires (event loop only)
        self.early_targets: dict[str, tuple[asyncio.TimerHandle, PeerTargets | str]] = {}
        self.reservations: dict[str, asyncio.TimerHandle] = {}  # decode side: request id -> expiry
        # P's back-transfers: request id -> (cached block ids, new block ids, expiry handle)
        self.dcache_reservations: dict[str, tuple[list[int], list[int], asyncio.TimerHandle]] = {}
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
        try:
            self.tokenizer = ea.engine_tokenizer(self.engine)
            # one layout per tensor-parallel rank, every rank's KV addressable in this process
            self.layouts = ea.kv_layouts(self.engine)
            self.layout = self.layouts[0]
            self.kv_dtype = ea.kv_dtype(self.engine)
            if self.config.role != "both" and self._use_staging():
                self.arena = StagingArena(
                    ea.kv_tensors(self.engine), self.config.use_agg_block, self._num_staging_slots()
                )
            if self.config.role != "both":
                self.transport = KVLinks(
                    loop,
                    self.config.host,
                    self.config.advertise_host,
                    self.config.transfer_port,
                    self.arena.layouts if self.arena is not None else self.layouts,
                    self.instance_id,
                    self.config.transfer_timeout,
                    backend="cuda_ipc" if self.config.enable_direct else "tcp",
                    cluster_token=self.config.cluster_token,
                )
        except BaseException as exc:
            await self._shutdown_engine()  # no worker outlives a failed start
            if isinstance(exc, ValueError):
                raise ConfigError(str(exc)) from exc
            raise
        ea.set_layer_hook(self.engine, self._layer_hook)
        self.loop_thread = EngineLoop(self.engine, loop, ea.has_work)
        self.loop_thread.start()
        # every call this session makes is internal (scheduler, peers): it carries the cluster token
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30),
            headers=cluster_headers(self.config.cluster_token),
        )
        if self.config.scheduler_url:
            self._bg_tasks.append(asyncio.create_task(self._register_loop()))
        transfer = f", KV transfer {self.transport.local.address}" if self.transport else ""
        staging = f" via {self.arena.layout.num_blocks} host staging slots" if self.arena else ""
        sched = self.config.scheduler_url or "no scheduler"
        print(
            f"pdserve serve: {self.instance_id} ready at {self.url} ({self.config.served_model_name}, "
            f"{self.layout.num_blocks} KV blocks on {self.layout.device}{transfer}{staging}; "
            f"{describe(self.config.api_key, self.config.cluster_token)}; offering itself to {sched})",
            file=sys.stderr,
            flush=True,
        )

    async def stop(self, app: web.Application) -> None:
        for t in self._bg_tasks:
            t.cancel()
        if self.loop_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.loop_thread.stop)
        if self.transport is not None:
            await self.transport.aclose()
        await self._shutdown_engine()
        if self._session is not None:
            await self._session.close()

    async def _shutdown_engine(self) -> None:
        """Stops the engine's tensor-parallel workers (after the engine thread and the transfers)."""
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, ea.shutdown, engine)
            except Exception:  # noqa: BLE001 - on the way out: say so, keep stopping
                log.exception("stopping the engine's workers failed")

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=64 << 20,
            middlewares=[auth_middleware(self.config.api_key, self.config.cluster_token)],
        )
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
        r.add_post("/internal/v1/prefill/peer", self.h_prefill_peer)
        r.add_post("/internal/v1/decode", self.h_decode)
        r.add_post("/internal/v1/release", self.h_release)
        r.add_post("/internal/v1/link", self.h_link)
        r.add_post("/internal/v1/dcache/reserve", self.h_dcache_reserve)
        r.add_post("/internal/v1/dcache/send", self.h_dcache_send)
        r.add_post("/internal/v1/dcache/commit", self.h_dcache_commit)
        r.add_get("/internal/v1/cache_events", self.h_cache_events)
        return app

    def _use_staging(self) -> bool:
        mode = self.config.kv_staging
        if self.config.enable_direct:  # the GPU transport reads and writes the KV blocks themselves
            return False
        return mode == "on" or (mode == "auto" and not self.layout.device.startswith("cpu"))

    def _num_staging_slots(self) -> int:
        # --staging-gb is per rank, like --kv-cache-gb
        block_nbytes = self.layout.num_layers * self.layout.piece_nbytes
        return max(1, int(self.config.staging_gb * (1 << 30)) // block_nbytes)

    # ----------------------------------------------------------------- helpers
    async def call(self, fn, after_failure: bool = False):
        """Runs fn(engine) on the engine thread; `after_failure`: also once the engine failed (releases,
        stats: the block manager lives here and still works)."""
        return await self.loop_thread.call(fn, after_failure=after_failure)

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
            "kv_dtype": self.kv_dtype,
            "layout": self.layout.to_dict() if self.layout else None,
            "layouts": [x.to_dict() for x in self.layouts],
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

        engine_stats, invariant_error, events = await self.call(collect, after_failure=True)
        t = self.transport
        self._append_events(events)
        s = dict(engine_stats)
        s.update(
            {
                "instance_id": self.instance_id,
                "incarnation": self.incarnation,
                "role": self.config.role,
                "invariant_error": invariant_error,
                # the engine failed (a TP worker died): the scheduler stops routing here
                "lost": self.loop_thread.error is not None,
                "engine_error": repr(self.loop_thread.error) if self.loop_thread.error else None,
                "num_reservations": len(self.reservations),
                "num_pinned_prefills": len(self.prefills),
                "num_dcache_reservations": len(self.dcache_reservations),
                "num_staged": len(self.staged),
                "num_free_staging_slots": self.arena.num_free_slots if self.arena else 0,
                "num_staging_slots": self.arena.layout.num_blocks if self.arena else 0,
                "num_pending_transfers": t.num_pending() if t else 0,
                # handlers reading an engine request's outputs (0 once every request ended)
                "num_open_streams": self.loop_thread.num_open_streams,
                "kv_bytes_sent": t.bytes_sent if t else 0,
                "kv_num_sends": t.num_sends if t else 0,
                "kv_bytes_received": t.bytes_received if t else 0,
                "kv_seconds_receiving": t.seconds_receiving if t else 0.0,
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

    # ----------------------------------------------------------------- public API
    async def h_models(self, request):
        return web.json_response(models_json(self.config.served_model_name, int(self.started)))

    async def h_health(self, request):
        if self.loop_thread is None or self.loop_thread.error is not None:
            error = self.loop_thread and self.loop_thread.error
            lost = error is not None and ea.is_worker_failure(error)
            return web.json_response(
                {
                    # lost: a tensor-parallel worker died; the engine cannot step any more
                    "status": "lost" if lost else "error",
                    "instance_id": self.instance_id,
                    "error": repr(error),
                },
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
        self.metrics.sync_transfer(
            s["kv_bytes_sent"], s["kv_bytes_received"], s["kv_seconds_receiving"]
        )
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

    async def _get_json(self, url: str) -> dict:
        async with self._session.get(url) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"GET {url}: {error_message(data, resp.status)}")
            return data

    async def _post_json(self, url: str, payload: dict) -> dict:
        async with self._session.post(url, json=payload) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(error_message(data, resp.status))
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
                    if self.loop_thread.error is not None:
                        log.error("engine failed: no more heartbeats, the scheduler will drop us")
                        return
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
                        "registering with scheduler %s failed (%s); retrying in the background",
                        url,
                        exc,
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
