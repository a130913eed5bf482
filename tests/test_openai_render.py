"""start_choices and the renderer's reading of several choices, on fake streams (no server): the order
choices start in, and that every choice started is closed on every way out."""

from __future__ import annotations

import asyncio

import pytest
from pdserve.server.openai_render import TokenDelta, _Arrivals, start_choices


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
        arrivals = _Arrivals(streams)
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
