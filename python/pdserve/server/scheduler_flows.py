"""The scheduler's per-request paths on instances (SPEC §4): one colocated instance's stream, or P and D
driven together (D reserves while P prefills and pushes the KV D lacks, P's first token, D decodes and
streams); every failure path releases both sides; after a request, D's new blocks go back to P (dcache)
and the instances' mirrors are refreshed. A mixin of `GlobalScheduler`, which routes and migrates.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import aiohttp

from pdserve.server.choices import TokenDelta
from pdserve.server.protocol import error_message
from pdserve.server.scheduler_cluster import ClusterError, InstanceLost, InstanceRecord

log = logging.getLogger("pdserve.scheduler")
PREFILL_TIMEOUT_S = 600.0  # a prefill may wait behind a long queue on a loaded P


def _sub(rec, counter: str, n: int) -> None:
    """Lowers one of an instance record's in-flight counters (a task's done callback)."""
    setattr(rec, counter, getattr(rec, counter) - n)


class RequestFlowsMixin:
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
                prompt_logprobs: list | None = None
                async for line in self._ndjson_lines(resp):
                    if "token_ids" not in line:  # a part of the next delta's prompt logprobs
                        prompt_logprobs = prompt_logprobs if prompt_logprobs is not None else []
                        prompt_logprobs.extend(line["prompt_logprobs"])
                        continue
                    if counted:
                        rec.inflight_prefill_tokens -= len(token_ids)
                        counted = False
                    finished = bool(line.get("finish_reason"))
                    yield TokenDelta(
                        line["token_ids"],
                        line.get("finish_reason"),
                        line.get("num_cached_tokens"),
                        line.get("logprobs"),
                        prompt_logprobs,
                    )
                    prompt_logprobs = None
                    if finished:
                        return
            raise InstanceLost(
                rec.instance_id, f"{rec.instance_id} closed the stream of {request_id} early"
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise InstanceLost(rec.instance_id, f"stream of {request_id}: {exc!r}") from exc
        except (GeneratorExit, asyncio.CancelledError):
            # by the consumer (a stop string, the client left): closed at a yield, or cancelled
            # while waiting for the next line (a choice of several, read by its own task)
            closed_early = not finished
            raise
        finally:
            if counted:
                rec.inflight_prefill_tokens -= len(token_ids)
            if closed_early:
                # the instance would abort only at its next write into the closed stream: end it now
                await self._release(rec, request_id, abort=True)
            elif not finished:
                # refused, or lost (a cut stream, a read timeout): should the instance still run
                # it, it ends there too; off the way out, so a migration does not wait on it
                self._release_later(rec, request_id)
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
            prompt_logprobs = pre.get("prompt_logprobs")
            if pre.get("finish_reason"):
                finished = True
                yield TokenDelta(
                    [first], pre["finish_reason"], num_cached, first_logprobs, prompt_logprobs
                )
                return
            yield TokenDelta([first], None, num_cached, first_logprobs, prompt_logprobs)
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
            tasks = [t for t in (reserve, prefill) if t is not None]
            if tasks:
                # D answers before its release goes out (a release that overtook the reservation
                # would leave it held until it expires); a cancelled prefill's task ends too, so
                # its outcome can be read below
                await asyncio.wait(tasks)
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
            # its tree, so they can go back to P (`stopped` is set by the consumer, at a yield or,
            # for a choice of several, while this waits for D's next line: all_tokens may then hold
            # a few tokens past the stop, whose KV D computed as well)
            at_stop = not finished and d_owns and stopped is not None and stopped.is_set()
            self._after_request(p, d, request_id, all_tokens if finished or at_stop else None)

    def _release_later(self, rec, request_id: str) -> None:
        """`_release(rec, request_id, abort=True)` in the background."""
        self._in_background(self._release(rec, request_id, abort=True))

    def _in_background(self, work) -> asyncio.Task:
        """Runs `work` (a coroutine) off the response path; kept until done, cancelled at stop."""
        task = asyncio.create_task(work)
        self._after_tasks.add(task)
        task.add_done_callback(self._after_tasks.discard)
        return task

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
        task = self._in_background(
            self._after_request_task(p, d, request_id, all_tokens if dcache else None)
        )
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
        try:
            res = await self._post(
                f"{p.url}/internal/v1/dcache/reserve",
                {"request_id": request_id, "token_ids": tokens, "peer_id": d.instance_id},
            )
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
