"""start_choices and the renderer's reading of several choices, on fake streams (no server): the order
choices start in, and that every choice started is closed on every way out."""

from __future__ import annotations

import asyncio

import pytest
from pdserve.server.choices import Arrivals, TokenDelta, start_choices


class FakeStream:
    """Yields `num_deltas` one-token deltas (the last one finishing) and logs what happens to it."""

    def __init__(self, index: int, log: list, num_deltas: int = 2, fail: bool = False):
        self.index, self.log, self.left, self.fail = index, log, num_deltas, fail

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenDelta:
        await asyncio.sleep(0)
        if self.fail:
            raise ValueError(f"choice {self.index} refused")
        if self.left == 0:
            raise StopAsyncIteration
        self.left -= 1
        self.log.append(("delta", self.index))
        return TokenDelta([self.index], "length" if self.left == 0 else None)

    async def aclose(self) -> None:
        self.log.append(("closed", self.index))


def test_later_choices_start_after_the_first_ones_first_delta():
    log: list = []

    async def start(i: int) -> FakeStream:
        log.append(("start", i))
        return FakeStream(i, log)

    async def run() -> list[list[int]]:
        streams = await start_choices(3, start)
        got = []
        for stream in streams:
            got.append([t for d in [d async for d in stream] for t in d.new_token_ids])
            await stream.aclose()
        return got

    assert asyncio.run(run()) == [[0, 0], [1, 1], [2, 2]]
    assert log[:2] == [("start", 0), ("delta", 0)]
    assert {e for e in log if e[0] == "closed"} == {("closed", i) for i in range(3)}


def test_a_batchs_prompts_start_together_and_their_choices_after_their_own_first_delta():
    log: list = []
    releases = {0: asyncio.Event(), 2: asyncio.Event()}

    class Held(FakeStream):
        async def __anext__(self) -> TokenDelta:
            if self.index in releases and self.left == 2:
                await releases[self.index].wait()  # a prompt's prefill, still running
            return await super().__anext__()

    async def start(c: int) -> FakeStream:
        log.append(("start", c))
        return Held(c, log)

    async def run() -> list[int]:
        task = asyncio.ensure_future(start_choices(2, start, num_prompts=2))
        for _ in range(5):
            await asyncio.sleep(0)
        assert [e for e in log if e[0] == "start"] == [("start", 0), ("start", 2)]
        releases[2].set()  # prompt 1's first token: its choice 1 (choice 3) starts, not choice 1
        for _ in range(5):
            await asyncio.sleep(0)
        assert ("start", 3) in log and ("start", 1) not in log
        releases[0].set()
        streams = await task
        firsts = [s.peek().new_token_ids[0] for s in streams]
        for s in streams:
            await s.aclose()
        return firsts

    assert asyncio.run(run()) == [0, 1, 2, 3]
    assert sorted(e for e in log if e[0] == "closed") == [("closed", c) for c in range(4)]


def test_a_batch_choice_that_cannot_start_closes_every_started_one():
    log: list = []

    class Hangs(FakeStream):
        async def __anext__(self) -> TokenDelta:
            await asyncio.Event().wait()  # a prefill that never ends: the failure cancels it

    async def start(c: int) -> FakeStream:
        if c == 3:
            await asyncio.sleep(0.01)  # the others are started and read by then
        return (Hangs if c == 4 else FakeStream)(c, log, fail=c == 3)

    with pytest.raises(ValueError, match="choice 3 refused"):
        asyncio.run(start_choices(2, start, num_prompts=3))
    # prompt 2's choice 1 never started (its choice 0 hung); everything started was closed
    assert sorted(e for e in log if e[0] == "closed") == [("closed", c) for c in range(5)]


def test_cancelling_the_starts_lets_each_start_clean_up_and_closes_every_stream():
    """The client leaving cancels the request's task while its choices start: each start is
    cancelled once (a second cancellation would cut its own clean-up short, e.g. the releases a
    disaggregated request sends) and every stream started is closed."""
    log: list = []

    class Prefilling(FakeStream):
        async def __anext__(self) -> TokenDelta:
            try:
                await asyncio.Event().wait()  # a prefill still queued
            except asyncio.CancelledError:
                await asyncio.sleep(0.01)  # the request's releases, over the network
                self.log.append(("cleaned", self.index))
                raise

    async def start(c: int) -> FakeStream:
        return (Prefilling if c != 2 else FakeStream)(c, log)

    async def run(cancel_after_s: float, start) -> None:
        task = asyncio.ensure_future(start_choices(2, start, num_prompts=2))
        await asyncio.sleep(cancel_after_s)  # prompt 1's choice 0 (choice 2) came by then
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)  # a clean-up still running on its own

    asyncio.run(run(0.01, start))
    assert sorted(e for e in log if e[0] == "cleaned") == [("cleaned", c) for c in (0, 3)]
    assert sorted(e for e in log if e[0] == "closed") == [("closed", c) for c in (0, 2, 3)]
    # a start fails; the client leaves while the others clean up: the clean-up still runs whole
    log.clear()

    async def start_failing(c: int) -> FakeStream:
        return (Prefilling if c == 0 else FakeStream)(c, log, fail=c == 2)

    asyncio.run(run(0.005, start_failing))
    assert [e for e in log if e[0] == "cleaned"] == [("cleaned", 0)]
    assert sorted(e for e in log if e[0] == "closed") == [("closed", 0), ("closed", 2)]


