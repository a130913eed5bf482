"""Starting and reading a request's choices, for instances and scheduler: each choice is one engine
request whose `TokenDelta`s arrive as an async iterator. `start_choices` starts them (n per prompt) and
returns each with its first delta; `Arrivals` reads several as they come; `CancelledOnDisconnect`
ends them all when the client goes. Nothing here renders: openai_render turns the deltas into replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web


@dataclass
class TokenDelta:
    new_token_ids: list[int]
    finish_reason: str | None = None
    num_cached_tokens: int | None = None  # set once, when known
    # when the request asked for them: one {"logprob", "top": [[id, logprob], ...]} per new token
    logprobs: list[dict] | None = None
    # echo with logprobs: one entry per prompt token (None for the first), on the first delta only
    prompt_logprobs: list[dict | None] | None = None


class Arrivals:
    """(choice index, delta) from the choices' streams as they arrive. One stream is read directly;
    several are read by a task each, so a choice that waits never holds back the others."""

    def __init__(self, streams: list[AsyncIterator[TokenDelta]]):
        self._streams = streams
        self._ended: set[int] = set()
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    async def next(self) -> tuple[int, TokenDelta] | None:
        """The next delta of any choice; None once every choice ended. Raises what a stream raised."""
        if len(self._streams) == 1:
            if self._ended:
                return None
            try:
                return 0, await self._streams[0].__anext__()
            except StopAsyncIteration:
                self._ended.add(0)
                return None
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._tasks = [
                asyncio.create_task(self._pump(i, stream)) for i, stream in enumerate(self._streams)
            ]
        while len(self._ended) < len(self._streams):
            i, item = await self._queue.get()
            if i in self._ended:  # what a closed choice had queued
                continue
            if item is None:
                self._ended.add(i)
                continue
            if isinstance(item, Exception):
                raise item
            return i, item
        return None

    async def _pump(self, i: int, stream: AsyncIterator[TokenDelta]) -> None:
        try:
            async for d in stream:
                self._queue.put_nowait((i, d))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which reports it
            self._queue.put_nowait((i, exc))
            return
        self._queue.put_nowait((i, None))

    async def close(self, i: int) -> None:
        """Ends choice i now: its stream is closed, which ends its request where it runs."""
        self._ended.add(i)
        if self._tasks:
            self._tasks[i].cancel()
            await _wait_ended([self._tasks[i]])
        await self._streams[i].aclose()

    async def aclose(self) -> None:
        """Stops reading (the streams themselves are the caller's to close); returns once every
        reader ended, its stream's clean-up (e.g. the releases it sends) done."""
        for task in self._tasks:
            task.cancel()
        await _wait_ended(self._tasks)


async def _wait_ended(tasks: list[asyncio.Task]) -> None:
    """Waits until every task ended. A cancellation of ours meanwhile (the client left) is raised only
    after that, and never reaches the tasks: they were cancelled once already, and a second
    cancellation would cut their clean-up short (gather would pass it on)."""
    cancelled = False
    pending = set(tasks)
    while pending:
        try:
            _, pending = await asyncio.wait(pending)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


DISCONNECT_POLL_S = 0.2  # how often a request checks that its client is still connected


class CancelledOnDisconnect:
    """`async with CancelledOnDisconnect(http_request):` cancels the enclosed work (the task running
    it) once the client's connection is gone. aiohttp does not cancel handlers itself, so without this
    a non-stream reply, or any reply still waiting for its first token, would run its requests to
    their end for nobody. The cancellation lands inside the block (the watcher stops, without an
    await, before the block's exit can suspend), so the caller's cleanup after it runs whole."""

    def __init__(self, http_request: web.BaseRequest):
        self._request = http_request
        self._watcher: asyncio.Task | None = None

    async def __aenter__(self) -> None:
        task = asyncio.current_task()

        async def watch() -> None:
            while self._request.transport is not None:
                await asyncio.sleep(DISCONNECT_POLL_S)
            task.cancel()

        self._watcher = asyncio.ensure_future(watch())

    async def __aexit__(self, *exc_info) -> None:
        self._watcher.cancel()


def choice_request_id(request_id: str, index: int) -> str:
    """The engine request id of choice `index` of `request_id` (choice 0 keeps the request's id)."""
    return request_id if index == 0 else f"{request_id}.n{index}"


async def start_choices(
    n: int, start: Callable[[int], Awaitable[AsyncIterator[TokenDelta]]], num_prompts: int = 1
) -> list[ChoiceStream]:
    """Starts a request's choices, n per prompt (choice c is choice c % n of prompt c // n; `start(c)`
    starts it and returns its deltas), and waits for each one's first delta, so a failure to start (a
    refused request, no instance free) is raised here, before any byte of the reply. Each prompt's
    choice 0 starts at once, all prompts together; its other choices start once its first token came,
    when the prompt's KV is computed and in the radix cache, so they compute only the prompt's last
    partial block. With several choices each is read ahead from its start (`ReadAhead`): one whose
    first token came goes on where it runs while the others' first tokens are awaited. A failure
    stops the starts under way and closes every choice started (nothing stays held). Returns one
    stream per choice (its first delta, then the rest); close each (`aclose`)."""
    if n * num_prompts == 1:
        return [await _start_one(start)]
    readers: dict[int, ReadAhead] = {}
    closing = False  # a failure is being cleaned up: start nothing more

    def spawn(c: int) -> asyncio.Future:
        if closing:
            raise asyncio.CancelledError
        readers[c] = ReadAhead(c, start)
        return readers[c].first

    async def prompt_choices(p: int) -> None:
        await spawn(p * n)
        await asyncio.gather(*(spawn(p * n + j) for j in range(1, n)))

    async def close_started() -> None:
        # each reader is cancelled once, by its own aclose (a second cancellation could cut the
        # clean-up of its request short)
        await asyncio.gather(*(r.aclose() for r in list(readers.values())))

    groups = [asyncio.ensure_future(prompt_choices(p)) for p in range(num_prompts)]
    try:
        pending = set(groups)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            errors = [g.exception() for g in done if g.exception() is not None]
            if errors:
                raise errors[0]  # what the first failed start raised
    except BaseException:
        closing = True
        for group in groups:  # they only wait for first deltas: nothing of theirs to clean up
            if group.done() and not group.cancelled():
                group.exception()  # retrieved: the error that counts is raised below
            group.cancel()
        # shielded: the clean-up runs whole even when we are cancelled (the client left) meanwhile
        await asyncio.shield(asyncio.ensure_future(close_started()))
        raise
    return [readers[c] for c in range(n * num_prompts)]


async def _start_one(start: Callable[[int], Awaitable[AsyncIterator[TokenDelta]]]) -> Primed:
    """The only choice of a request, read directly (no task): its first delta pulled."""
    stream = await start(0)
    try:
        first = await stream.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await asyncio.shield(asyncio.ensure_future(stream.aclose()))
        raise
    return Primed(first, stream)


class ReadAhead:
    """One choice of a request with several, read by a task of its own from its start, so its request
    goes on where it runs (a disaggregated one takes its KV on D, ending D's reservation and its
    expiry) while the reply waits for the other choices' first tokens; the deltas wait in a queue.
    `first` resolves with the first delta (None: it ended without one) or the error that ended it."""

    def __init__(self, index: int, start: Callable[[int], Awaitable[AsyncIterator[TokenDelta]]]):
        self.first: asyncio.Future = asyncio.get_running_loop().create_future()
        self._stream: AsyncIterator[TokenDelta] | None = None
        self._queue: asyncio.Queue = asyncio.Queue()  # TokenDelta, an Exception, or None (the end)
        self._first_taken = False
        self._ended = False
        self._closed = False
        self._task = asyncio.ensure_future(self._read(index, start))

    async def _read(self, index: int, start) -> None:
        try:
            self._stream = await start(index)
            async for d in self._stream:
                if not self.first.done():
                    self.first.set_result(d)
                else:
                    self._queue.put_nowait(d)
        except Exception as exc:  # noqa: BLE001 - handed to whoever reads next
            if not self.first.done():
                self.first.set_exception(exc)
            else:
                self._queue.put_nowait(exc)
            return
        except BaseException:  # cancelled (aclose): a waiter of the first delta wakes too
            if not self.first.done():
                self.first.cancel()
            raise
        if not self.first.done():
            self.first.set_result(None)
        self._queue.put_nowait(None)

    def __aiter__(self) -> ReadAhead:
        return self

    async def __anext__(self) -> TokenDelta:
        if not self._first_taken:
            self._first_taken = True
            try:
                first = await self.first
            except BaseException:
                self._ended = True
                raise
            if first is not None:
                return first
            self._ended = True
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None or isinstance(item, Exception):
            self._ended = True
            if item is None:
                raise StopAsyncIteration
            raise item
        return item

    def peek(self) -> TokenDelta | None:
        """The first delta when not yet taken (None for a choice that ended without one)."""
        if self._first_taken or not self.first.done() or self.first.cancelled():
            return None
        return None if self.first.exception() is not None else self.first.result()

    async def aclose(self) -> None:
        """Stops reading (one cancellation, waited for: the request's clean-up runs whole) and closes
        the stream, which ends its request where it runs unless it finished. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._task.cancel()
        try:
            await _wait_ended([self._task])
        finally:  # also when we were cancelled meanwhile (raised after the reader ended)
            if self._stream is not None:
                await asyncio.shield(asyncio.ensure_future(self._stream.aclose()))


class Primed:
    """A started choice's stream with its first delta pulled already. `aclose()` closes the stream
    even when this was never iterated (an async generator closed before its start runs no `finally`)."""

    def __init__(self, first: TokenDelta | None, stream: AsyncIterator[TokenDelta]):
        self._first = first
        self._stream = stream

    def __aiter__(self) -> Primed:
        return self

    async def __anext__(self) -> TokenDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._stream.__anext__()

    def peek(self) -> TokenDelta | None:
        """The first delta when not yet taken (None for a choice that ended without one)."""
        return self._first

    async def aclose(self) -> None:
        self._first = None
        await self._stream.aclose()


ChoiceStream = Primed | ReadAhead  # what start_choices returns per choice
