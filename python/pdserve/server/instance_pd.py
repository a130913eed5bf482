"""Prefill/decode request path on an instance (SPEC §4), as a mixin of `InstanceServer`.

Decode side: `reserve` locks what D holds and expects the rest, `decode` waits for the KV and streams.
Prefill side: `prefill` runs a PREFILL_ONLY request whose layer hook hands each layer's new blocks to
the transport (or all layers at the end), answers the first token once the peer has every byte, and
keeps the blocks pinned until `release`. dcache: D's finished blocks go back into P's radix tree.
Every path out of a request releases what it holds (`release` is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.protocol import ProtocolError, SamplingSpec
from pdserve.server.transport import (
    TransferAborted,
    check_rank_layouts,
    check_same_model,
    endpoint_layouts,
)
from pdserve.transfer import KVLayout

log = logging.getLogger("pdserve.instance")


def json_error(status: int, message: str) -> web.Response:
    return web.json_response(ProtocolError(message, status).to_json(), status=status)


@dataclass
class PrefillState:
    """A PREFILL_ONLY request on P: where its KV goes. `sent_per_layer[l]` counts blocks handed over."""

    request_id: str
    peer_id: str
    peer_block_ids: list[int]
    layerwise: bool
    sent_per_layer: list[int]
    # whole-request mode: (local, remote) block ids gathered as the last layer completes them
    whole_local: list[int] = field(default_factory=list)
    whole_remote: list[int] = field(default_factory=list)
    error: str | None = None
    nbytes_sent: int = 0
    # with host staging: slot i stages the i-th block sent (P's side of the arena)
    slots: list[int] = field(default_factory=list)
    # direct (GPU) sends, whole-request mode: a torch.cuda.Event recorded after the last layer of every
    # block (alive until push_request, which makes the transfer engine's own copy of it)
    whole_event: Any = None


@dataclass
class Peer:
    peer_id: str
    url: str
    layout: KVLayout
    incarnation: str | None = None


class PDHandlersMixin:
    """Handlers and hook of the P/D path; the state lives on InstanceServer (prefills, reservations, peers)."""

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
            return json_error(
                409, f"no link to prefill instance {peer_id}; link first (pdserve link)"
            )
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
        self.reservations[request_id] = loop.call_later(
            self.config.transfer_timeout * 2,
            lambda: asyncio.ensure_future(self._release_reservation(request_id)),
        )
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

    def _free_staged(self, key: str) -> None:
        staged = self.staged.pop(key, None)
        if staged is not None:
            self.arena.free(staged[1])

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
        if self.arena is not None:
            try:
                state.slots = self.arena.alloc(len(peer_block_ids))
            except Exception as exc:  # noqa: BLE001
                return json_error(503, f"prefill of {request_id}: {exc}")
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
            if not layerwise and state.whole_local:
                local = state.whole_local
                if self.arena is not None:
                    slots = state.slots[: len(local)]
                    await self.call(lambda e: self.arena.gather(state.whole_local, slots))
                    local = slots
                event = state.whole_event
                state.nbytes_sent += self.transport.push_request(
                    peer_id, request_id, local, state.whole_remote, event.cuda_event if event else 0
                )
            if state.sent_per_layer and min(state.sent_per_layer) != len(peer_block_ids):
                raise RuntimeError(
                    f"prefill of {request_id} handed {state.sent_per_layer} blocks per layer to the transfer, "
                    f"the decode peer reserved {len(peer_block_ids)}"
                )
            await self.transport.flush(peer_id, request_id)
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
            if self.arena is not None:  # flushed or aborted: no send reads the slots any more
                self.arena.free(state.slots)
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

    def _layer_hook(self, layer_idx: int | None, items) -> None:
        """Engine thread, after layer `layer_idx`'s KV is written (None: every layer's, a step replayed
        from a CUDA graph, whose blocks then go out in one message): hand those blocks to the transfer."""
        all_layers = layer_idx is None
        for request_id, block_ids in items:
            state = self.prefills.get(str(request_id))
            if state is None or state.error:
                continue
            try:
                # every layer has sent as many blocks at a step's start (a step calls this for each
                # layer or once for all)
                start = state.sent_per_layer[0 if all_layers else layer_idx]
                block_ids = [int(b) for b in block_ids]
                remote = state.peer_block_ids[start : start + len(block_ids)]
                if len(remote) != len(block_ids):
                    raise RuntimeError(
                        f"layer {layer_idx}: {start + len(block_ids)} blocks to send, peer reserved "
                        f"{len(state.peer_block_ids)}"
                    )
                layers = range(len(state.sent_per_layer)) if all_layers else (layer_idx,)
                for layer in layers:
                    state.sent_per_layer[layer] += len(block_ids)
                if state.layerwise:
                    local = block_ids
                    if self.arena is not None:
                        local = state.slots[start : start + len(block_ids)]
                        self.arena.gather(block_ids, local, layer_idx)
                    event = self._kv_ready_event()  # alive until the push returned
                    ready = event.cuda_event if event else 0
                    if all_layers:
                        state.nbytes_sent += self.transport.push_request(
                            state.peer_id, state.request_id, local, remote, ready
                        )
                    else:
                        state.nbytes_sent += self.transport.push_layer(
                            state.peer_id, state.request_id, layer_idx, local, remote, ready
                        )
                elif all_layers or layer_idx == len(state.sent_per_layer) - 1:
                    # all layers of these blocks are done
                    state.whole_local.extend(block_ids)
                    state.whole_remote.extend(remote)
                    state.whole_event = self._kv_ready_event()
            except Exception as exc:  # noqa: BLE001 - never kill the engine thread; the handler reports it
                state.error = f"KV send failed: {exc}"

    def _kv_ready_event(self) -> Any:
        """Engine thread: with --enable-direct, a CUDA event after the KV written so far, which a send
        waits for (the transfer engine chains its own event to it, so it may die once the send was
        queued); else None (host staging copies synchronously, a CPU instance needs no event)."""
        return ea.record_kv_ready(self.engine) if self.config.enable_direct else None

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

        deltas = self._engine_stream(request_id, start_decode)
        try:
            return await self._ndjson(request, deltas, first={"kv_ready": True})
        finally:
            await deltas.aclose()
            if staged is not None and not slots_freed:  # the engine refused the call (it failed)
                self.arena.free(staged[1])

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
            res = await self.call(lambda e: ea.reserve(e, key, token_ids))
        except Exception as exc:  # noqa: BLE001 - dcache is best effort
            return json_error(503, f"no room for the back-transfer: {exc}")
        self.dcache_reservations[request_id] = (res.cached_block_ids, res.new_block_ids)
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
            res = ea.reserve(engine, key, token_ids)
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
                staged = self.staged.get(key)

                def insert(engine):
                    if staged is not None:
                        self.arena.scatter(*staged)
                    return ea.insert_cached(engine, token_ids[: len(block_ids) * bs], block_ids)

                num_inserted = await self.call(insert)
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
        self._free_staged(key)
        await self._abort_and_release(key)
        return True

    # ----------------------------------------------------------------- registration
