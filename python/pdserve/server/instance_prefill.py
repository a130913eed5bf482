"""Prefill side of the P/D request path (SPEC §4), as a mixin of `InstanceServer`.

`prefill` runs a PREFILL_ONLY request whose layer hook hands each layer's new blocks to the transport
(or all layers at the end), answers the first token once the decode peer has every byte, and keeps the
blocks pinned until `release`. Where the KV goes on D (its cached prefix, its reserved blocks) either
comes with the prefill or, with `await_peer`, later through `prefill/peer`: the scheduler then asks D
to reserve and P to prefill at once, so D's reservation (an HTTP round trip, plus waiting for D's
current decode step) no longer delays P's compute. Until the targets are known the hook queues its
sends (the blocks stay pinned, the ready events alive). Targets that arrive before their prefill wait
for it; a release (abort) that arrives before it makes P refuse it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pdserve.server import engine_adapter as ea
from pdserve.server.engine_loop import RequestCancelled
from pdserve.server.protocol import ProtocolError, SamplingSpec
from pdserve.server.transport import TransferAborted

log = logging.getLogger("pdserve.instance")


def json_error(status: int, message: str) -> web.Response:
    return web.json_response(ProtocolError(message, status).to_json(), status=status)


def retry_later(message: str) -> web.Response:
    """A 503 with Retry-After: the request was fine, this instance cannot take it now."""
    return web.json_response(
        ProtocolError(message, 503).to_json(), status=503, headers={"Retry-After": "1"}
    )


def start_error(request_id: str, exc: Exception) -> web.Response:
    """The answer to a request whose engine stream did not start: a 400 for a request the engine
    refused (ValueError: a prompt past the context, ...), else a 500 (the engine failed; a scheduler
    takes the instance as lost for the request and moves it elsewhere)."""
    if isinstance(exc, ValueError):
        return json_error(400, str(exc))
    log.warning("request %s could not start: %r", request_id, exc)
    return json_error(500, f"engine failed: {exc!r}")


@dataclass(frozen=True)
class PeerTargets:
    """Where a prefill's KV goes: D holds its first `num_cached_tokens` (a multiple of the block size),
    and `block_ids[i]` receives the prompt's block num_cached_tokens // block_size + i."""

    num_cached_tokens: int
    block_ids: list[int]


@dataclass
class _Send:
    """Blocks the layer hook handed over (one layer, or every layer: `layer_idx` None), from the hook's
    `start`-th block on; `local_ids` are KV blocks, or staging slots with host staging."""

    layer_idx: int | None
    start: int
    local_ids: list[int]
    event: Any  # a torch.cuda.Event after their KV (direct sends), alive until pushed; else None


