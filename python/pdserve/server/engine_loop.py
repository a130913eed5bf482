"""The one thread that drives an `LLMEngine` (not thread-safe, DESIGN §3) for an asyncio server.

The event loop never touches the engine: it submits a callable (`await loop_thread.call(fn)`), which runs
on the engine thread between two `step()`s; step outputs go back to per-request asyncio queues through
`loop.call_soon_threadsafe`. So the event loop never blocks on native or model work.

If `step()` raises (e.g. a tensor-parallel worker died: `WorkerFailure`), the engine never steps again:
every open stream gets ENGINE_DEAD, new work is refused, and the thread keeps running the commands
submitted with `after_failure=True` (releases, stats), so in-flight requests still give back their blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

log = logging.getLogger("pdserve.engine_loop")

# Sentinel pushed to a request's queue when the engine thread dies.
ENGINE_DEAD = object()


class RequestCancelled(RuntimeError):
    """A request's stream was ended from the event loop (`EngineLoop.cancel_stream`): released, or its
    prefill learned that its decode peer will not take the KV."""


class _Cancelled:
    def __init__(self, reason: str):
        self.reason = reason


class EngineLoop:
    """Owns the engine thread. `has_work(engine) -> bool` says whether to keep stepping."""

    def __init__(
        self, engine: Any, loop: asyncio.AbstractEventLoop, has_work: Callable[[Any], bool]
    ):
        self.engine = engine
        self._loop = loop
        self._has_work = has_work
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[
            str, asyncio.Queue
        ] = {}  # request_id -> outputs (touched on the event loop only)
        self._stopping = False
        self.error: BaseException | None = None
        self.num_steps = 0
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------- event-loop side
    async def call(self, fn: Callable[[Any], Any], after_failure: bool = False) -> Any:
        """Run `fn(engine)` on the engine thread; returns its result or raises its exception. Once the
        engine failed, only calls with `after_failure=True` (bookkeeping that needs no step) still run."""
        if self.error is not None and not after_failure:
            raise RuntimeError(f"engine failed: {self.error!r}")
        fut = self._loop.create_future()
        self._commands.put((fn, fut))
        return await fut

    def open_stream(self, request_id: str) -> asyncio.Queue:
        """A queue that receives this request's `RequestOutput`s (open it before adding the request)."""
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        return q

    @property
    def num_open_streams(self) -> int:
        return len(self._streams)

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def cancel_stream(self, request_id: str, reason: str) -> None:
        """Ends an open stream: its reader gets RequestCancelled (through `check`) at its next read,
        however long the engine would still run the request. No-op when it is not open."""
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(_Cancelled(reason))

    @staticmethod
    def check(out: Any) -> Any:
        """A stream item as read: raises RequestCancelled for a cancelled stream, else returns it."""
        if isinstance(out, _Cancelled):
            raise RequestCancelled(f"request cancelled: {out.reason}")
        return out

    def _deliver(self, outputs: list) -> None:
        for out in outputs:
            q = self._streams.get(str(out.request_id))
            if q is not None:
                q.put_nowait(out)

    def _fail_all(self) -> None:
        for q in self._streams.values():
            q.put_nowait(ENGINE_DEAD)

    # ------------------------------------------------------------- engine thread
    def _run_command(self, item) -> None:
        fn, fut = item
        try:
            result = fn(self.engine)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            self._loop.call_soon_threadsafe(_set_exception, fut, exc)
        else:
            self._loop.call_soon_threadsafe(_set_result, fut, result)

    def _next_command(self, block: bool, timeout: float = 0.5):
        try:
            return self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
        except queue.Empty:
            return ...

    def _run(self) -> None:
        try:
            while not self._stopping:
                # Idle: sleep on the command queue. Busy: take what is queued, then step.
                item = self._next_command(block=not self._has_work(self.engine))
                while item is not ...:
                    if item is None:
                        return
                    self._run_command(item)
                    item = self._next_command(block=False)
                if self._has_work(self.engine):
                    started = time.perf_counter()
                    outputs = self.engine.step()
                    self.num_steps += 1
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, list(outputs))
                    elif time.perf_counter() - started < 1e-4:
                        # Work that cannot run yet (e.g. waiting for blocks held by reservations):
                        # wait for a command instead of spinning a core.
                        item = self._next_command(block=True, timeout=0.005)
                        if item is None:
                            return
                        if item is not ...:
                            self._run_command(item)
        except BaseException as exc:  # noqa: BLE001 - the server reports it on /health
            self.error = exc
            log.error("engine failed; it will not step again:\n%s", traceback.format_exc())
            try:
                self._loop.call_soon_threadsafe(self._fail_all)
            except RuntimeError:
                return  # the event loop is gone: nobody waits
            self._serve_after_failure()

    def _serve_after_failure(self) -> None:
        """Runs the commands still submitted (releases, stats) until stop(); never steps."""
        while True:
            item = self._next_command(block=True)
            if item is ...:
                if self._stopping:
                    return
                continue
            if item is None:
                return
            try:
                self._run_command(item)
            except RuntimeError:  # the event loop closed under us
                return


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
