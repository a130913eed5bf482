"""`n` choices per request end to end on the CPU (real processes on 127.0.0.1, `tiny` preset).

A colocated instance asked directly, a scheduler in front of it, and a disaggregated cluster (layer-wise,
radix caching on both sides): choice i is what a single request with seed + i returns; the choices after
the first compute only the prompt's last partial block; a stop string ends one choice and not the
others; a stream carries every choice's chunks under its index; an early failure or a client leaving
holds nothing anywhere.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from cluster_checks import TINY_CPU, open_stream, post_error, settle_and_check
from pdserve.server.launcher import ProcessGroup, free_port, http_json
from test_cluster_disagg import (
    BS,
    _choice_text,
    _start_cluster,
    _wait_linked,
    assert_requests_ended,
    complete,
    sse_events,
    stats,
)

COMMON = [*TINY_CPU, "--block-size", str(BS), "--heartbeat-interval", "0.3"]
SAMPLED = {"temperature": 1.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def urls():
    group = ProcessGroup()
    try:
        cp, csp = free_port(), free_port()
        colo_url, colo_sched_url = f"http://127.0.0.1:{cp}", f"http://127.0.0.1:{csp}"
        colo = group.start(
            "colo",
            ["serve", "--port", str(cp), "--scheduler", "none", "--enable-radix-caching", *COMMON],
        )
        lay, lay_sched = _start_cluster(
            group, "layer", ["--enable-layer", "--enable-radix-caching"], common=COMMON
        )
        colo_sched = group.start(
            "colo-scheduler",
            ["scheduler", "--model", "tiny", "--port", str(csp), "--colocated", colo_url],
        )
        group.wait_healthy(colo, colo_url, timeout=90)
        group.wait_healthy(colo_sched, colo_sched_url, timeout=90, ready_key="ready")
        _wait_linked(group, lay_sched, lay.url)
        yield {
            "colo": colo_url,
            "colo_sched": colo_sched_url,
            "layer": lay.url,
            "instances": [colo_url, *lay.instances],
            "layer_instances": lay.instances,
        }
    finally:
        group.close()


@pytest.fixture(autouse=True)
def _nothing_held_after_each_test(urls):
    yield
    settle_and_check(urls["instances"])


def _tokens(reply: dict) -> list[list[int]]:
    assert [c["index"] for c in reply["choices"]] == list(range(len(reply["choices"])))
    return [c["token_ids"] for c in reply["choices"]]


@pytest.mark.parametrize("name", ["colo", "colo_sched", "layer"])
def test_choice_i_is_the_single_request_with_seed_plus_i(urls, name):
    url = urls[name]
    prompt = [(i * 13 + 5) % 250 for i in range(37)]
    reply = complete(url, prompt, max_tokens=8, n=3, seed=11, **SAMPLED)
    got = _tokens(reply)
    singles = [
        complete(url, prompt, max_tokens=8, seed=11 + i, **SAMPLED)["choices"][0]["token_ids"]
        for i in range(3)
    ]
    assert got == singles
    assert len({tuple(t) for t in got}) > 1  # sampled choices differ
    assert reply["usage"]["completion_tokens"] == 24 and reply["usage"]["prompt_tokens"] == 37
    # chat takes n as well
    chat = http_json(
        f"{url}/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2, **SAMPLED},
    )
    assert [c["index"] for c in chat["choices"]] == [0, 1]
    assert all(c["message"]["role"] == "assistant" for c in chat["choices"])


@pytest.mark.parametrize("name", ["colo", "colo_sched", "layer"])
def test_a_batch_of_prompts_answers_each_prompt_as_its_own_request(urls, name):
    """OpenAI's batched `prompt` (lm-eval sends its requests so): choice c is choice c % n of prompt
    c // n, what that prompt alone returns; usage sums the prompts; a stream carries every choice
    under its index; echo + logprobs with max_tokens 0 give each prompt its own."""
    url = urls[name]
    prompts = [[(i * 11 + 3 * k) % 250 for i in range(20 + 9 * k)] for k in range(2)]
    prompts.append("The quick brown fox")
    body = {"max_tokens": 5, "n": 2, "seed": 9, **SAMPLED}
    reply = complete(url, prompts, **body)
    singles = [complete(url, p, **body) for p in prompts]
    assert _tokens(reply) == [t for single in singles for t in _tokens(single)]
    assert reply["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert reply["usage"]["completion_tokens"] == 30
    tokens, ends, _ = _stream_choices(url, "/v1/completions", {"prompt": prompts, **body})
    assert [tokens[c] for c in range(6)] == _tokens(reply)
    assert [ends[c][1:] for c in range(6)] == [["length"]] * 6
    only = {"echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    batch = http_json(f"{url}/v1/completions", {"prompt": prompts, **only})["choices"]
    for choice, prompt in zip(batch, prompts, strict=True):
        alone = http_json(f"{url}/v1/completions", {"prompt": prompt, **only})["choices"][0]
        assert (
            choice["text"] == alone["text"]
            and choice["logprobs"]["tokens"] == (alone["logprobs"]["tokens"])
        )
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(
            alone["logprobs"]["token_logprobs"][1:], abs=1e-4
        )
    assert batch[2]["text"] == prompts[2]


def test_later_choices_compute_only_the_last_partial_block(urls):
    """Choice 0's prompt blocks enter the radix tree as soon as they are computed (while it decodes),
    and the other choices start after its first token: each computes only what follows the prompt's
    last whole block before its final token."""
    prompt = [(i * 7 + 101) % 250 for i in range(2 * BS + 9)]  # a fresh prompt: 2 blocks and 9
    for url, instance in (
        (urls["colo"], urls["colo"]),
        (urls["layer"], urls["layer_instances"][0]),
    ):
        before = stats(instance)["num_computed_prefill_tokens"]
        complete(url, prompt + [len(url) % 7], max_tokens=6, n=4, **SAMPLED)
        computed = stats(instance)["num_computed_prefill_tokens"] - before
        assert computed == (len(prompt) + 1) + 3 * (len(prompt) + 1 - 2 * BS), url


def _stream_choices(url: str, path: str, body: dict) -> tuple[dict[int, list[int]], dict, list]:
    """Streams body: (each index's tokens, each index's [text, finish reasons...], the events)."""
    events = sse_events(f"{url}{path}", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    tokens: dict[int, list[int]] = {}
    ends: dict[int, list[str]] = {}
    for chunk in events[:-1]:
        if not chunk["choices"]:  # the usage chunk
            continue
        (choice,) = chunk["choices"]
        tokens.setdefault(choice["index"], []).extend(choice["token_ids"])
        end = ends.setdefault(choice["index"], [""])
        end[0] += _choice_text(choice)
        if choice["finish_reason"] is not None:
            end.append(choice["finish_reason"])
    return tokens, ends, events


@pytest.mark.parametrize("name", ["colo", "layer"])
def test_a_stream_carries_every_choice_under_its_index(urls, name):
    url = urls[name]
    body = {"prompt": list(range(60, 90)), "max_tokens": 7, "n": 3, "seed": 3, **SAMPLED}
    whole = _tokens(complete(url, **body))
    tokens, ends, events = _stream_choices(
        url, "/v1/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert [tokens[i] for i in range(3)] == whole
    assert [ends[i][1:] for i in range(3)] == [["length"]] * 3  # one finish per choice
    assert events[-2]["usage"]["completion_tokens"] == 21
    chat = {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 3, "n": 2, **SAMPLED}
    _, _, events = _stream_choices(url, "/v1/chat/completions", chat)
    firsts = {}
    for e in events[:-1]:
        firsts.setdefault(e["choices"][0]["index"], e["choices"][0]["delta"])
    assert sorted(firsts) == [0, 1] and all(d.get("role") == "assistant" for d in firsts.values())


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", ["colo", "colo_sched", "layer"])
def test_a_stop_string_ends_its_choice_and_not_the_others(urls, name, stream):
    url = urls[name]
    body = {"prompt": "The quick brown fox", "max_tokens": 30, "n": 2, "seed": 5, **SAMPLED}
    texts = [c["text"] for c in complete(url, **body)["choices"]]
    # a stop string choice 0 generates (3 ASCII characters from its 3rd on) and choice 1 does not
    stop = next(
        texts[0][i : i + 3]
        for i in range(2, len(texts[0]) - 2)
        if texts[0][i : i + 3].isascii() and texts[0][i : i + 3] not in texts[1]
    )
    if stream:
        _, ends, _ = _stream_choices(url, "/v1/completions", {**body, "stop": stop})
        got = {i: tuple(ends[i]) for i in (0, 1)}
    else:
        reply = complete(url, **body, stop=stop)
        got = {c["index"]: (c["text"], c["finish_reason"]) for c in reply["choices"]}
        assert reply["usage"]["completion_tokens"] == sum(
            len(c["token_ids"]) for c in reply["choices"]
        )
    assert got == {0: (texts[0][: texts[0].index(stop)], "stop"), 1: (texts[1], "length")}
    assert_requests_ended(urls["instances"])


def test_the_client_leaving_ends_every_choice(urls):
    body = {"prompt": list(range(5, 70)), "max_tokens": 400, "n": 3, "stream": True, **SAMPLED}
    for url in (urls["colo"], urls["colo_sched"], urls["layer"]):
        resp = open_stream(f"{url}/v1/completions", body)
        seen = set()
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                seen.add(json.loads(line[len("data: ") :])["choices"][0]["index"])
            if len(seen) == 3:
                break
        resp.close()  # every choice was running: all of them end, on every instance
        settle_and_check(urls["instances"], timeout=15)


def _post_and_leave(url: str, body: dict, until) -> None:
    """POSTs body on a raw connection and closes it, without reading, once `until()` is true."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        deadline = time.monotonic() + 30
        while not until():
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.05)


