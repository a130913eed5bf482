"""The global scheduler: the cluster's OpenAI endpoint; picks P and D per request and drives SPEC §4's path.

Mechanism only: which instance is a policy's business (policies.py), what each instance caches is the
prefix index's (prefix_index.py). Per request: D reserves (and says what it holds), P prefills the rest
and pushes the KV D lacks, P's first token goes out, D decodes and streams; P's blocks are released
once D has the KV, and every failure path releases both sides. With dcache, D's new blocks go back to P
(after a request that finished, or that a stop string ended once D held it; not when the client left).
Membership (registration, polling, links) lives in scheduler_cluster.py.
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
from pdserve.server.metrics import CONTENT_TYPE, ServerMetrics
from pdserve.server.openai_render import TokenDelta, render_response, start_choices
from pdserve.server.policies import InstanceSnapshot, Policy, RouteContext, make_policy
from pdserve.server.prefix_index import PrefixIndex
from pdserve.server.protocol import (
    GenerateRequest,
    ProtocolError,
    error_message,
    models_json,
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

log = logging.getLogger("pdserve.scheduler")
MAX_MIGRATIONS = 2  # times one request may move to another instance pair after losing one
PREFILL_TIMEOUT_S = 600.0  # a prefill may wait behind a long queue on a loaded P


def _sub(rec, counter: str, n: int) -> None:
    """Lowers one of an instance record's in-flight counters (a task's done callback)."""
    setattr(rec, counter, getattr(rec, counter) - n)


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


class GlobalScheduler(ClusterMembershipMixin):
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
            token_ids = await self._tokenize(req)
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except ClusterError as exc:
            return web.json_response(
                ProtocolError(str(exc), exc.status).to_json(), status=exc.status
            )
        request_id = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.num_requests += 1
        # set by the renderer at a stop string of choice i, not when the client left
        stopped = [asyncio.Event() for _ in range(req.n)]

        async def start(i: int) -> AsyncIterator[TokenDelta]:
            choice_id = request_id if i == 0 else f"{request_id}.n{i}"
            choice_req = (
                req if i == 0 else dataclasses.replace(req, sampling=req.choice_sampling(i))
            )
            return self.generate(choice_id, token_ids, choice_req, stopped[i])

        try:
            streams = await start_choices(req.n, start)  # errors before any token: HTTP errors
        except ClusterError as exc:
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return web.json_response(
                ProtocolError(str(exc), exc.status).to_json(), status=exc.status, headers=headers
            )
        try:
            return await render_response(
                request,
                req,
                request_id,
                self.config.model,
                len(token_ids),
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
                left = req.sampling.max_tokens - len(emitted)
                sub_req = dataclasses.replace(
                    req, sampling=dataclasses.replace(req.sampling, max_tokens=left)
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

    async def _call(
        self, rec: InstanceRecord, url: str, payload: dict, timeout: float | None = None
    ) -> dict:
        """`_post` to one instance; a transport failure becomes InstanceLost(that instance)."""
        try:
            return await self._post(url, payload, timeout=timeout)
        except ClusterError as exc:
            if isinstance(exc.__cause__, (aiohttp.ClientError, asyncio.TimeoutError)):
                raise InstanceLost(rec.instance_id, str(exc)) from exc
            raise

    async def _ndjson_lines(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
        async for raw in resp.content:
            line = raw.strip()
            if line:
                yield json.loads(line)

    async def _colocated(self, rec, request_id, token_ids, req) -> AsyncIterator[TokenDelta]:
        payload = {
            "request_id": request_id,
            "prompt_token_ids": token_ids,
            "sampling": req.sampling.to_dict(),
        }
        rec.inflight_prefill_tokens += len(token_ids)
        counted = True
        finished = closed_early = False
        try:
            async with self._stream_session.post(
                f"{rec.url}/internal/v1/generate", json=payload
            ) as resp:
                if resp.status != 200:
                    raise _start_failure(rec, resp.status, await resp.json())
                async for line in self._ndjson_lines(resp):
                    if counted:
                        rec.inflight_prefill_tokens -= len(token_ids)
                        counted = False
                    finished = bool(line.get("finish_reason"))
                    yield TokenDelta(
                        line["token_ids"],
                        line.get("finish_reason"),
                        line.get("num_cached_tokens"),
                        line.get("logprobs"),
                    )
                    if finished:
                        return
            raise InstanceLost(
                rec.instance_id, f"{rec.instance_id} closed the stream of {request_id} early"
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceLost(rec.instance_id, f"stream of {request_id}: {exc!r}") from exc
        except GeneratorExit:
            closed_early = not finished  # by the consumer: a stop string, or the client left
            raise
        finally:
            if counted:
                rec.inflight_prefill_tokens -= len(token_ids)
            if closed_early:
                # the instance would abort only at its next write into the closed stream: end it now
                await self._release(rec, request_id, abort=True)
            self._after_request(rec, None, request_id, None)

    async def _disaggregated(
        self, p, d, request_id, token_ids, req, stopped: asyncio.Event | None = None
    ) -> AsyncIterator[TokenDelta]:
        """SPEC §4 for one request on P and D. Closed by the consumer at a stop string (`stopped` set)
        after D's request took the KV, it ends on D as when the client leaves (abort), but D's blocks
        still go back to P (dcache) as after a finished request; when the client left, they do not."""
        bs = int(d.info.get("block_size", 16))
        num_blocks = -(-len(token_ids) // bs)
        d_reserved = p_pinned = False
        d_owns = False  # D's request holds the KV (kv_ready seen): its abort keeps them in D's tree
        # P answered, so D's reservation holds the prompt's KV, and no decode was asked for yet: a
        # request that ends here (at its first token) leaves that KV in D's tree (release keep_kv)
        kv_at_d = False
        finished = False
        all_tokens = list(token_ids)
        reserve = prefill = None
        try:
            # D reserves while P computes: P queues its sends until it learns D's blocks (prefill/peer)
            d.inflight_reserved_blocks += num_blocks
            reserve = asyncio.ensure_future(
                self._call(
                    d,
                    f"{d.url}/internal/v1/reserve",
                    {
                        "request_id": request_id,
                        "prompt_token_ids": token_ids,
                        "peer_id": p.instance_id,
                    },
                )
            )
            reserve.add_done_callback(lambda _: _sub(d, "inflight_reserved_blocks", num_blocks))
            # the previous turn of this conversation may still be sending its KV back to P: wait for it
            # (only for sequences this prompt extends, so unrelated requests never wait)
            earlier = [t for t, seq in p.pending_dcache.items() if token_ids[: len(seq)] == seq]
            if earlier:
                await asyncio.wait(earlier, timeout=5)
            layerwise = self.config.layerwise
            if layerwise is None:
                layerwise = bool(p.info.get("flags", {}).get("enable_layer", False))
            p.inflight_prefill_tokens += len(token_ids)
            p_pinned = (
                True  # from here every way out releases P (which also refuses a late prefill)
            )
            prefill = asyncio.ensure_future(
                self._call(
                    p,
                    f"{p.url}/internal/v1/prefill",
                    {
                        "request_id": request_id,
                        "prompt_token_ids": token_ids,
                        "sampling": req.sampling.to_dict(),
                        "peer_id": d.instance_id,
                        "await_peer": True,
                        "layerwise": layerwise,
                    },
                    timeout=PREFILL_TIMEOUT_S,
                )
            )
            prefill.add_done_callback(lambda _: _sub(p, "inflight_prefill_tokens", len(token_ids)))
            res = await reserve
            d_reserved = True
            if not prefill.done():  # else it failed: nothing to tell P
                await self._call(
                    p,
                    f"{p.url}/internal/v1/prefill/peer",
                    {
                        "request_id": request_id,
                        "num_peer_cached_tokens": res["num_cached_tokens"],
                        "peer_block_ids": res["block_ids"],
                    },
                )
            try:
                pre = await prefill
            except ClusterError:
                p_pinned = False  # P released on its own failure path
                raise
            kv_at_d = True
            first = pre["first_token_id"]
            all_tokens.append(first)
            num_cached = int(pre.get("num_cached_tokens") or 0)
            first_logprobs = pre.get("first_token_logprobs")
            first_logprobs = [first_logprobs] if first_logprobs is not None else None
            if pre.get("finish_reason"):
                finished = True
                yield TokenDelta([first], pre["finish_reason"], num_cached, first_logprobs)
                return
            yield TokenDelta([first], None, num_cached, first_logprobs)
            decode_body = {
                "request_id": request_id,
                "prompt_token_ids": token_ids,
                "sampling": req.sampling.to_dict(),
                "first_token_id": first,
            }
            kv_at_d = False  # D's decode takes the reservation (or releases it when it fails)
            try:
                async with self._stream_session.post(
                    f"{d.url}/internal/v1/decode", json=decode_body
                ) as resp:
                    if resp.status != 200:
                        raise _start_failure(d, resp.status, await resp.json())
                    async for line in self._ndjson_lines(resp):
                        if line.get("kv_ready"):
                            d_reserved = False  # D's request owns the blocks now
                            d_owns = True
                            await self._release(p, request_id)  # D has the KV: unpin P
                            p_pinned = False
                            continue
                        all_tokens.extend(line["token_ids"])
                        # set before the yield: closed at the last delta, D's request still
                        # finished on its own (no abort; its KV may go back to P)
                        finished = bool(line.get("finish_reason"))
                        yield TokenDelta(
                            line["token_ids"], line.get("finish_reason"), None, line.get("logprobs")
                        )
                        if finished:
                            return
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise InstanceLost(
                    d.instance_id, f"decode stream of {request_id}: {exc!r}"
                ) from exc
            raise InstanceLost(
                d.instance_id, f"{d.instance_id} closed the stream of {request_id} early"
            )
        finally:
            # Every way out releases what is still held; release is idempotent on the instances.
            if prefill is not None and not prefill.done():
                prefill.cancel()  # the release below ends it on P
            if reserve is not None:
                # D answers before its release goes out (a release that overtook the reservation
                # would leave it held until it expires)
                await asyncio.wait([reserve])
            for task in (reserve, prefill):
                if task is not None and not task.cancelled():
                    task.exception()  # retrieved: the error that counts was raised above
            if p_pinned:
                await self._release(p, request_id, abort=True)
            if d_reserved and kv_at_d:
                await self._release(d, request_id, keep_kv=True)
            elif d_reserved or not finished:
                await self._release(d, request_id, abort=True)
            # ended by a stop string after D took over: D's abort above put the computed blocks into
            # its tree, so they can go back to P (`stopped` is only ever set at a yield, by the consumer)
            at_stop = not finished and d_owns and stopped is not None and stopped.is_set()
            self._after_request(p, d, request_id, all_tokens if finished or at_stop else None)

    # ----------------------------------------------------------------- after a request
    def _after_request(self, p, d, request_id: str, all_tokens: list[int] | None) -> None:
        """Back-transfer (dcache) and a mirror refresh, off the response path."""
        dcache = self.config.dcache
        if dcache is None and d is not None:
            dcache = bool(d.info.get("flags", {}).get("enable_dcache", False))
        # the blocks go into P's radix tree: pointless when P does not cache
        dcache = bool(
            dcache
            and d is not None
            and all_tokens is not None
            and p.info.get("flags", {}).get("enable_radix_caching", False)
        )
        task = asyncio.create_task(
            self._after_request_task(p, d, request_id, all_tokens if dcache else None)
        )
        self._after_tasks.add(task)
        task.add_done_callback(self._after_tasks.discard)
        if dcache:
            p.pending_dcache[task] = all_tokens
            task.add_done_callback(lambda t: p.pending_dcache.pop(t, None))

    async def _after_request_task(self, p, d, request_id, dcache_tokens) -> None:
        try:
            if dcache_tokens is not None:
                await self._back_transfer(p, d, request_id, dcache_tokens)
            for rec in (p, d):
                if rec is not None and rec.instance_id in self.instances:
                    await self._refresh(rec)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("after-request work of %s failed: %s", request_id, exc)

    async def _back_transfer(self, p, d, request_id: str, all_tokens: list[int]) -> None:
        """D's KV of the finished sequence -> P's radix cache (whole blocks D computed: all tokens but the last)."""
        bs = int(p.info.get("block_size", 16))
        tokens = all_tokens[: (len(all_tokens) - 1) // bs * bs]
        if not tokens:
            return
        res = await self._post(
            f"{p.url}/internal/v1/dcache/reserve",
            {"request_id": request_id, "token_ids": tokens, "peer_id": d.instance_id},
        )
        try:
            if not res["block_ids"]:
                return
            sent = await self._post(
                f"{d.url}/internal/v1/dcache/send",
                {
                    "request_id": request_id,
                    "token_ids": tokens,
                    "peer_id": p.instance_id,
                    "from_block": res["num_cached_tokens"] // bs,
                    "peer_block_ids": res["block_ids"],
                },
            )
            await self._post(
                f"{p.url}/internal/v1/dcache/commit",
                {"request_id": request_id, "token_ids": tokens, "num_blocks": sent["num_blocks"]},
            )
        finally:
            await self._release(p, request_id)  # no-op after a commit


def _start_failure(rec, status: int, body: dict) -> ClusterError:
    """What a generate/decode stream that did not start raises: a 500 (the instance's engine failed)
    loses the instance for this request, which then migrates; any other status goes to the client."""
    message = error_message(body, status)
    if status == 500:
        return InstanceLost(rec.instance_id, f"{rec.instance_id}: {message}")
    return ClusterError(message, status)