@dataclass
class PrefillState:
    """A PREFILL_ONLY request on P: where its KV goes and what was handed over.

    The hook numbers blocks from the prompt's block `first_hook_block` on (D's cached prefix when the
    targets came with the prefill: the engine skips it; else 0). `targets`, `queued` and `sent_per_layer`
    are guarded by `lock` (the hook runs on the engine thread, the targets arrive on the event loop).
    """

    request_id: str
    peer_id: str
    layerwise: bool
    block_size: int
    first_hook_block: int
    num_hook_blocks: int  # blocks the hook hands over in all: the prompt's from first_hook_block on
    hooked_per_layer: list[int]  # blocks the hook handed over, per layer (engine thread only)
    sent_per_layer: list[int]  # blocks pushed to D's targets, per layer
    targets: PeerTargets | None = None
    targets_known: asyncio.Event = field(default_factory=asyncio.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    queued: list[_Send] = field(default_factory=list)  # layer-wise sends waiting for the targets
    # whole-request mode: blocks (or their staging slots) whose every layer is written, in hook order,
    # and an event after them; all of them go in one push once the last is written and the targets known
    whole_local: list[int] = field(default_factory=list)
    whole_event: Any = None
    whole_pushed: bool = False
    error: str | None = None
    nbytes_sent: int = 0
    # with host staging: slot i stages the hook's i-th block
    slots: list[int] = field(default_factory=list)
    # answered and pinned: a release that never comes (the scheduler gone) ends it when this fires
    expiry: asyncio.TimerHandle | None = None

    def remote_pairs(self, start: int, local_ids: list[int]) -> tuple[list[int], list[int]]:
        """(local ids, D's block ids) of the hook's blocks [start, start + len(local_ids)) that D lacks.
        Call with the targets known; raises RuntimeError past D's reservation."""
        targets = self.targets
        skip = targets.num_cached_tokens // self.block_size - self.first_hook_block
        local, remote = [], []
        for i, block in enumerate(local_ids):
            r = start + i - skip
            if r < 0:
                continue  # D holds this block already
            if r >= len(targets.block_ids):
                raise RuntimeError(
                    f"block {self.first_hook_block + start + i} of the prompt has no place on the peer: "
                    f"it reserved {len(targets.block_ids)} blocks after its "
                    f"{targets.num_cached_tokens} cached tokens"
                )
            local.append(block)
            remote.append(targets.block_ids[r])
        return local, remote


class PrefillHandlersMixin:
    """The prefill endpoints and the layer hook; the state lives on InstanceServer (`prefills`,
    `early_targets`)."""

    async def h_prefill(self, request):
        """P: compute the uncached part, push the KV the peer lacks, answer with the first token."""
        try:
            self._check_role("prefill")
            body = await self._body(request)
            request_id = str(body["request_id"])
            token_ids = [int(t) for t in body["prompt_token_ids"]]
            spec = SamplingSpec.from_dict(body.get("sampling", {}))
            peer_id = str(body["peer_id"])
            layerwise = bool(body.get("layerwise", self.config.enable_layer))
            targets = None
            if not body.get("await_peer", False):
                targets = PeerTargets(
                    int(body.get("num_peer_cached_tokens", 0)),
                    [int(b) for b in body["peer_block_ids"]],
                )
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(
                400,
                "prefill needs request_id, prompt_token_ids, peer_id and peer_block_ids "
                f"(or await_peer): {exc}",
            )
        if self.peers.get(peer_id) is None:
            # not linked (yet, or again after a restart): transient for the client
            return retry_later(f"no link to decode instance {peer_id}; link first (pdserve link)")
        if request_id in self.prefills:
            return json_error(409, f"request {request_id} is already prefilling here")
        bs = self.config.block_size
        first_hook_block = targets.num_cached_tokens // bs if targets is not None else 0
        num_hook_blocks = max(0, -(-len(token_ids) // bs) - first_hook_block)
        num_layers = self.layout.num_layers
        state = PrefillState(
            request_id,
            peer_id,
            layerwise,
            bs,
            first_hook_block,
            num_hook_blocks,
            [0] * num_layers,
            [0] * num_layers,
        )
        released = self._released_early(request_id)
        if released is not None:  # kept until it expires: a retry of this id is refused too
            return json_error(409, f"prefill of {request_id} cancelled: {released}")
        early = self._take_early_targets(request_id)
        if targets is None:
            targets = early
        if targets is not None:
            self._set_targets(state, targets)
        if self.arena is not None:
            try:
                state.slots = self.arena.alloc(num_hook_blocks)
            except Exception as exc:  # noqa: BLE001
                return json_error(503, f"prefill of {request_id}: {exc}")
        self.prefills[request_id] = state
        ok = False
        first_token_id = None
        first_logprobs = None  # the first token's, when asked: they travel with it to D's stream
        prompt_logprobs = None  # echo with logprobs: the prompt's, for the scheduler's reply
        finish_reason = None
        num_cached = 0
        deltas = None
        try:
            deltas = await self._engine_stream(
                request_id,
                lambda e: ea.add_prefill_only(
                    e, request_id, token_ids, spec, first_hook_block * bs
                ),
            )
            async for d in deltas:
                if d.new_token_ids and first_token_id is None:
                    first_token_id = d.new_token_ids[0]
                    first_logprobs = d.logprobs[0] if d.logprobs else None
                    prompt_logprobs = d.prompt_logprobs
                if d.num_cached_tokens is not None:
                    num_cached = d.num_cached_tokens
                finish_reason = d.finish_reason
            computed = time.perf_counter()
            await self._wait_targets(state)
            if state.error:
                raise RuntimeError(state.error)
            if not layerwise:
                with state.lock:  # normally pushed already, by the hook or with the targets
                    self._push_whole(state, force=True)
            num_expected = len(state.targets.block_ids)
            if min(state.sent_per_layer, default=num_expected) != num_expected:
                raise RuntimeError(
                    f"prefill of {request_id} sent {state.sent_per_layer} blocks per layer, "
                    f"the decode peer reserved {num_expected}"
                )
            await self.transport.flush(peer_id, request_id)
            self.metrics.kv_send_wait.observe(time.perf_counter() - computed)
            ok = True
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which releases D
            log.warning("prefill %s failed: %s", request_id, exc)
            await self._release_prefill(request_id)
            if isinstance(exc, ValueError):
                status = 400
            elif isinstance(exc, RequestCancelled):
                status = 409
            elif isinstance(exc, TransferAborted):
                # the decode peer gave up on the KV (its --transfer-timeout passed while this
                # prefill queued) or the link is gone: overloaded or transient, try again
                status = 503
            elif isinstance(exc, TimeoutError):
                status = 504
            else:
                status = 500
            return json_error(status, f"prefill of {request_id} failed: {exc}")
        finally:
            if deltas is not None:
                await deltas.aclose()
            if not ok:
                self.prefills.pop(request_id, None)
            if self.arena is not None:  # flushed or aborted: no send reads the slots any more
                self.arena.free(state.slots)
        self.num_prefill_computed_tokens += len(token_ids) - num_cached
        if self.prefills.get(request_id) is state:
            # pinned until the scheduler's release (D has every byte by now, so it comes in moments)
            def expire() -> None:
                if self.prefills.get(request_id) is state:  # not a later request of that id
                    asyncio.ensure_future(self._release_prefill(request_id))

            state.expiry = asyncio.get_running_loop().call_later(
                self.config.transfer_timeout * 2, expire
            )
        if finish_reason == "prefill_done":
            finish_reason = None
        return web.json_response(
            {
                "request_id": request_id,
                "first_token_id": first_token_id,
                "first_token_logprobs": first_logprobs,
                "prompt_logprobs": prompt_logprobs,
                "finish_reason": finish_reason,
                "num_cached_tokens": num_cached,
                "num_computed_tokens": len(token_ids) - num_cached,
                "nbytes_sent": state.nbytes_sent,
            }
        )

    async def h_prefill_peer(self, request):
        """P: where the KV of an `await_peer` prefill goes: {request_id, num_peer_cached_tokens,
        peer_block_ids}. Accepted before the prefill itself arrives (kept for it until it expires).
        A prefill whose decode peer will not take the KV ends with `release` (abort)."""
        try:
            self._check_role("prefill")
            body = await self._body(request)
            request_id = str(body["request_id"])
            targets = PeerTargets(
                int(body["num_peer_cached_tokens"]), [int(b) for b in body["peer_block_ids"]]
            )
            bs = self.config.block_size
            if targets.num_cached_tokens < 0 or targets.num_cached_tokens % bs:
                raise ValueError(
                    f"num_peer_cached_tokens={targets.num_cached_tokens} must be a multiple of "
                    f"the block size {bs}, >= 0"
                )
        except ProtocolError as exc:
            return web.json_response(exc.to_json(), status=exc.status)
        except (KeyError, TypeError, ValueError) as exc:
            return json_error(
                400, f"prefill/peer needs request_id, num_peer_cached_tokens, peer_block_ids: {exc}"
            )
        state = self.prefills.get(request_id)
        if state is None:
            if self._released_early(request_id) is not None:
                return json_error(409, f"prefill of {request_id} was released")
            self._keep_early_targets(request_id, targets)
            return web.json_response({"request_id": request_id, "prefilling": False})
        if state.targets is not None:
            return json_error(409, f"prefill of {request_id} already knows where its KV goes")
        self._set_targets(state, targets)
        return web.json_response({"request_id": request_id, "prefilling": True})

    # ---- the targets (event loop)
    def _set_targets(self, state: PrefillState, targets: PeerTargets) -> None:
        """Records where the KV goes and pushes the sends queued until now."""
        with state.lock:
            state.targets = targets
            queued, state.queued = state.queued, []
            try:
                for send in queued:
                    self._push(state, send)
                if not state.layerwise:
                    self._push_whole(state)
            except Exception as exc:  # noqa: BLE001 - the handler reports it
                state.error = state.error or f"KV send failed: {exc}"
        state.targets_known.set()

    async def _wait_targets(self, state: PrefillState) -> None:
        """Returns once the targets are known; raises RequestCancelled (an error came instead) or
        TimeoutError (nothing came within --transfer-timeout)."""
        if state.targets is None and not state.error:
            try:
                await asyncio.wait_for(state.targets_known.wait(), self.config.transfer_timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"the decode peer's blocks for {state.request_id} did not come within "
                    f"{self.config.transfer_timeout}s (prefill/peer)"
                ) from None
        if state.targets is None:
            raise RequestCancelled(state.error or "no decode peer blocks")

    def _keep_early_targets(self, request_id: str, early: PeerTargets | str) -> None:
        old = self.early_targets.pop(request_id, None)
        if old is not None:
            old[0].cancel()
        expiry = asyncio.get_running_loop().call_later(
            self.config.transfer_timeout * 2, lambda: self.early_targets.pop(request_id, None)
        )
        self.early_targets[request_id] = (expiry, early)

    def _released_early(self, request_id: str) -> str | None:
        """Why a prefill released before it arrived is refused; None for any other request."""
        kept = self.early_targets.get(request_id)
        return kept[1] if kept is not None and isinstance(kept[1], str) else None

    def _take_early_targets(self, request_id: str) -> PeerTargets | str | None:
        kept = self.early_targets.pop(request_id, None)
        if kept is None:
            return None
        kept[0].cancel()
        return kept[1]

    # ---- the layer hook (engine thread)
    def _layer_hook(self, layer_idx: int | None, items) -> None:
        """Engine thread, after layer `layer_idx`'s KV is written (None: every layer's, a step replayed
        from a CUDA graph, whose blocks then go out in one message): hand those blocks to the transfer."""
        all_layers = layer_idx is None
        for request_id, block_ids in items:
            state = self.prefills.get(str(request_id))
            if state is None or state.error:
                continue
            try:
                # every layer has handed over as many blocks at a step's start (a step calls this for
                # each layer or once for all)
                start = state.hooked_per_layer[0 if all_layers else layer_idx]
                block_ids = [int(b) for b in block_ids]
                layers = range(len(state.hooked_per_layer)) if all_layers else (layer_idx,)
                for layer in layers:
                    state.hooked_per_layer[layer] += len(block_ids)
                if state.layerwise:
                    local = block_ids
                    if self.arena is not None:
                        local = state.slots[start : start + len(block_ids)]
                        self.arena.gather(block_ids, local, layer_idx)
                    send = _Send(layer_idx, start, local, self._kv_ready_event())
                    with state.lock:
                        if state.targets is None:
                            state.queued.append(send)
                        else:
                            self._push(state, send)
                elif all_layers or layer_idx == len(state.hooked_per_layer) - 1:
                    # every layer of these blocks is written
                    local = block_ids
                    if self.arena is not None:
                        local = state.slots[start : start + len(block_ids)]
                        self.arena.gather(block_ids, local)
                    event = self._kv_ready_event()
                    with state.lock:
                        state.whole_local.extend(local)
                        state.whole_event = event
                        self._push_whole(state)
            except Exception as exc:  # noqa: BLE001 - never kill the engine thread; the handler reports it
                state.error = f"KV send failed: {exc}"

    def _push(self, state: PrefillState, send: _Send) -> None:
        """Queues one send (a layer hook's, or the whole request's) to D's blocks (with `state.lock` held,
        the targets known)."""
        local, remote = state.remote_pairs(send.start, send.local_ids)
        if not local:
            return
        ready = send.event.cuda_event if send.event is not None else 0
        if send.layer_idx is None:
            state.nbytes_sent += self.transport.push_request(
                state.peer_id, state.request_id, local, remote, ready
            )
            state.sent_per_layer = [n + len(remote) for n in state.sent_per_layer]
        else:
            state.nbytes_sent += self.transport.push_layer(
                state.peer_id, state.request_id, send.layer_idx, local, remote, ready
            )
            state.sent_per_layer[send.layer_idx] += len(remote)

    def _push_whole(self, state: PrefillState, force: bool = False) -> None:
        """Whole-request mode (with `state.lock` held): every layer of the blocks D lacks in one push,
        once the targets are known and the hook handed over the prompt's last block (`force`: what
        was handed over, after the prefill). At most once."""
        complete = len(state.whole_local) >= state.num_hook_blocks
        if state.whole_pushed or state.targets is None or not (complete or force):
            return
        state.whole_pushed = True
        event, state.whole_event = state.whole_event, None
        self._push(state, _Send(None, 0, state.whole_local, event))

    def _kv_ready_event(self) -> Any:
        """Engine thread: with --enable-direct, a CUDA event after the KV written so far, which a send
        waits for (the transfer engine chains its own event to it, so it may die once the send was
        queued); else None (host staging copies synchronously, a CPU instance needs no event)."""
        return ea.record_kv_ready(self.engine) if self.config.enable_direct else None

    async def _release_prefill(self, request_id: str) -> bool:
        state = self.prefills.pop(request_id, None)
        self._take_early_targets(request_id)
        if state is not None and state.expiry is not None:
            state.expiry.cancel()
        if state is not None:  # a prefill still running ends now (its handler answers an error)
            state.error = state.error or "cancelled: released"
            state.targets_known.set()
            self.loop_thread.cancel_stream(request_id, "released")
        await self.transport.abort(request_id)
        await self._abort_and_release(request_id)
        return state is not None