def test_the_client_leaving_a_whole_reply_ends_every_choice(urls):
    """A non-stream reply writes nothing before its end, so only the connection tells that the
    client left: every choice's request ends then, long before its max_tokens (and so does one
    still waiting for its first token)."""
    max_tokens = 1500
    body = {"prompt": list(range(5, 70)), "max_tokens": max_tokens, "n": 2, **SAMPLED}
    for url, instance in (
        (urls["colo"], urls["colo"]),
        (urls["colo_sched"], urls["colo"]),
        (urls["layer"], urls["layer_instances"][1]),
    ):
        before = stats(instance)["num_generated_tokens"]
        _post_and_leave(
            url,
            body,
            lambda instance=instance, before=before: (
                stats(instance)["num_generated_tokens"] > before + 4
            ),
        )
        settle_and_check(urls["instances"], timeout=60)
        generated = stats(instance)["num_generated_tokens"] - before
        assert generated < max_tokens, (url, generated)  # 2 x max_tokens had they run on


def test_a_release_ends_the_generate_stream_of_its_request(urls):
    """The scheduler aborts a request through `release` (a stop string, a sibling choice refused, its
    client gone) and may leave the connection open: the instance's handler streaming it ends too,
    instead of waiting for outputs an aborted request never makes."""
    url = urls["colo"]
    body = {
        "request_id": "held-open",
        "prompt_token_ids": list(range(5, 40)),
        "sampling": {"max_tokens": 1500, "ignore_eos": True},
    }
    with open_stream(f"{url}/internal/v1/generate", body, timeout=30) as resp:
        assert json.loads(resp.readline())["token_ids"]
        http_json(f"{url}/internal/v1/release", {"request_id": "held-open", "abort": True})
        rest = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert not any(line["finish_reason"] for line in rest)  # it ended unfinished, at the release


def test_bad_n_and_refused_prompts_hold_nothing(urls):
    for url in (urls["colo"], urls["colo_sched"], urls["layer"]):
        for bad in (0, 65, "2"):
            status, msg = post_error(f"{url}/v1/completions", {"prompt": "x", "n": bad})
            assert status == 400 and "'n'" in msg, msg
        # past the model's context: every choice is refused before any byte, none stays (in a
        # batch, the other prompts' choices too)
        for stream in (False, True):
            # (prompt 0 still prefilling when prompt 1 is refused: its request ends on the spot)
            for prompt in ([5] * 3000, [[7] * 1500, [5] * 3000, "ok"]):
                body = {"prompt": prompt, "max_tokens": 4, "n": 3, "stream": stream}
                status, msg = post_error(f"{url}/v1/completions", body)
                assert status == 400 and "max_model_len" in msg, (url, msg)
