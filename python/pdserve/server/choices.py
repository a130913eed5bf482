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
) -> list[Primed]:
    """Starts a request's choices, n per prompt (choice c is choice c % n of prompt c // n; `start(c)`
    starts it and returns its deltas), and waits for each one's first delta, so a failure to start (a
    refused request, no instance free) is raised here, before any byte of the reply. Each prompt's
    choice 0 starts at once, all prompts together; its other choices start once its first token came,
    when the prompt's KV is computed and in the radix cache, so they compute only the prompt's last
    partial block. A failure stops the starts under way and closes every choice started (nothing stays
    held). Returns one stream per choice (its first delta, then the rest); close each (`aclose`)."""
    started: dict[int, AsyncIterator[TokenDelta]] = {}
    begins: list[asyncio.Task] = []  # one per choice started; on a failure each is cancelled once
    closing = False  # a failure is being cleaned up: start nothing more

    async def begin(c: int) -> TokenDelta | None:
        stream = await start(c)
        started[c] = stream
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    def spawn(c: int) -> asyncio.Task:
        if closing:
            raise asyncio.CancelledError
        task = asyncio.ensure_future(begin(c))
        begins.append(task)
        return task

    async def prompt_choices(p: int) -> list[TokenDelta | None]:
        first = await spawn(p * n)
        rest = [spawn(p * n + j) for j in range(1, n)]
        return [first, *await asyncio.gather(*rest)]

    async def close_started() -> None:
        # only the starts are cancelled (a second cancellation could cut a start's own clean-up
        # short); each prompt's task ends with its starts
        for task in begins:
            task.cancel()
        await asyncio.wait([*begins, *groups])
        for stream in started.values():
            await stream.aclose()

    groups = [asyncio.ensure_future(prompt_choices(p)) for p in range(num_prompts)]
    try:
        pending = set(groups)
        while pending:  # asyncio.wait, not gather: our own cancellation does not reach the starts
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for group in done:
                group.result()  # raises what the first failed start raised
    except BaseException:
        closing = True
        # shielded: the clean-up runs whole even when we are cancelled (the client left) meanwhile
        await asyncio.shield(asyncio.ensure_future(close_started()))
        raise
    firsts = [first for group in groups for first in group.result()]
    return [Primed(first, started[c]) for c, first in enumerate(firsts)]


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