def test_a_choice_that_cannot_start_closes_every_started_one():
    log: list = []

    async def start(i: int) -> FakeStream:
        return FakeStream(i, log, fail=i == 2)

    with pytest.raises(ValueError, match="choice 2 refused"):
        asyncio.run(start_choices(3, start))
    assert sorted(e for e in log if e[0] == "closed") == [("closed", i) for i in range(3)]


def test_a_started_choice_closed_before_it_was_read_is_closed():
    log: list = []

    async def start(i: int) -> FakeStream:
        return FakeStream(i, log)

    async def run() -> None:
        streams = await start_choices(2, start)
        for stream in streams:  # e.g. the reply failed before reading any choice
            await stream.aclose()

    asyncio.run(run())
    assert sorted(e for e in log if e[0] == "closed") == [("closed", 0), ("closed", 1)]


def test_closing_one_choice_leaves_the_others_running():
    log: list = []

    async def run() -> dict[int, int]:
        streams = [FakeStream(i, log, num_deltas=4) for i in range(3)]
        arrivals = Arrivals(streams)
        counts = {0: 0, 1: 0, 2: 0}
        try:
            while (arrival := await arrivals.next()) is not None:
                i, _ = arrival
                counts[i] += 1
                if i == 1:
                    await arrivals.close(1)
        finally:
            await arrivals.aclose()
        return counts

    assert asyncio.run(run()) == {0: 4, 1: 1, 2: 4}
    assert [e for e in log if e[0] == "closed"] == [("closed", 1)]


def test_a_reader_cancelled_while_its_choices_clean_up_lets_them_finish():
    """The client leaves while the reply stops reading its choices (the write failed, then the
    disconnect watcher cancels the handler): each choice's clean-up, cancelled once already, runs
    whole; the handler's cancellation is raised after it."""
    log: list = []

    class SlowToEnd(FakeStream):
        async def __anext__(self) -> TokenDelta:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.02)  # the request's releases, over the network
                self.log.append(("cleaned", self.index))
                raise

    async def run() -> None:
        arrivals = Arrivals([SlowToEnd(i, log) for i in range(3)])
        reading = asyncio.ensure_future(arrivals.next())
        await asyncio.sleep(0.01)  # every reader waits on its choice
        reading.cancel()
        closing = asyncio.ensure_future(arrivals.aclose())
        await asyncio.sleep(0.005)
        closing.cancel()  # the second cancellation, mid clean-up
        with pytest.raises(asyncio.CancelledError):
            await closing

    asyncio.run(run())
    assert sorted(log) == [("cleaned", i) for i in range(3)]


def test_a_choice_whose_first_delta_came_is_read_on_while_others_wait():
    """Several choices are read ahead from their start: one whose first token came goes on where it
    runs (a disaggregated request takes its KV on D, ending D's reservation and its expiry) while
    another prompt's first token is still awaited; its deltas wait for the reply in order."""
    log: list = []
    release = asyncio.Event()

    class Held(FakeStream):
        async def __anext__(self) -> TokenDelta:
            if self.index == 1 and self.left == 3:
                await release.wait()  # prompt 1's prefill, still running
            return await super().__anext__()

    async def start(c: int) -> FakeStream:
        return Held(c, log, num_deltas=3)

    async def run() -> list[list[int]]:
        task = asyncio.ensure_future(start_choices(1, start, num_prompts=2))
        for _ in range(10):
            await asyncio.sleep(0)
        assert [e for e in log if e == ("delta", 0)] == [("delta", 0)] * 3  # read to its end
        assert not task.done()
        release.set()
        streams = await task
        got = []
        for s in streams:
            got.append([t async for d in s for t in d.new_token_ids])
        for s in streams:
            await s.aclose()
        return got

    assert asyncio.run(run()) == [[0, 0, 0], [1, 1, 1]]


def test_a_choice_closed_while_the_reply_is_cancelled_still_closes_its_stream():
    """Closing one choice (a stop string) while the client leaves: the reader's clean-up runs whole,
    then the stream is closed all the same (on an instance, that is what aborts the engine request)."""
    log: list = []

    class SlowToEnd(FakeStream):
        async def __anext__(self) -> TokenDelta:
            if self.left == 2:
                return await super().__anext__()  # the first delta comes at once
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.02)
                self.log.append(("cleaned", self.index))
                raise

    async def start(c: int) -> FakeStream:
        return SlowToEnd(c, log)

    async def run() -> None:
        streams = await start_choices(2, start)
        closing = asyncio.ensure_future(streams[0].aclose())
        await asyncio.sleep(0.005)
        closing.cancel()  # the client left meanwhile
        with pytest.raises(asyncio.CancelledError):
            await closing
        await streams[0].aclose()  # the caller's own clean-up: a no-op by now
        await streams[1].aclose()

    asyncio.run(run())
    assert sorted(e for e in log if e[0] != "delta") == [
        ("cleaned", 0),
        ("cleaned", 1),
        ("closed", 0),
        ("closed", 1),
    ]
