"""The scheduler's view of the cluster: which instances exist, their load and cache mirrors, their links.

Instances join by registering (or are fixed by --prefill/--decode URLs); the scheduler pulls their
stats and cache events (`/internal/v1/stats?events_since=N`), links every new (P, D) pair both ways,
forgets instances that stop answering and takes a restarted one (new incarnation) anew. A mixin of
`GlobalScheduler`, which holds the state (`instances`, `index`, `linked`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from pdserve.server.policies import InstanceSnapshot
from pdserve.server.protocol import error_message

log = logging.getLogger("pdserve.scheduler")
STATS_TIMEOUT_S = 5.0  # a stats pull slower than this marks the instance unhealthy


class ClusterError(RuntimeError):
    """A request the cluster cannot serve now; `status` goes back to the client."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class InstanceLost(ClusterError):
    """A call to one instance failed at the transport level (process gone, connection cut), or a
    stream there could not start because its engine failed (HTTP 500)."""

    def __init__(self, instance_id: str, message: str):
        super().__init__(message, 502)
        self.instance_id = instance_id


class InstanceRestarted(ClusterError):
    """The instance at a known address is a new process (another incarnation)."""

    def __init__(self, message: str):
        super().__init__(message, 502)


@dataclass
class InstanceRecord:
    url: str
    instance_id: str
    role: str
    info: dict
    stats: dict = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    event_seq: int = 0
    registered: bool = True  # False: fixed by --prefill/--decode (polled, never forgotten)
    inflight_prefill_tokens: int = 0  # dispatched by us, not yet prefilled
    inflight_reserved_blocks: int = 0
    # back-transfers into this (prefill) instance still running: task -> the sequence's token ids
    pending_dcache: dict = field(default_factory=dict)
    # one pull of events at a time: two overlapping pulls could apply an insert after its evict
    refresh_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    healthy: bool = True  # False after a failed call: not routed to until a stats pull succeeds

    def snapshot(self) -> InstanceSnapshot:
        s = self.stats
        return InstanceSnapshot(
            instance_id=self.instance_id,
            role=self.role,
            num_queued_prefill_tokens=_stat(s, "num_queued_prefill_tokens", "num_waiting_tokens")
            + self.inflight_prefill_tokens,
            num_running=_stat(s, "num_running"),
            num_used_blocks=_stat(s, "num_used_blocks", "num_in_use_blocks", "num_in_use"),
            num_reserved_blocks=_stat(s, "num_reserved_blocks", "num_reserved")
            + self.inflight_reserved_blocks,
            num_total_blocks=_stat(s, "num_total_blocks", "num_total")
            or int(self.info.get("num_total_blocks", 0)),
            block_size=int(self.info.get("block_size", 16)),
        )


def _stat(stats: dict, *names: str) -> int:
    for n in names:
        v = stats.get(n)
        if isinstance(v, (int, float)):
            return int(v)
    tiers = stats.get("tiers")
    if isinstance(tiers, list) and tiers:
        for n in names:
            v = tiers[0].get(n) if isinstance(tiers[0], dict) else None
            if isinstance(v, (int, float)):
                return int(v)
    return 0


