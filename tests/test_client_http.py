"""The load client against a small OpenAI-compatible aiohttp server started inside the test.

The fake server is a protocol fixture for the client only (SSE framing, usage, error bodies);
the real pdserve servers are exercised with this client by the server tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web
from pdserve.client import bench
from pdserve.client.bench import BenchConfig, format_table, load_result_json, run_benchmark
from pdserve.client.metrics import RequestRecord
from pdserve.client.openai_client import endpoint_url, send_request

MODEL = "fake-model"
TOKEN_DELAY_S = 0.002


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class FakeOpenAI:
    """Answers `max_tokens` tokens " t0", " t1", ...; `cached_tokens` = characters (or ids) shared
    with the longest earlier prompt; model "bad" gets a 400, "busy" a 503, "broken" an error event,
    "slow" waits 0.5 s before answering."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.prompts: list[list] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    def _prompt_units(self, body: dict) -> list:
        if "messages" in body:
            return list("".join(m["content"] for m in body["messages"]))
        prompt = body["prompt"]
        return list(prompt) if isinstance(prompt, list) else list(prompt)

    def _cached(self, units: list) -> int:
        best = 0
        for earlier in self.prompts:
            n = 0
            for a, b in zip(units, earlier, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self.prompts.append(units)
        return best

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if body.get("model") == "bad":
            return web.json_response(
                {
                    "error": {
                        "message": "model 'bad' does not exist",
                        "type": "invalid_request_error",
                    }
                },
                status=400,
            )
        if body.get("model") == "busy":
            return web.Response(status=503, text="overloaded, retry later")
        if body.get("model") == "slow":
            await asyncio.sleep(0.5)
        units = self._prompt_units(body)
        usage = _usage(len(units), body["max_tokens"], self._cached(units))
        texts = [f" t{i}" for i in range(body["max_tokens"])]
        if not body.get("stream"):
            text = "".join(texts)
            choice = (
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return web.json_response({"id": "x", "choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(payload: dict) -> None:
            await response.write(f"data: {json.dumps(payload)}\n\n".encode())

        if chat:
            await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        for i, text in enumerate(texts):
            await asyncio.sleep(TOKEN_DELAY_S)
            if body.get("model") == "broken" and i == 1:
                await send({"error": {"message": "decode instance lost", "code": 500}})
                await response.write_eof()
                return response
            finish = "length" if i == len(texts) - 1 else None
            choice = (
                {"index": 0, "delta": {"content": text}, "finish_reason": finish}
                if chat
                else {"index": 0, "text": text, "finish_reason": finish}
            )
            await send({"id": "x", "choices": [choice]})
        await response.write(b": keep-alive comment\n\n")
        await send({"id": "x", "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeOpenAI]]:
    """(base URL, fake) of a fake server running on its own event loop in a thread."""
    fake = FakeOpenAI()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def start() -> None:
        runner = web.AppRunner(fake.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{holder['port']}", fake
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _send(url: str, body: dict, endpoint: str = "completions") -> RequestRecord:
    async def go() -> RequestRecord:
        async with aiohttp.ClientSession() as session:
            record = RequestRecord(
                request_id=0, conversation_id=0, turn_index=0, scheduled_offset_s=0.0
            )
            return await send_request(
                session, endpoint_url(url, endpoint), body, record, endpoint=endpoint
            )

    return asyncio.run(go())


def test_stream_completion_times_every_chunk(server) -> None:
    url, _ = server
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}
    record = _send(url, body)
    assert record.ok and record.http_status == 200 and record.error is None
    assert record.num_chunks == 4 and len(record.itl_s) == 3
    assert record.output_text == " t0 t1 t2 t3"
    assert 0 < record.ttft_s <= record.e2e_s
    assert record.usage_reported and record.prompt_tokens == 3 and record.completion_tokens == 4
    assert record.finish_reason == "length"
    assert record.tpot_s == pytest.approx((record.e2e_s - record.ttft_s) / 3)


def test_stream_chat_ignores_role_chunk(server) -> None:
    url, _ = server
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    record = _send(url, body, endpoint="chat")
    assert record.ok and record.num_chunks == 3 and record.output_text == " t0 t1 t2"
    assert record.ttft_s >= TOKEN_DELAY_S


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_non_stream(server, endpoint: str) -> None:
    url, _ = server
    body = {"model": MODEL, "max_tokens": 2, "stream": False}
    body.update(
        {"messages": [{"role": "user", "content": "x"}]} if endpoint == "chat" else {"prompt": "x"}
    )
    record = _send(url, body, endpoint=endpoint)
    assert record.ok and record.output_text == " t0 t1"
    assert record.ttft_s is None and record.e2e_s > 0 and record.completion_tokens == 2


def test_http_errors_are_recorded_not_raised(server) -> None:
    url, _ = server
    record = _send(url, {"model": "bad", "prompt": "x", "max_tokens": 2, "stream": True})
    assert not record.ok and record.http_status == 400
    assert record.error == "model 'bad' does not exist"
    record = _send(url, {"model": "busy", "prompt": "x", "max_tokens": 2, "stream": True})
    assert not record.ok and record.http_status == 503 and "overloaded" in record.error
    record = _send(url, {"model": "broken", "prompt": "x", "max_tokens": 4, "stream": True})
    assert not record.ok and record.http_status == 200 and "decode instance lost" in record.error


def test_unreachable_server_is_recorded() -> None:
    record = _send(
        "http://127.0.0.1:9", {"model": MODEL, "prompt": "x", "max_tokens": 2, "stream": True}
    )
    assert not record.ok and record.http_status is None and "Connect" in record.error


def test_random_benchmark_end_to_end(server) -> None:
    url, _ = server
    config = BenchConfig(
        url=url,
        input_len=8,
        output_len=3,
        num_requests=6,
        request_rate=200.0,
        progress=False,
        slo_ttft_ms=10_000,
        slo_tpot_ms=10_000,
    )
    result = asyncio.run(run_benchmark(config))
    assert result.model == MODEL
    s = result.summary
    assert s.num_completed == 6 and s.num_failed == 0 and s.num_good == 6
    assert s.total_prompt_tokens == 48 and s.total_completion_tokens == 18
    assert s.ttft_ms.count == 6 and s.itl_ms.count == 12 and s.prefix_hit_tokens is not None
    assert "TTFT" in format_table(result)


def test_multi_turn_sends_history_after_each_answer(server) -> None:
    url, fake = server
    fake.bodies.clear()
    config = BenchConfig(
        url=url,
        dataset="random",
        multi_turn=True,
        max_turns=3,
        num_requests=2,
        input_len=4,
        output_len=2,
        request_rate=float("inf"),
        progress=False,
    )
    result = asyncio.run(run_benchmark(config))
    assert result.summary.num_completed == 6 and result.summary.num_conversations == 2
    for conversation_id in (0, 1):
        turns = sorted(
            (r for r in result.records if r.conversation_id == conversation_id),
            key=lambda r: r.turn_index,
        )
        assert [r.turn_index for r in turns] == [0, 1, 2]
        # each turn starts only after the previous answer ended
        for earlier, later in zip(turns, turns[1:], strict=False):
            assert later.start_offset_s >= earlier.start_offset_s + earlier.e2e_s
    prompts = [b["prompt"] for b in fake.bodies]
    # turn k's prompt = turn k-1's prompt + the answer it got + the new user turn
    for prompt in prompts:
        if prompt.count("User:") > 1:
            previous = prompt[: prompt.rindex("\nUser:")]
            assert previous.endswith(" t0 t1")
            assert previous[: -len(" t0 t1")] in prompts
    later_turns = [r for r in result.records if r.turn_index > 0]
    assert all(r.cached_tokens > 0 for r in later_turns)


def test_multi_turn_chat_messages(server) -> None:
    url, fake = server
    fake.bodies.clear()
    config = BenchConfig(
        url=url,
        endpoint="chat",
        dataset="random",
        multi_turn=True,
        max_turns=2,
        num_requests=1,
        input_len=3,
        output_len=2,
        progress=False,
    )
    asyncio.run(run_benchmark(config))
    first, second = (b["messages"] for b in fake.bodies)
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert second[0] == first[0] and second[1]["content"] == " t0 t1"


def test_cli_writes_result_json_and_fails_on_errors(server, tmp_path, capsys) -> None:
    url, _ = server
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(
        [
            "--url",
            url,
            "--num-requests",
            "3",
            "--request-rate",
            "inf",
            "--output-len",
            "2",
            "--no-progress",
            "--result-json",
            str(out),
        ]
    )
    assert bench.run(args) == 0
    printed = capsys.readouterr().out
    assert "Request throughput" in printed and "completed=3/3" in printed
    loaded = load_result_json(out)
    assert loaded.summary.num_completed == 3 and len(loaded.records) == 3
    args = parser.parse_args(
        ["--url", url, "--model", "bad", "--num-requests", "2", "--no-progress"]
    )
    assert bench.run(args) == 1
    assert "model 'bad' does not exist" in capsys.readouterr().out


def test_timeout_is_recorded(server) -> None:
    url, _ = server
    config = BenchConfig(url=url, model="slow", num_requests=1, timeout_s=0.1, progress=False)
    result = asyncio.run(run_benchmark(config))
    assert result.summary.num_failed == 1
    assert result.records[0].error == "timed out after 0.1 s"


def test_max_concurrency_limits_requests_in_flight(server, capsys) -> None:
    url, _ = server
    config = BenchConfig(
        url=url,
        num_requests=4,
        output_len=3,
        request_rate=float("inf"),
        max_concurrency=1,
        progress=True,
    )
    result = asyncio.run(run_benchmark(config))
    spans = sorted((r.start_offset_s, r.start_offset_s + r.e2e_s) for r in result.records)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    assert "4/4" in capsys.readouterr().err  # the progress bar went to stderr
