"""The global scheduler: the cluster's OpenAI endpoint; picks P and D per request and drives SPEC §4's path.

Mechanism only: which instance is a policy's business (policies.py), what each instance caches is the
prefix index's (prefix_index.py). Per request: D reserves (and says what it holds), P prefills the rest
and pushes the KV D lacks, P's first token goes out, D decodes and streams; P's blocks are released
once D has the KV, and every failure path releases both sides. With dcache, D's new blocks go back to P
(after a request that finished, or that a stop string ended once D held it; not when the client left).
Membership (registration, polling, links) lives in scheduler_cluster.py, the per-request paths on the
instances in scheduler_flows.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from pdserve.server.auth import auth_middleware, cluster_headers, describe
from pdserve.server.choices import (
    CancelledOnDisconnect,
    TokenDelta,
    choice_request_id,
    start_choices,
)
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.openai_json import models_json
from pdserve.server.openai_render import render_response
from pdserve.server.policies import InstanceSnapshot, Policy, RouteContext, make_policy
from pdserve.server.prefix_index import PrefixIndex
from pdserve.server.protocol import (
    GenerateRequest,
    ProtocolError,
    parse_chat,
    parse_completion,
)
from pdserve.server.scheduler_cluster import (
    ClusterError,
    ClusterMembershipMixin,
    InstanceLost,
    InstanceRecord,
    link_pair,  # noqa: F401 - part of this module's API (pdserve link)
)
from pdserve.server.scheduler_flows import RequestFlowsMixin

log = logging.getLogger("pdserve.scheduler")
MAX_MIGRATIONS = 2  # times one request may move to another instance pair after losing one


@dataclass
class SchedulerConfig:
    model: str
    host: str = "127.0.0.1"
    port: int = 8081
    ep_policy: str = "rr"
    ed_policy: str = "rr"
    prefill_urls: list[str] = field(default_factory=list)
    decode_urls: list[str] = field(default_factory=list)
    colocated_urls: list[str] = field(default_factory=list)
    poll_interval: float = 0.5
    instance_timeout: float = 10.0
    seed: int = 0
    layerwise: bool | None = None  # None: each P's own --enable-layer
    dcache: bool | None = None  # None: when D was started with --enable-dcache
    # secrets (repr=False: never printed). The API key guards our /v1/*; the cluster token guards our
    # /internal/* and goes on every call to an instance (a client's Authorization never does)
    api_key: str | None = field(default=None, repr=False)
    cluster_token: str | None = field(default=None, repr=False)


class GlobalScheduler(ClusterMembershipMixin, RequestFlowsMixin):
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.instances: dict[str, InstanceRecord] = {}
        self.index = PrefixIndex()
        self.p_policy: Policy = make_policy(config.ep_policy, "prefill", config.seed)
        self.d_policy: Policy = make_policy(config.ed_policy, "decode", config.seed + 1)
        self.metrics = ServerMetrics("scheduler")
        self.linked: set[tuple[str, str]] = set()
        self.tokenizer = None
        self.num_requests = 0
        self.route_log: list[
            tuple[str, str | None, str | None]
        ] = []  # (request id, P, D), last 1000
        self.started = time.time()
        self._session: aiohttp.ClientSession | None = None
        self._stream_session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._after_tasks: set[asyncio.Task] = set()  # back-transfers and refreshes in flight
        self._link_lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle
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
        r.add_post("/internal/v1/register", self.h_register)
        r.add_post("/internal/v1/heartbeat", self.h_heartbeat)
        r.add_get("/internal/v1/cluster", self.h_cluster)
        r.add_post("/internal/v1/refresh", self.h_refresh)
        return app

    async def start(self, app) -> None:
        # both sessions only call instances' internal API: they carry the cluster token
        internal = cluster_headers(self.config.cluster_token)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=60), headers=internal
        )
        self._stream_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300), headers=internal
        )
        try:
            from pdserve.server.engine_adapter import load_tokenizer

            self.tokenizer = load_tokenizer(self.config.model)
        except Exception as exc:  # noqa: BLE001 - fall back to an instance's /tokenize
            log.warning(
                "no local tokenizer for %s (%s); instances will tokenize", self.config.model, exc
            )
        for role, urls in (
            ("prefill", self.config.prefill_urls),
            ("decode", self.config.decode_urls),
            ("both", self.config.colocated_urls),
        ):
            for url in urls:
                self._tasks.append(asyncio.create_task(self._adopt_fixed(url.rstrip("/"), role)))
        self._tasks.append(asyncio.create_task(self._poll_loop()))
        fixed = self.config.prefill_urls + self.config.decode_urls + self.config.colocated_urls
        print(
            f"pdserve scheduler: listening on http://{self.config.host}:{self.config.port} "
            f"(ep-policy {self.config.ep_policy}, ed-policy {self.config.ed_policy}; "
            f"{describe(self.config.api_key, self.config.cluster_token)}; "
            + (
                f"fixed instances {' '.join(fixed)})" if fixed else "instances register themselves)"
            ),
            file=sys.stderr,
            flush=True,
        )

    async def stop(self, app) -> None:
        for t in [*self._tasks, *self._after_tasks]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._after_tasks, return_exceptions=True)
        for s in (self._session, self._stream_session):
            if s is not None:
                await s.close()

    # ----------------------------------------------------------------- public API
    async def h_completions(self, request):
        return await self._public(request, parse_completion)

    async def h_chat(self, request):
        return await self._public(request, parse_chat)

    async def h_models(self, request):
        return web.json_response(models_json(self.config.model, int(self.started)))

    async def h_health(self, request):
        roles = {}
        for r in self.instances.values():
            roles[r.role] = roles.get(r.role, 0) + 1
        ready = ("prefill" in roles and "decode" in roles) or "both" in roles
        return web.json_response({"status": "ok", "ready": ready, "instances": roles})

    async def h_metrics(self, request):
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _tokenize(self, req: GenerateRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            return req.prompt_token_ids
        if self.tokenizer is not None:
            if req.messages is not None:
                return list(self.tokenizer.encode_chat(req.messages))
            return list(self.tokenizer.encode(req.prompt))
        if not self.instances:
            raise ClusterError("no instance registered yet")
        rec = next(iter(self.instances.values()))
        payload = {"messages": req.messages} if req.messages is not None else {"prompt": req.prompt}
        return (await self._post(f"{rec.url}/internal/v1/tokenize", payload))["token_ids"]

    def _decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""

    async def _public(self, request: web.Request, parse) -> web.StreamResponse:
        arrived = time.perf_counter()
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ProtocolError("request body is not valid JSON") from None
            req = parse(body)
            if req.stop and self.tokenizer is None:
                raise ProtocolError(
                    f"'stop' strings need the scheduler to detokenize, and it could not load the "
                    f"tokenizer of {self.config.model!r} (see its log); use 'stop_token_ids'",
                    param="stop",
                )
            parts = req.each_prompt()
            token_ids = list(await asyncio.gather(*(self._tokenize(part) for part in parts)))
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except ClusterError as exc:
            return web.json_response(
                ProtocolError(str(exc), exc.status).to_json(), status=exc.status
            )
        request_id = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.num_requests += 1
        # set by the renderer at a stop string of choice i, not when the client left
        stopped = [asyncio.Event() for _ in range(req.n * len(parts))]

        async def start(i: int) -> AsyncIterator[TokenDelta]:
            p = i // req.n
            choice_req = dataclasses.replace(parts[p], sampling=req.choice_sampling(i % req.n))
            return self.generate(
                choice_request_id(request_id, i), token_ids[p], choice_req, stopped[i]
            )

        streams = []
        try:
            async with CancelledOnDisconnect(request):  # the client leaving ends every choice
                try:
                    # errors before any token: HTTP errors
                    streams = await start_choices(req.n, start, len(parts))
                except ClusterError as exc:
                    headers = {"Retry-After": "1"} if exc.status == 503 else None
                    return web.json_response(
                        ProtocolError(str(exc), exc.status).to_json(),
                        status=exc.status,
                        headers=headers,
                    )
                return await render_response(
                    request,
                    req,
                    request_id,
                    self.config.model,
                    token_ids,
                    streams,
                    self._decode_text,
                    self.metrics,
                    on_stop=lambda i: stopped[i].set(),
                    started=arrived,
                )
        finally:
            # the renderer closing a choice (a stop string) ends its request on P and D now; the
            # rest end here (the client left, an error)
            for stream in streams:
                await stream.aclose()

    # ----------------------------------------------------------------- routing
    def _candidates(self, role: str) -> list[InstanceSnapshot]:
        return [r.snapshot() for r in self.instances.values() if r.role == role and r.healthy]

    def route(self, token_ids: list[int]) -> tuple[InstanceRecord, InstanceRecord | None]:
        """(P, D) for a prompt; D is None for a colocated instance. Raises ClusterError if none."""
        ctx = RouteContext(list(token_ids), self.index.matcher(token_ids))
        ps = self._candidates("prefill")
        ds = self._candidates("decode")
        if ps and ds:
            linked_ps = [
                p for p in ps if any((p.instance_id, d.instance_id) in self.linked for d in ds)
            ]
            if not linked_ps:
                raise ClusterError("prefill and decode instances are not linked yet; retry shortly")
            p = self.p_policy.choose(linked_ps, ctx)
            ctx.prefill_instance_id = p.instance_id
            linked_ds = [d for d in ds if (p.instance_id, d.instance_id) in self.linked]
            d = self.d_policy.choose(linked_ds, ctx)
            return self.instances[p.instance_id], self.instances[d.instance_id]
        both = self._candidates("both")
        if both:
            return self.instances[self.p_policy.choose(both, ctx).instance_id], None
        have = ", ".join(sorted({r.role for r in self.instances.values()})) or "none"
        raise ClusterError(
            f"no instance pair can serve: need a prefill and a decode instance (or a colocated one); have {have}"
        )

    async def generate(
        self,
        request_id: str,
        token_ids: list[int],
        req: GenerateRequest,
        stopped: asyncio.Event | None = None,
    ) -> AsyncIterator[TokenDelta]:
        """The request's tokens. When an instance is lost on the way, the request migrates: the prompt plus
        the tokens already streamed are prefilled on another pair and the stream goes on (SPEC §7).
        `stopped`: set by the consumer right before it closes us at a stop string (see `_disaggregated`)."""
        emitted: list[int] = []
        for attempt in range(MAX_MIGRATIONS + 1):
            prompt = list(token_ids) + emitted
            sub_req = req
            if emitted:
                # the engines count the emitted tokens as generated (max_tokens, min_tokens,
                # penalties, seeds), so the answer goes on as if it had never moved
                sub_req = dataclasses.replace(
                    req,
                    # the reply already has the prompt's log-probabilities (echo)
                    sampling=dataclasses.replace(
                        req.sampling, num_prior_output_tokens=len(emitted), prompt_logprobs=None
                    ),
                )
            sub_id = request_id if attempt == 0 else f"{request_id}.m{attempt}"
            p, d = self.route(prompt)
            self.route_log.append((sub_id, p.instance_id, d.instance_id if d else None))
            del self.route_log[:-1000]
            steps = (
                self._colocated(p, sub_id, prompt, sub_req)
                if d is None
                else self._disaggregated(p, d, sub_id, prompt, sub_req, stopped)
            )
            try:
                async for delta in steps:
                    if attempt:
                        delta.num_cached_tokens = (
                            None  # usage reports the first attempt's cache hit
                        )
                    emitted.extend(delta.new_token_ids)
                    yield delta
                return
            except InstanceLost as exc:
                lost = self.instances.get(exc.instance_id)
                if lost is not None:
                    lost.healthy = False  # not routed to until a stats pull succeeds
                if attempt == MAX_MIGRATIONS:
                    raise
                log.warning(
                    "request %s lost %s after %d tokens (%s); migrating",
                    request_id,
                    exc.instance_id,
                    len(emitted),
                    exc,
                )
            finally:
                await steps.aclose()