class ClusterMembershipMixin:
    """Membership, polling, linking and the HTTP helpers of GlobalScheduler."""

    # ----------------------------------------------------------------- cluster membership
    async def _adopt_fixed(self, url: str, role: str) -> None:
        """A --prefill/--decode URL: wait until it answers, then treat it like a registration."""
        warned = False
        while True:
            try:
                info = await self._get(f"{url}/internal/v1/info")
                if info["role"] != role:
                    log.error("%s is a %s instance, given as --%s", url, info["role"], role)
                    return
                await self._add_instance(url, info, registered=False)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                if not warned:
                    log.warning("instance %s not reachable yet (%s); retrying", url, exc)
                    warned = True
                await asyncio.sleep(0.5)

    async def _add_instance(self, url: str, info: dict, registered: bool) -> InstanceRecord:
        iid = info["instance_id"]
        old = self.instances.get(iid)
        if old is not None and old.info.get("incarnation") == info.get("incarnation"):
            old.last_seen = time.monotonic()
            return old
        if info.get("model") != self.config.model and info.get("model") is not None:
            log.warning(
                "instance %s serves %s, the scheduler %s", iid, info.get("model"), self.config.model
            )
        rec = InstanceRecord(
            url=url, instance_id=iid, role=info["role"], info=info, registered=registered
        )
        self.instances[iid] = rec
        self.index.add_instance(iid, int(info.get("block_size", 16)))
        self.linked = {pair for pair in self.linked if iid not in pair}
        await self._refresh(rec)
        await self._link_all()
        log.info("instance %s (%s) joined", iid, rec.role)
        return rec

    async def _link_all(self) -> None:
        """Create the communication domain of every (P, D) pair not linked yet (both directions)."""
        async with self._link_lock:
            ps = [r for r in self.instances.values() if r.role == "prefill"]
            ds = [r for r in self.instances.values() if r.role == "decode"]
            for p in ps:
                for d in ds:
                    if (p.instance_id, d.instance_id) in self.linked:
                        continue
                    try:
                        await link_pair(self._session, p.url, d.url)
                        self.linked.add((p.instance_id, d.instance_id))
                    except Exception as exc:  # noqa: BLE001 - retried on the next poll
                        log.warning(
                            "linking %s and %s failed: %s", p.instance_id, d.instance_id, exc
                        )

    async def _refresh(self, rec: InstanceRecord) -> None:
        """Pull stats and new cache events from one instance (in order: one pull at a time)."""
        async with rec.refresh_lock:
            s = await self._get(
                f"{rec.url}/internal/v1/stats?events_since={rec.event_seq}", timeout=STATS_TIMEOUT_S
            )
            if s.get("incarnation") != rec.info.get("incarnation"):
                raise InstanceRestarted(f"instance {rec.instance_id} restarted")
            if s.get("lost"):  # its engine failed (a TP worker died): route nothing there
                raise RuntimeError(f"instance {rec.instance_id} lost: {s.get('engine_error')}")
            events = s.pop("events", [])
            first = s.pop("events_first_seq", rec.event_seq)
            if first > rec.event_seq:
                log.warning(
                    "missed %d cache events of %s; its mirror is inexact until refilled",
                    first - rec.event_seq,
                    rec.instance_id,
                )
            self.index.apply_events(rec.instance_id, events)
            rec.event_seq = first + len(events)
            rec.stats = s
            rec.last_seen = time.monotonic()
            rec.healthy = True

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            recs = list(self.instances.values())
            results = await asyncio.gather(
                *(self._refresh(r) for r in recs), return_exceptions=True
            )
            for rec, result in zip(recs, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, InstanceRestarted):
                    # same address, new process: its tree is empty and its links are gone; take it anew
                    try:
                        info = await self._get(f"{rec.url}/internal/v1/info")
                        await self._add_instance(rec.url, info, registered=rec.registered)
                    except Exception:  # noqa: BLE001 - retried on the next poll
                        rec.healthy = False
                elif isinstance(result, Exception):
                    rec.healthy = False
                    if time.monotonic() - rec.last_seen > self.config.instance_timeout:
                        log.warning("instance %s gone (%s)", rec.instance_id, result)
                        self.instances.pop(rec.instance_id, None)
                        self.index.remove_instance(rec.instance_id)
                        self.linked = {pr for pr in self.linked if rec.instance_id not in pr}
                        if not rec.registered:
                            self._tasks.append(
                                asyncio.create_task(self._adopt_fixed(rec.url, rec.role))
                            )
            if any(
                (p, d) not in self.linked for p in self._ids("prefill") for d in self._ids("decode")
            ):
                await self._link_all()

    def _ids(self, role: str) -> list[str]:
        return [i for i, r in self.instances.items() if r.role == role]

    async def h_register(self, request):
        body = await request.json()
        url = str(body["url"]).rstrip("/")
        try:
            info = await self._get(f"{url}/internal/v1/info")
        except Exception as exc:  # noqa: BLE001
            return web.json_response(
                {"error": {"message": f"cannot reach {url}: {exc}"}}, status=502
            )
        rec = await self._add_instance(url, info, registered=True)
        return web.json_response({"instance_id": rec.instance_id, "known": True})

    async def h_heartbeat(self, request):
        body = await request.json()
        rec = self.instances.get(str(body.get("instance_id")))
        if rec is None or rec.info.get("incarnation") != body.get("incarnation"):
            return web.json_response({"known": False})
        rec.last_seen = time.monotonic()
        stats = body.get("stats") or {}
        stats.pop("events", None)
        rec.stats = stats
        if stats.get("event_seq", 0) > rec.event_seq:
            try:
                await self._refresh(rec)
            except Exception:  # noqa: BLE001 - the poller retries
                pass
        return web.json_response({"known": True})

    async def h_refresh(self, request):
        """Pull every instance's events now (tests and tools; routing is exact after this returns)."""
        await asyncio.gather(
            *(self._refresh(r) for r in list(self.instances.values())), return_exceptions=True
        )
        return web.json_response({"ok": True})

    async def h_cluster(self, request):
        return web.json_response(
            {
                "instances": [
                    {
                        "instance_id": r.instance_id,
                        "url": r.url,
                        "role": r.role,
                        "registered": r.registered,
                        "snapshot": r.snapshot().__dict__,
                        "num_mirrored_blocks": self.index.num_cached_blocks(r.instance_id),
                    }
                    for r in self.instances.values()
                ],
                "linked": sorted([list(p) for p in self.linked]),
                "routes": self.route_log[-100:],
                "ep_policy": self.config.ep_policy,
                "ed_policy": self.config.ed_policy,
            }
        )

    # ----------------------------------------------------------------- HTTP helpers
    async def _get(self, url: str, timeout: float | None = None) -> dict:
        kw = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
        try:
            async with self._session.get(url, **kw) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise ClusterError(f"{url}: {exc!r}", 502) from exc
        if resp.status != 200:
            raise ClusterError(error_message(data, resp.status), resp.status)
        return data

    async def _post(self, url: str, payload: dict, timeout: float | None = None) -> dict:
        """POST JSON; `timeout` overrides the session's 60 s (a prefill may queue behind others)."""
        kw = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
        try:
            async with self._session.post(url, json=payload, **kw) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise ClusterError(f"{url}: {exc!r}", 502) from exc
        if resp.status != 200:
            raise ClusterError(error_message(data, resp.status), resp.status)
        return data

    async def _release(
        self,
        rec: InstanceRecord | None,
        request_id: str,
        abort: bool = False,
        keep_kv: bool = False,
    ) -> None:
        """Drops what `rec` holds for the request; `keep_kv`: D caches the prompt KV it received."""
        if rec is None:
            return
        body = {"request_id": request_id, "abort": abort}
        if keep_kv:
            body["keep_kv"] = True
        try:
            await self._post(f"{rec.url}/internal/v1/release", body)
        except Exception as exc:  # noqa: BLE001 - the instance's own expiry is the backstop
            log.warning("release of %s on %s failed: %s", request_id, rec.instance_id, exc)


async def link_pair(session: aiohttp.ClientSession, prefill_url: str, decode_url: str) -> None:
    """Link P and D both ways (KV goes P -> D, and D -> P for dcache). Raises on failure."""
    for a, b in ((prefill_url, decode_url), (decode_url, prefill_url)):
        async with session.post(f"{a}/internal/v1/link", json={"peer_url": b}) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise ClusterError(
                    f"link {a} -> {b}: {error_message(data, resp.status)}", resp.status
                )
