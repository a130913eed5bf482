"""Prefill/decode request path on an instance (SPEC §4), as a mixin of `InstanceServer`.

Decode side: `reserve` locks what D holds and expects the rest, `decode` waits for the KV and streams.
The prefill side (`prefill`, its layer hook) is in instance_prefill.py. Both: `link`, `release`, and
dcache: D's finished blocks go back into P's radix tree. Every path out of a request releases what it
holds (`release` is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.instance_prefill import (
    PrefillHandlersMixin,
    json_error,
    retry_later,
    start_error,
)
from pdserve.server.protocol import ProtocolError, SamplingSpec
from pdserve.server.transport import (
    TransferAborted,
    check_rank_layouts,
    check_same_model,
    endpoint_layouts,
)
from pdserve.transfer import KVLayout

log = logging.getLogger("pdserve.instance")

# P answers a prefill only once D acknowledged every byte, so a kept reservation's KV has landed;
# this only bounds a release that overtook the transfer's last acknowledgement on D's side
KEEP_WAIT_S = 2.0


@dataclass
class Peer:
    peer_id: str
    url: str
    layout: KVLayout
    incarnation: str | None = None


class PDHandlersMixin(PrefillHandlersMixin):
    """Handlers of the P/D path; the state lives on InstanceServer (prefills, reservations, peers)."""

    async def h_reserve(self, request):
        """D: lock the cached prefix, reserve blocks for the rest, expect their KV bytes."""
        try:
            self._check_role("decode")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
            peer_id = str(body["peer_id"])  # the prefill instance that will send the KV
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"reserve needs request_id, prompt_token_ids and peer_id: {exc}")
        if peer_id not in self.peers:
            # not linked (yet, or again after a restart): transient for the client
            return retry_later(f"no link to prefill instance {peer_id}; link first (pdserve link)")
        if request_id in self.reservations:
            return json_error(409, f"request {request_id} already holds a reservation here")
        try:
            res = await self.call(lambda e: ea.reserve(e, request_id, token_ids))
        except Exception as exc:  # noqa: BLE001
            if ea.is_no_capacity(exc):
                return retry_later(str(exc))
            # a bad prompt is the caller's (400); anything else means the engine failed (500)
            return json_error(400 if isinstance(exc, ValueError) else 500, f"reserve failed: {exc}")
        targets = res.new_block_ids
        try:
            if self.arena is not None:  # the KV lands in staging slots, then moves into the blocks
                targets = self.arena.alloc(len(res.new_block_ids))
                self.staged[request_id] = (res.new_block_ids, targets)
            nbytes = self.transport.expect(peer_id, request_id, len(targets))
        except Exception as exc:  # noqa: BLE001 - give everything back before answering
            self._free_staged(request_id)
            await self._abort_and_release(request_id)
            status = 503 if "staging" in str(exc) else 409
            return json_error(status, f"cannot expect the KV of {request_id}: {exc}")
        loop = asyncio.get_running_loop()

        # A reservation nobody uses (scheduler gone) expires instead of holding blocks forever.
        def expire() -> None:
            if self.reservations.get(request_id) is expiry:  # not a later one of that id
                asyncio.ensure_future(self._release_reservation(request_id))

        expiry = loop.call_later(self.config.transfer_timeout * 2, expire)
        self.reservations[request_id] = expiry
        return web.json_response(
            {
                "request_id": request_id,
                "num_cached_tokens": res.num_cached_tokens,
                "block_ids": targets,
                "num_expected_bytes": nbytes,
            }
        )

    async def _release_reservation(self, request_id: str) -> bool:
        handle = self.reservations.pop(request_id, None)
        if handle is None:
            return False
        handle.cancel()
        await self.transport.abort(request_id)  # no write lands after this: the slots may be reused
        self._free_staged(request_id)
        await self._abort_and_release(request_id)
        return True

    async def _keep_reservation(self, request_id: str) -> bool:
        """D, for a request that ended at its first token on P: P answered once D held every byte, so
        the prompt's KV is here; its whole blocks go into the radix tree (a later prompt sharing it
        hits), then the reservation is released as any other (the tree keeps its own references).
        A transfer that did not complete keeps nothing."""
        handle = self.reservations.get(request_id)
        if handle is None:
            return False
        handle.cancel()  # no expiry while the blocks are kept; the release below drops the entry
        staged = self.staged.get(request_id)
        try:
            await self.transport.wait(request_id, KEEP_WAIT_S)

            def keep(engine):
                if staged is not None:
                    self.arena.scatter(*staged)  # staging slots -> the reserved blocks
                return ea.cache_reservation(engine, request_id)

            await self.call(keep)
        except Exception as exc:  # noqa: BLE001 - best effort: a later prompt just hits less
            log.info("request %s: its KV stays uncached on this instance: %s", request_id, exc)
        finally:  # also when cancelled: aborts the receive, frees the slots and the reservation
            await self._release_reservation(request_id)
        return True

    def _free_staged(self, key: str) -> None:
        staged = self.staged.pop(key, None)
        if staged is not None:
            self.arena.free(staged[1])

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
        staged = self.staged.pop(request_id, None)
        slots_freed = []

        def start_decode(engine):
            if staged is not None:
                try:
                    self.arena.scatter(*staged)  # staging slots -> the reserved blocks
                finally:
                    self.arena.free(staged[1])
                    slots_freed.append(True)
            ea.add_decode_only(engine, request_id, token_ids, spec, first_token_id)

        try:
            deltas = await self._engine_stream(request_id, start_decode)
        except Exception as exc:  # noqa: BLE001 - refused (the prompt differs from the reserved one) or failed
            return start_error(request_id, exc)
        finally:
            if staged is not None and not slots_freed:  # the engine refused the call (it failed)
                self.arena.free(staged[1])
        try:
            return await self._ndjson(request, deltas, first={"kv_ready": True})
        finally:
            await deltas.aclose()

    async def h_release(self, request):
        """Either side: drop everything held for a request (pinned prefill, reservation). Idempotent.
        With `keep_kv`, a reservation's received prompt blocks go into D's radix tree first."""
        try:
            body = await self._body(request)
            request_id = str(body["request_id"])
        except (ProtocolError, KeyError, TypeError) as exc:
            return json_error(400, f"release needs request_id: {exc}")
        released = False
        prefilling = request_id in self.prefills
        if prefilling or request_id in self.early_targets:
            released = await self._release_prefill(request_id)
        if body.get("abort", False) and self.config.role == "prefill" and not prefilling:
            # an aborted prefill whose own request may still be on its way: refuse it when it comes
            self._keep_early_targets(request_id, "released before it arrived")
        if request_id in self.reservations:
            if body.get("keep_kv", False):
                released = await self._keep_reservation(request_id) or released
            else:
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
            if self.transport is None or not info.get("transfer"):
                return json_error(400, "colocated (--role both) instances do not link")
            # every rank pairs with the peer's same rank: same TP size, compatible shards
            layouts = endpoint_layouts(info["transfer"])
            check_rank_layouts(self.transport.layouts, layouts, info["instance_id"])
            check_same_model(self.info(), info)
            layout = layouts[0]
            await self.transport.link(info["instance_id"], info["transfer"])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return json_error(502, f"peer {peer_url} unreachable: {exc}")
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:  # incl. malformed peer info
            return json_error(400, f"cannot link to {peer_url}: {exc!s}")
        self.peers[info["instance_id"]] = Peer(
            info["instance_id"], peer_url, layout, info.get("incarnation")
        )
        return web.json_response(
            {"linked": True, "instance_id": self.instance_id, "peer_id": info["instance_id"]}
        )

    # ---- dcache: D's finished sequence's new blocks go back to P
    async def h_dcache_reserve(self, request):
        """P: reserve blocks for the whole blocks of `token_ids` P lacks; expect their bytes."""
        try:
            self._check_role("prefill")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["token_ids"]]
            peer_id = str(body["peer_id"])  # the decode instance that sends the blocks back
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(400, f"dcache/reserve needs request_id, token_ids and peer_id: {exc}")
        if peer_id not in self.peers:
            return json_error(409, f"no link to decode instance {peer_id}")
        bs = self.config.block_size
        token_ids = token_ids[: len(token_ids) // bs * bs]
        key = f"{request_id}.dcache"
        try:
            res = await self.call(lambda e: ea.reserve(e, key, token_ids, count_hits=False))
        except Exception as exc:  # noqa: BLE001 - dcache is best effort
            return json_error(503, f"no room for the back-transfer: {exc}")

        # a back-transfer whose commit never comes (the scheduler gone) expires
        def expire() -> None:
            held = self.dcache_reservations.get(request_id)
            if held is not None and held[2] is expiry:  # not a later one of that id
                asyncio.ensure_future(self._release_dcache(request_id))

        expiry = asyncio.get_running_loop().call_later(self.config.transfer_timeout * 2, expire)
        self.dcache_reservations[request_id] = (res.cached_block_ids, res.new_block_ids, expiry)
        targets = res.new_block_ids
        try:
            if self.arena is not None:
                targets = self.arena.alloc(len(res.new_block_ids))
                self.staged[key] = (res.new_block_ids, targets)
            self.transport.expect(peer_id, key, len(targets))
        except Exception as exc:  # noqa: BLE001
            await self._release_dcache(request_id)
            return json_error(409, f"cannot expect the back-transfer of {request_id}: {exc}")
        return web.json_response(
            {
                "num_cached_tokens": res.num_cached_tokens,
                "block_ids": targets,
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
        if peer_id not in self.peers:
            return json_error(409, f"no link to prefill instance {peer_id}")
        key = f"{request_id}.dcache"

        sent_slots: list[int] = []

        def lock_and_send(engine):
            # Lock what this instance holds of the sequence (its radix tree kept it at finish) and send it;
            # the blocks stay locked (reserved under `key`) until the send is flushed.
            res = ea.reserve(engine, key, token_ids, count_hits=False)
            try:
                held = res.cached_block_ids[from_block : from_block + len(peer_block_ids)]
                if len(held) < len(peer_block_ids):
                    return 0, 0  # evicted meanwhile: send nothing, P drops its reservation
                local = held
                if self.arena is not None:
                    local = self.arena.alloc(len(held))
                    sent_slots.extend(local)
                    self.arena.gather(held, local)
                event = ea.record_kv_ready(engine) if self.config.enable_direct else None
                nbytes = self.transport.push_request(
                    peer_id,
                    key,
                    local,
                    peer_block_ids[: len(held)],
                    event.cuda_event if event else 0,
                )
                return len(held), nbytes
            except BaseException:
                ea.release(engine, key)
                raise

        try:
            num_blocks, nbytes = await self.call(lock_and_send)
            await self.transport.flush(peer_id, key)
        except Exception as exc:  # noqa: BLE001
            await self.transport.abort(key)
            return json_error(500, f"dcache send failed: {exc}")
        finally:
            await self.call(lambda e: ea.release(e, key), after_failure=True)
            if sent_slots:
                self.arena.free(sent_slots)
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
        # taken out for the commit: a release meanwhile (or the expiry) finds nothing to free
        # under the scatter below, which still reads the staging slots; the commit frees them
        held = self.dcache_reservations.pop(request_id, None)
        if held is None:
            return json_error(409, f"no back-transfer reserved for {request_id}")
        cached_ids, new_ids, _ = held
        key = f"{request_id}.dcache"
        num_inserted = 0
        try:
            if num_blocks == len(new_ids):  # else D no longer held them all: the bytes never come
                await self.transport.wait(key, self.config.transfer_timeout)
                block_ids = cached_ids + new_ids
                bs = self.config.block_size
                staged = self.staged.get(key)

                def insert(engine):
                    if staged is not None:
                        self.arena.scatter(*staged)
                    return ea.insert_cached(engine, token_ids[: len(block_ids) * bs], block_ids)

                num_inserted = await self.call(insert)
        except Exception as exc:  # noqa: BLE001 - best effort: the next turn just hits less
            log.warning("dcache commit of %s failed: %s", request_id, exc)
        finally:
            await self._drop_dcache(request_id, held)
        return web.json_response({"num_inserted_blocks": num_inserted})

    async def _release_dcache(self, request_id: str) -> bool:
        held = self.dcache_reservations.pop(request_id, None)
        if held is None:
            return False
        await self._drop_dcache(request_id, held)
        return True

    async def _drop_dcache(self, request_id: str, held: tuple) -> None:
        """Frees a back-transfer reservation taken out of `dcache_reservations`."""
        held[2].cancel()  # its expiry
        key = f"{request_id}.dcache"
        await self.transport.abort(key)
        self._free_staged(key)
        await self._abort_and_release(key)

    # ----------------------------------------------------------------- registration
