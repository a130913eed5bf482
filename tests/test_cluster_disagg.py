"""The disaggregated cluster end to end on the CPU (real processes on 127.0.0.1, `tiny` preset).

One module-wide set of processes:
  - `colo`: a colocated instance (--role both), asked directly;
  - cluster L: scheduler + prefill + decode, layer-wise transfer, radix caching on both, dcache;
  - cluster W: scheduler + prefill + decode, whole-request transfer, block-major (--use-agg-block), KV through
    host staging slots (`--kv-staging on`, what a GPU instance without --enable-direct does), no caching;
  - a scheduler in front of the colocated instance (`--colocated URL`).
After every test, every instance's block invariant holds and nothing stays reserved or pinned.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.error
import urllib.request

import pytest
from cluster_checks import TINY_CPU, open_stream, post_error, settle_and_check
from pdserve.engine.tokenizer import Tokenizer
from pdserve.server.launcher import ProcessGroup, free_port, http_json
from prometheus_client.parser import text_string_to_metric_families

BS = 16
COMMON = [
    *TINY_CPU,
    "--block-size",
    str(BS),
    "--heartbeat-interval",
    "0.3",
]


class Cluster:
    def __init__(self, scheduler_url: str, prefill_url: str, decode_url: str):
        self.url = scheduler_url
        self.prefill = prefill_url
        self.decode = decode_url

    @property
    def instances(self) -> list[str]:
        return [self.prefill, self.decode]


def _start_cluster(
    group: ProcessGroup, name: str, flags: list[str], common: list[str] = COMMON
) -> tuple[Cluster, object]:
    sp, pp, dp = free_port(), free_port(), free_port()
    surl = f"http://127.0.0.1:{sp}"
    # instances first: they keep offering themselves until the scheduler is up (the seed's order)
    group.start(
        f"{name}-prefill",
        [
            "serve",
            "--role=prompt",
            "--enable-separate",
            "--local_port",
            str(pp),
            "--scheduler",
            surl,
            *common,
            *flags,
        ],
    )
    group.start(
        f"{name}-decode",
        [
            "serve",
            "--role=decoder",
            "--enable-separate",
            "--local_port",
            str(dp),
            "--scheduler",
            surl,
            *common,
            *flags,
        ],
    )
    sched = group.start(
        f"{name}-scheduler",
        ["scheduler", "--model", "tiny", "--port", str(sp), "--poll-interval", "0.2"],
    )
    return Cluster(surl, f"http://127.0.0.1:{pp}", f"http://127.0.0.1:{dp}"), sched


def _wait_linked(group, sched, url, timeout=90):
    group.wait_healthy(sched, url, timeout=timeout, ready_key="ready")
    deadline = time.monotonic() + timeout
    while not http_json(f"{url}/internal/v1/cluster")["linked"]:
        assert time.monotonic() < deadline, "scheduler never linked P and D"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster():
    group = ProcessGroup()
    try:
        cp = free_port()
        colo = group.start("colo", ["serve", "--port", str(cp), "--scheduler", "none", *COMMON])
        lay, lay_sched = _start_cluster(
            group, "layer", ["--enable-layer", "--enable-radix-caching", "--enable-dcache"]
        )
        whole, whole_sched = _start_cluster(
            group, "whole", ["--use-agg-block", "--kv-staging", "on", "--staging-gb", "0.01"]
        )
        colo_url = f"http://127.0.0.1:{cp}"
        csp = free_port()
        colo_sched = group.start(
            "colo-scheduler",
            ["scheduler", "--model", "tiny", "--port", str(csp), "--colocated", colo_url],
        )
        group.wait_healthy(colo, colo_url, timeout=90)
        group.wait_healthy(colo_sched, f"http://127.0.0.1:{csp}", timeout=90, ready_key="ready")
        _wait_linked(group, lay_sched, lay.url)
        _wait_linked(group, whole_sched, whole.url)
        yield {
            "colo": colo_url,
            "layer": lay,
            "whole": whole,
            "colo_sched": f"http://127.0.0.1:{csp}",
        }
    finally:
        group.close()


def all_instances(c) -> list[str]:
    return [c["colo"], *c["layer"].instances, *c["whole"].instances]


@pytest.fixture(autouse=True)
def _invariants_after_each_test(cluster):
    yield
    settle_and_check(all_instances(cluster))


def complete(url: str, prompt, max_tokens: int = 12, **extra) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    return http_json(f"{url}/v1/completions", body)


def stats(url: str) -> dict:
    return http_json(f"{url}/internal/v1/stats")


PROMPTS = [
    [7],  # one token
    list(range(20, 36)),  # exactly one block
    list(range(40, 73)),  # two blocks and a bit
    [(i * 37) % 250 for i in range(100)],  # several blocks
]


def check_greedy_like_colocated(cluster, prompt) -> list[int]:
    """Asserts clusters "layer" and "whole" answer `prompt` (12 greedy tokens) as "colo" does; returns them."""
    ref = complete(cluster["colo"], prompt)["choices"][0]["token_ids"]
    assert len(ref) == 12
    for name in ("layer", "whole"):
        got = complete(cluster[name].url, prompt)["choices"][0]["token_ids"]
        assert got == ref, (name, prompt[:5])
    return ref


def test_greedy_outputs_identical_colocated_layerwise_whole(cluster):
    for prompt in PROMPTS:
        ref = check_greedy_like_colocated(cluster, prompt)
        assert complete(cluster["colo_sched"], prompt)["choices"][0]["token_ids"] == ref
    # penalties: P samples the first token (nothing generated yet), D the rest counting it
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5}
    prompt = PROMPTS[0]  # its greedy answer repeats a token
    ref = complete(cluster["colo"], prompt, **penalties)["choices"][0]["token_ids"]
    assert ref != complete(cluster["colo"], prompt)["choices"][0]["token_ids"]
    for url in (cluster["layer"].url, cluster["whole"].url, cluster["colo_sched"]):
        assert complete(url, prompt, **penalties)["choices"][0]["token_ids"] == ref, url
    text = "The quick brown fox jumps over the lazy dog. " * 2
    ref = complete(cluster["colo"], text)["choices"][0]
    got = complete(cluster["layer"].url, text)["choices"][0]
    assert got["token_ids"] == ref["token_ids"] and got["text"] == ref["text"]


def test_logit_bias_through_every_path_equals_the_colocated_instance(cluster):
    """P samples the first token and D the rest, both with the request's bias: the answers equal
    the colocated instance's, and the banned token never comes. Bad biases are 400s naming the field."""
    prompt = PROMPTS[2]
    plain = complete(cluster["colo"], prompt)["choices"][0]["token_ids"]
    bias = {str(plain[0]): -100, str(plain[1]): -100, "65": 2.5}
    ref = complete(cluster["colo"], prompt, logit_bias=bias)["choices"][0]["token_ids"]
    assert ref != plain and plain[0] not in ref and plain[1] not in ref
    for url in (cluster["layer"].url, cluster["whole"].url, cluster["colo_sched"]):
        assert complete(url, prompt, logit_bias=bias)["choices"][0]["token_ids"] == ref, url
    for url in (cluster["layer"].url, cluster["colo"], cluster["colo_sched"]):
        for bad, words in (({"x": 1}, "token ids"), ({"5": 101}, "[-100, 100]")):
            status, msg = post_error(f"{url}/v1/completions", {"prompt": "x", "logit_bias": bad})
            assert status == 400 and "logit_bias" in msg and words in msg, (url, msg)
        body = {"prompt": "x", "logit_bias": {"100000": 1}, "max_tokens": 2}
        status, msg = post_error(f"{url}/v1/completions", body)
        assert status == 400 and "vocabulary" in msg, (url, msg)


def test_allowed_token_ids_through_every_path_equal_the_colocated_instance(cluster):
    """P samples the first token and D the rest, both from the allowed set: the answers equal the
    colocated instance's and stay in the set (chat too). Bad sets are 400s naming the field."""
    prompt = PROMPTS[2]
    allowed = [66, 70, 101, 117]
    ref = complete(cluster["colo"], prompt, allowed_token_ids=allowed)["choices"][0]["token_ids"]
    assert set(ref) <= set(allowed) and len(set(ref)) > 1
    for url in (cluster["layer"].url, cluster["whole"].url, cluster["colo_sched"]):
        assert complete(url, prompt, allowed_token_ids=allowed)["choices"][0]["token_ids"] == ref
    for url in (cluster["layer"].url, cluster["colo"], cluster["colo_sched"]):
        for bad, words in (
            ([], "1 to"),
            ([1, "2"], "non-negative integers"),
            ([100000], "vocabulary"),
        ):
            body = {"prompt": "x", "allowed_token_ids": bad, "max_tokens": 2}
            status, msg = post_error(f"{url}/v1/completions", body)
            assert status == 400 and "allowed_token_ids" in msg and words in msg, (url, msg)
        chat = http_json(
            f"{url}/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 6,
                "temperature": 0,
                "ignore_eos": True,
                "allowed_token_ids": [ord("a"), ord("b")],
            },
        )
        assert set(chat["choices"][0]["message"]["content"]) <= {"a", "b"}, url


def test_min_tokens_through_every_path_equal_the_colocated_instance(cluster):
    """A stop id the plain answer produces at once: with min_tokens, P's first token and D's next
    ones hold it back until min_tokens, on every path as on the colocated instance; stop strings
    wait too. min_tokens above max_tokens is a 400 naming the field."""
    prompt = PROMPTS[2]
    plain = complete(cluster["colo"], prompt)["choices"][0]["token_ids"]
    stop = {"stop_token_ids": [plain[0]], "ignore_eos": False}
    assert complete(cluster["colo"], prompt, **stop)["choices"][0]["token_ids"] == [plain[0]]
    ref = complete(cluster["colo"], prompt, min_tokens=5, **stop)["choices"][0]
    assert len(ref["token_ids"]) >= 5 and plain[0] not in ref["token_ids"][:5]
    text_stop = Tokenizer.byte_level().decode(ref["token_ids"][:1])
    assert text_stop.strip(), ref  # a printable first character: the stop string below
    for url in (cluster["layer"].url, cluster["whole"].url, cluster["colo_sched"]):
        got = complete(url, prompt, min_tokens=5, **stop)["choices"][0]
        assert got["token_ids"] == ref["token_ids"], url
        # a stop string matching the first token waits for min_tokens as well
        later = complete(url, prompt, min_tokens=5, stop=[text_stop])["choices"][0]
        assert len(later["token_ids"]) >= 5, (url, later)
        status, msg = post_error(
            f"{url}/v1/completions", {"prompt": "x", "min_tokens": 3, "max_tokens": 2}
        )
        assert status == 400 and "min_tokens" in msg, (url, msg)
        # a stop id past the vocabulary has nothing to hold back: an answer, not a dead engine
        far = {"stop_token_ids": [10**6], "min_tokens": 2, "max_tokens": 3}
        assert len(complete(url, prompt, **far)["choices"][0]["token_ids"]) == 3, url
    settle_and_check(cluster["layer"].instances)


def test_layerwise_sends_each_layer_as_it_is_done(cluster):
    """Layer-wise: one send per layer, queued from the layer hook during the forward pass; whole: one."""
    prompt = [(i * 3 + 7) % 250 for i in range(40)]  # one prefill step
    num_layers = http_json(f"{cluster['layer'].prefill}/internal/v1/info")["layout"]["num_layers"]
    for name, expected in (("layer", num_layers), ("whole", 1)):
        p = cluster[name].prefill
        before = stats(p)["kv_num_sends"]
        complete(cluster[name].url, prompt + [len(name)], max_tokens=2)
        assert stats(p)["kv_num_sends"] - before == expected, name


def test_max_tokens_one_ends_at_prefill(cluster):
    for name in ("layer", "whole"):
        out = complete(cluster[name].url, list(range(50, 90)), max_tokens=1)
        assert (
            out["choices"][0]["finish_reason"] == "length"
            and len(out["choices"][0]["token_ids"]) == 1
        )


def sse_events(url: str, body: dict) -> list:
    events = []
    with open_stream(url, body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if not line:
                continue
            assert line.startswith("data: ")
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_streaming_through_the_scheduler(cluster):
    url = cluster["layer"].url
    prompt = list(range(60, 100))
    ref = complete(url, prompt, max_tokens=10)["choices"][0]["token_ids"]
    body = {
        "prompt": prompt,
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(f"{url}/v1/completions", body)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] == 10 and usage["prompt_tokens"] == len(prompt)
    chunks = events[:-2]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == ref
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # chat, streamed, through the scheduler
    events = sse_events(
        f"{url}/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "ignore_eos": True,
        },
    )
    assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"


def test_second_turn_computes_only_new_tokens_with_dcache(cluster):
    lay = cluster["layer"]
    turn1 = [(i * 11 + 3) % 250 for i in range(45)]
    hits0 = {url: stats(url)["num_hit_tokens"] for url in (lay.prefill, lay.decode)}
    out1 = complete(lay.url, turn1, max_tokens=20)["choices"][0]["token_ids"]
    time.sleep(0.1)
    settle_and_check(lay.instances)  # the back-transfer finished
    # the back-transfer's locks (D's blocks to send, P's cached prefix) are no prompt hits
    assert {url: stats(url)["num_hit_tokens"] for url in hits0} == hits0
    turn2 = turn1 + out1 + [(i * 7 + 5) % 250 for i in range(30)]
    before = stats(lay.prefill)["num_prefill_computed_tokens"]
    resp = complete(lay.url, turn2, max_tokens=4)
    computed = stats(lay.prefill)["num_prefill_computed_tokens"] - before
    # D computed KV for every token but the last generated one; its whole blocks came back to P
    num_back = (len(turn1) + len(out1) - 1) // BS * BS
    assert computed == len(turn2) - num_back
    assert computed < len(turn2) - len(turn1)  # less than even the new tokens + the answer
    assert resp["usage"]["prompt_tokens_details"]["cached_tokens"] == num_back
    # P did not compute num_back tokens; D did not receive the blocks it kept of turn 1
    assert stats(lay.prefill)["num_hit_tokens"] - hits0[lay.prefill] == num_back
    d_kept = (len(turn1) + len(out1) - 1) // BS * BS
    assert stats(lay.decode)["num_hit_tokens"] - hits0[lay.decode] == d_kept
    # without caching and dcache (cluster W) the whole second turn is computed again
    whole = cluster["whole"]
    complete(whole.url, turn1, max_tokens=20)
    before = stats(whole.prefill)["num_prefill_computed_tokens"]
    complete(whole.url, turn2, max_tokens=4)
    assert stats(whole.prefill)["num_prefill_computed_tokens"] - before == len(turn2)


def test_transfer_skips_blocks_decode_already_holds(cluster):
    lay = cluster["layer"]
    info = http_json(f"{lay.prefill}/internal/v1/info")["layout"]
    block_nbytes = info["num_layers"] * info["piece_nbytes"]
    prompt = [(i * 13 + 1) % 250 for i in range(70)]  # 4 whole blocks + 6 tokens
    sent0 = stats(lay.prefill)["kv_bytes_sent"]
    complete(lay.url, prompt, max_tokens=8)
    settle_and_check(lay.instances)
    sent1 = stats(lay.prefill)["kv_bytes_sent"]
    assert sent1 - sent0 == 5 * block_nbytes  # D held nothing: every prompt block
    complete(lay.url, prompt, max_tokens=8)
    settle_and_check(lay.instances)
    sent2 = stats(lay.prefill)["kv_bytes_sent"]
    assert (
        sent2 - sent1 == 1 * block_nbytes
    )  # D keeps the 4 whole blocks: only the partial one moves
    # a prompt of whole blocks that D holds entirely: nothing crosses, the output is still right
    exact = [(i * 17 + 3) % 250 for i in range(64)]
    first = complete(lay.url, exact, max_tokens=8)["choices"][0]["token_ids"]
    settle_and_check(lay.instances)
    sent3 = stats(lay.prefill)["kv_bytes_sent"]
    again = complete(lay.url, exact, max_tokens=8)["choices"][0]["token_ids"]
    settle_and_check(lay.instances)
    assert stats(lay.prefill)["kv_bytes_sent"] == sent3 and again == first
    # without caching on D, the same prompt moves every block every time
    whole = cluster["whole"]
    w0 = stats(whole.prefill)["kv_bytes_sent"]
    complete(whole.url, prompt, max_tokens=8)
    complete(whole.url, prompt, max_tokens=8)
    assert stats(whole.prefill)["kv_bytes_sent"] - w0 == 2 * 5 * block_nbytes


def check_first_token_kv_kept_on_decode(lay: Cluster, colo_url: str) -> int:
    """max_tokens 1 ends a request with P's first token, so D never decodes; but P answered only once
    D held every byte of the prompt's KV. With caching D keeps it (release keep_kv): the same prompt
    again moves only its partial block, and the answer is still the colocated one. Returns a block's
    bytes (all layers)."""
    info = http_json(f"{lay.prefill}/internal/v1/info")["layout"]
    block_nbytes = info["num_layers"] * info["piece_nbytes"]
    prompt = [(i * 23 + 9) % 250 for i in range(70)]  # 4 whole blocks + 6 tokens
    ref = complete(colo_url, prompt, max_tokens=8)["choices"][0]["token_ids"]
    sent0 = stats(lay.prefill)["kv_bytes_sent"]
    first = complete(lay.url, prompt, max_tokens=1)["choices"][0]["token_ids"]
    settle_and_check(lay.instances)
    sent1 = stats(lay.prefill)["kv_bytes_sent"]
    assert first == ref[:1] and sent1 - sent0 == 5 * block_nbytes
    hits = stats(lay.decode)["num_hit_tokens"]
    assert complete(lay.url, prompt, max_tokens=8)["choices"][0]["token_ids"] == ref
    assert stats(lay.prefill)["kv_bytes_sent"] - sent1 == 1 * block_nbytes
    assert stats(lay.decode)["num_hit_tokens"] - hits == 64
    return block_nbytes


def test_request_ending_at_its_first_token_leaves_its_kv_on_decode(cluster):
    lay = cluster["layer"]
    block_nbytes = check_first_token_kv_kept_on_decode(lay, cluster["colo"])
    # a stop token as the first token ends it the same way
    stop_prompt = [(i * 29 + 4) % 250 for i in range(40)]
    stop_first = complete(cluster["colo"], stop_prompt, max_tokens=1)["choices"][0]["token_ids"]
    out = complete(lay.url, stop_prompt, max_tokens=8, stop_token_ids=stop_first)["choices"][0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == stop_first
    settle_and_check(lay.instances)
    sent2 = stats(lay.prefill)["kv_bytes_sent"]
    complete(lay.url, stop_prompt, max_tokens=2)
    assert stats(lay.prefill)["kv_bytes_sent"] - sent2 == 1 * block_nbytes  # 2 whole blocks stayed


def _stream_logprobs(url: str, path: str, body: dict) -> tuple[list[int], list]:
    """(token ids, the logprobs objects of the chunks that carry tokens) of a streamed request."""
    tokens, objs = [], []
    for event in sse_events(f"{url}{path}", {**body, "stream": True}):
        if event == "[DONE]" or not event.get("choices"):
            continue
        choice = event["choices"][0]
        tokens += choice["token_ids"]
        if choice["token_ids"]:
            objs.append(choice["logprobs"])
    return tokens, objs


def test_echo_with_logprobs_through_every_path_equal_the_colocated_instance(cluster):
    """echo + logprobs (what lm-eval's loglikelihood sends): the text starts with the prompt, the
    logprobs with the prompt's tokens (the first without a value), then the answer's; the same
    from every path, whole and streamed, with a prefix cached or not, for every choice of n = 2."""
    prompt = "The quick brown fox jumps over the lazy dog"
    body = {"prompt": prompt, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    body |= {"echo": True, "logprobs": 2}
    plain = http_json(f"{cluster['colo']}/v1/completions", {**body, "echo": False})
    ref = http_json(f"{cluster['colo']}/v1/completions", body)["choices"][0]
    num_prompt = plain["usage"]["prompt_tokens"]
    lp = ref["logprobs"]
    assert ref["text"] == prompt + plain["choices"][0]["text"]
    assert ref["token_ids"] == plain["choices"][0]["token_ids"]
    assert len(lp["tokens"]) == num_prompt + 3 and "".join(lp["tokens"][1:]).startswith(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert lp["token_logprobs"][num_prompt:] == pytest.approx(
        plain["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4
    )
    for url in (cluster["colo_sched"], cluster["layer"].url, cluster["whole"].url, cluster["colo"]):
        for _ in range(2):  # the second time, the prompt's prefix is cached where it ran
            got = http_json(f"{url}/v1/completions", {**body, "n": 2})
            for choice in got["choices"]:
                assert choice["text"].startswith(prompt), url
                assert choice["logprobs"]["tokens"][:num_prompt] == lp["tokens"][:num_prompt]
                assert choice["logprobs"]["token_logprobs"][1:num_prompt] == pytest.approx(
                    lp["token_logprobs"][1:num_prompt], abs=1e-4
                ), url
            assert got["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
                lp["token_logprobs"], abs=1e-4
            )
        tokens, objs = _stream_logprobs(url, "/v1/completions", body)
        assert tokens == ref["token_ids"], url
        assert [v for o in objs for v in o["text_offset"]] == lp["text_offset"], url
        streamed = [v for o in objs for v in o["token_logprobs"]]
        assert streamed[0] is None and streamed[1:] == pytest.approx(
            lp["token_logprobs"][1:], abs=1e-4
        ), url
    # max_tokens 0: the prompt alone, its logprobs, no completion tokens (whole and streamed)
    only = {**body, "max_tokens": 0, "ignore_eos": False}
    for url in (cluster["colo"], cluster["colo_sched"], cluster["layer"].url):
        got = http_json(f"{url}/v1/completions", only)
        choice = got["choices"][0]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == (
            prompt,
            [],
            "length",
        )
        assert got["usage"]["completion_tokens"] == 0, url
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(
            lp["token_logprobs"][:num_prompt], abs=1e-4
        )
        events = [e for e in sse_events(f"{url}/v1/completions", {**only, "stream": True})]
        texts = [e["choices"][0]["text"] for e in events[:-1] if e.get("choices")]
        assert "".join(texts) == prompt and events[-1] == "[DONE]", (url, events)
    # a long prompt with 20 top entries a token: megabytes of logprobs cross from the instance to
    # the scheduler in many lines (one would pass a reader's line limit)
    long_body = {**body, "prompt": (prompt + ". ") * 30, "logprobs": 20, "max_tokens": 1}
    ref = http_json(f"{cluster['colo']}/v1/completions", long_body)["choices"][0]["logprobs"]
    assert len(ref["tokens"]) > 1300
    for url in (cluster["colo_sched"], cluster["layer"].url):
        got = http_json(f"{url}/v1/completions", long_body)["choices"][0]["logprobs"]
        assert got["token_logprobs"][1:] == pytest.approx(ref["token_logprobs"][1:], abs=1e-4)


def test_logprobs_through_every_path_equal_the_colocated_instance(cluster):
    """Completions (logprobs n) and chat (logprobs + top_logprobs), whole and streamed: the same
    tokens and log-probabilities from the colocated instance, the scheduler in front of it, and P+D
    (P's first token's travel with it to D's stream)."""
    prompt = PROMPTS[3]
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    ref = http_json(f"{cluster['colo']}/v1/completions", body)["choices"][0]
    lp = ref["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ref["token_ids"]) == 6
    for top, value in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        # greedy: the token is the likeliest; byte tokens' texts may collide (U+FFFD): 1 to 3 keys
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(value)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(v <= 0 for v in lp["token_logprobs"])
    for url in (cluster["colo_sched"], cluster["layer"].url, cluster["whole"].url):
        got = http_json(f"{url}/v1/completions", body)["choices"][0]
        assert got["token_ids"] == ref["token_ids"], url
        assert got["logprobs"]["tokens"] == lp["tokens"], url
        assert got["logprobs"]["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)
        tokens, objs = _stream_logprobs(url, "/v1/completions", body)
        assert tokens == ref["token_ids"]
        streamed = [v for o in objs for v in o["token_logprobs"]]
        assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-4), url
        assert [v for o in objs for v in o["text_offset"]] == lp["text_offset"], url
    chat = {
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 5,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": True,
        "top_logprobs": 2,
    }
    ref = http_json(f"{cluster['colo']}/v1/chat/completions", chat)["choices"][0]
    content = ref["logprobs"]["content"]
    assert len(content) == 5 and all(len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    for url in (cluster["layer"].url, cluster["colo_sched"]):
        got = http_json(f"{url}/v1/chat/completions", chat)["choices"][0]["logprobs"]["content"]
        assert [c["token"] for c in got] == [c["token"] for c in content]
        assert [c["logprob"] for c in got] == pytest.approx(
            [c["logprob"] for c in content], abs=1e-4
        )
        tokens, objs = _stream_logprobs(url, "/v1/chat/completions", chat)
        assert [c["token"] for o in objs for c in o["content"]] == [c["token"] for c in content]
    # not asked: null; bad values: a 400 naming the field
    plain = http_json(f"{cluster['layer'].url}/v1/completions", {**body, "logprobs": None})
    assert plain["choices"][0]["logprobs"] is None
    for bad, field in (({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs")):
        status, msg = post_error(f"{cluster['layer'].url}/v1/completions", {**body, **bad})
        assert status == 400 and field in msg, msg
    status, msg = post_error(
        f"{cluster['layer'].url}/v1/chat/completions", {**chat, "logprobs": False}
    )
    assert status == 400 and "top_logprobs" in msg, msg


def test_client_disconnect_mid_stream_releases_both_sides(cluster):
    lay = cluster["layer"]
    body = {
        "prompt": list(range(10, 80)),
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    resp = open_stream(f"{lay.url}/v1/completions", body)
    got = 0
    for raw in resp:
        if raw.strip():
            got += 1
        if got >= 3:
            break
    resp.close()  # the client leaves mid-stream
    settle_and_check(lay.instances, timeout=15)


def test_bad_requests_get_400_naming_the_field(cluster):
    for url in (cluster["layer"].url, cluster["colo"]):
        with pytest.raises(urllib.error.HTTPError) as info:
            http_json(f"{url}/v1/completions", {"prompt": "x", "temperature": -3})
        assert info.value.code == 400
        assert "temperature" in json.loads(info.value.read())["error"]["message"]
    # a prefill-only instance refuses public requests with a pointer to the scheduler
    with pytest.raises(urllib.error.HTTPError) as info:
        http_json(f"{cluster['layer'].prefill}/v1/completions", {"prompt": "x"})
    assert (
        info.value.code == 400 and "scheduler" in json.loads(info.value.read())["error"]["message"]
    )
    # a prompt longer than the model's context: a 400 before any byte of a stream, everywhere; the
    # instance that refused it stays in the scheduler's rotation (a client's error is not a lost instance)
    urls = [cluster["layer"].url, cluster["whole"].url, cluster["colo"], cluster["colo_sched"]]
    for url in urls:
        for stream in (False, True):
            status, msg = post_error(
                f"{url}/v1/completions",
                {"prompt": [5] * 3000, "max_tokens": 4, "stream": stream},
            )
            assert status == 400 and "max_model_len" in msg, (url, stream, msg)
    for url in urls:
        assert complete(url, [5] * 20, max_tokens=2)["choices"][0]["finish_reason"] == "length"


STOP_BODIES = {
    "/v1/completions": {"prompt": "The quick brown fox"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello there"}]},
}


def assert_requests_ended(urls: list[str]) -> None:
    """Now, no request runs, waits, or holds a reservation or a pinned prefill on any of `urls`. A
    back-transfer (dcache) may still be under way, off the response path: settle_and_check waits for it."""
    keys = ("num_running", "num_waiting", "num_reservations", "num_pinned_prefills", "num_pinned")
    held = {(url, key): n for url in urls for key, n in stats(url).items() if key in keys and n}
    assert not held, held


def _choice_text(choice: dict) -> str:
    """The text of a reply's or a chunk's choice, completions or chat."""
    if "text" in choice:
        return choice["text"]
    return (choice.get("message") or choice.get("delta") or {}).get("content", "")


def _stop_case(
    url: str, path: str, min_start: int = 2, length: int = 3
) -> tuple[str, str, list[int]]:
    """(a stop string the model really generates, the text before it, the tokens up to the one that
    completes it), from a greedy run without stop strings: a stop test cannot pass without stopping.
    The stop string is the first `length` ASCII characters in a row (as many tokens of the byte-level
    tokenizer) from character `min_start` on."""
    body = {**STOP_BODIES[path], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    ref = http_json(f"{url}{path}", body)["choices"][0]
    text = _choice_text(ref)
    starts = [
        i
        for i in range(min_start, len(text) - length + 1)
        if all(ord(c) < 128 for c in text[i : i + length])
    ]
    assert starts, f"no {length} ASCII characters in a row in {text!r}"
    stop = text[starts[0] : starts[0] + length]
    tokenizer = Tokenizer.byte_level()
    ids = ref["token_ids"]
    num_tokens = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
    return stop, text[: text.index(stop)], ids[:num_tokens]


@pytest.mark.parametrize("path", list(STOP_BODIES))
@pytest.mark.parametrize("name", ["colo", "colo_sched", "layer", "whole"])
def test_stop_string_ends_the_text_and_the_request(cluster, name, path):
    """Colocated, through the scheduler to a colocated instance, disaggregated (both transfer modes):
    the text ends before the stop string, usage counts the tokens up to it, and the request is over
    in the engine before the reply ends (max_tokens would have run much longer)."""
    url = cluster[name] if isinstance(cluster[name], str) else cluster[name].url
    instances = [cluster["colo"]] if name.startswith("colo") else cluster[name].instances
    stop, want_text, want_ids = _stop_case(url, path)
    settle_and_check(instances)
    body = {**STOP_BODIES[path], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    generated_before = sum(stats(u)["num_generated_tokens"] for u in instances)

    out = http_json(f"{url}{path}", {**body, "stop": ["\u2603 never", stop]})
    choice = out["choices"][0]
    assert (_choice_text(choice), choice["finish_reason"]) == (want_text, "stop")
    assert choice["token_ids"] == want_ids
    assert out["usage"]["completion_tokens"] == len(want_ids)
    assert_requests_ended(instances)  # aborted and released before the reply went out
    settle_and_check(instances)  # and the back-transfer (cluster L's dcache) after it

    events = sse_events(
        f"{url}{path}",
        {**body, "stop": stop, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == len(want_ids)
    chunks = [e["choices"][0] for e in events[:-2]]
    assert "".join(_choice_text(c) for c in chunks) == want_text
    assert [t for c in chunks for t in c["token_ids"]] == want_ids
    assert [c["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert_requests_ended(instances)  # before [DONE]
    # ended at the stop, not at max_tokens: the two requests would have generated 2,000 tokens; how
    # many come after the stop before the abort lands depends on the machine's speed (340 seen)
    generated = sum(stats(u)["num_generated_tokens"] for u in instances) - generated_before
    assert generated < 1000, generated


@pytest.mark.parametrize("name", ["colo_sched", "layer", "whole"])
def test_stop_string_in_the_first_token_releases_everything(cluster, name):
    """The first token completes the stop string: disaggregated, it is P's, D never decodes, and
    both the pinned prefill and D's reservation are released before the reply."""
    url = cluster[name] if isinstance(cluster[name], str) else cluster[name].url
    instances = [cluster["colo"]] if name.startswith("colo") else cluster[name].instances
    stop, want_text, want_ids = _stop_case(url, "/v1/completions", min_start=0, length=1)
    assert len(want_ids) == 1, "the tiny model's first character here should be ASCII"
    body = {**STOP_BODIES["/v1/completions"], "max_tokens": 1000, "temperature": 0, "stop": stop}
    for stream in (False, True):
        if stream:
            events = sse_events(f"{url}/v1/completions", {**body, "stream": True})
            chunks = [e["choices"][0] for e in events[:-1]]
            assert events[-1] == "[DONE]" and len(chunks) == 1
            choice = chunks[0]
        else:
            choice = http_json(f"{url}/v1/completions", body)["choices"][0]
        assert (choice["text"], choice["token_ids"], choice["finish_reason"]) == (
            want_text,
            want_ids,
            "stop",
        )
        settle_and_check(instances, timeout=0)


def test_streamed_text_never_shows_the_start_of_a_stop_string(cluster):
    """A stop string the model begins but does not finish is held back, then released whole."""
    url = cluster["layer"].url
    stop, want_text, want_ids = _stop_case(url, "/v1/completions")
    body = {
        **STOP_BODIES["/v1/completions"],
        "max_tokens": len(want_ids) + 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    full = "".join(
        _choice_text(e["choices"][0]) for e in sse_events(f"{url}/v1/completions", body)[:-1]
    )
    near_miss = stop[:2] + "\u2603"  # the stop string's start, then something never generated
    events = sse_events(f"{url}/v1/completions", {**body, "stop": near_miss})
    texts = [_choice_text(e["choices"][0]) for e in events[:-1]]
    assert "".join(texts) == full and events[-2]["choices"][0]["finish_reason"] == "length"
    assert full.startswith(want_text + stop[:2])
    # one ASCII character per token: without the hold-back, chunks would end after stop[:1], stop[:2]
    num_chars_sent = set(itertools.accumulate(len(text) for text in texts))
    assert not num_chars_sent & {len(want_text) + 1, len(want_text) + 2}, texts


def _stop_after(
    url: str, prompts: list[list[int]], min_tokens: int, length: int = 3
) -> tuple[list[int], str, list[int]]:
    """(the first of `prompts` whose greedy answer on `url` has one, a stop string that this answer
    first completes at token `min_tokens` or later, the tokens up to the one that completes it). The
    stop string is `length` ASCII characters in a row; the random model often loops, so an answer may
    have none that shows up that late."""
    tokenizer = Tokenizer.byte_level()
    for prompt in prompts:
        ref = complete(url, prompt, max_tokens=min_tokens + 80)["choices"][0]
        text, ids = ref["text"], ref["token_ids"]
        for start in range(len(text) - length + 1):
            stop = text[start : start + length]
            if not all(ord(c) < 128 for c in stop):
                continue
            num_tokens = next(
                k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k])
            )
            if num_tokens >= min_tokens:
                return prompt, stop, ids[:num_tokens]
    raise AssertionError(f"no answer completes {length} ASCII characters after {min_tokens} tokens")


def _wait_for_kv_sent(url: str, since: int, timeout: float = 10.0) -> int:
    """Bytes `url` sent since its `kv_bytes_sent` was `since`, once it sent any (D sends only dcache)."""
    deadline = time.monotonic() + timeout
    while (sent := stats(url)["kv_bytes_sent"] - since) == 0:
        assert time.monotonic() < deadline, "no KV went back to the prefill instance"
        time.sleep(0.05)
    return sent


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_after_decode_still_sends_the_kv_back(cluster, stream):
    """A stop string ends the request on D (aborted: D's tree keeps the blocks it computed), and the
    back-transfer (dcache) still brings the answer's whole blocks to P: the next turn, the prompt plus
    the answer, finds them in P's cache."""
    lay = cluster["layer"]
    # prompts of 2 whole blocks + 8 tokens, others for each case (P's cache must not hold the answer)
    candidates = [[(i * 19 + a) % 250 for i in range(40)] for a in range(stream, 40, 2)]
    # the reference answer from the colocated instance (same weights): P's cache stays without it
    turn1, stop, want_ids = _stop_after(cluster["colo"], candidates, min_tokens=2 * BS + 4)
    info = http_json(f"{lay.prefill}/internal/v1/info")["layout"]
    block_nbytes = info["num_layers"] * info["piece_nbytes"]
    sent0 = stats(lay.decode)["kv_bytes_sent"]

    body = {"prompt": turn1, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    if stream:
        events = sse_events(f"{lay.url}/v1/completions", {**body, "stop": stop, "stream": True})
        chunks = [e["choices"][0] for e in events[:-1]]
        got_ids = [t for c in chunks for t in c["token_ids"]]
        finish_reason = chunks[-1]["finish_reason"]
    else:
        choice = http_json(f"{lay.url}/v1/completions", {**body, "stop": stop})["choices"][0]
        got_ids, finish_reason = choice["token_ids"], choice["finish_reason"]
    assert (got_ids, finish_reason) == (want_ids, "stop")
    assert_requests_ended(lay.instances)  # the back-transfer stays off the response path

    # D holds KV for every token it took in (the scheduler saw at least the ones up to the stop)
    num_tokens = len(turn1) + len(want_ids)
    num_prompt_cached = len(turn1) // BS * BS  # what P's own prefill left in its tree
    sent = _wait_for_kv_sent(lay.decode, sent0)
    assert sent % block_nbytes == 0
    assert sent // block_nbytes >= (num_tokens - 1) // BS - len(turn1) // BS >= 2
    settle_and_check(lay.instances)

    turn2 = turn1 + want_ids + [(i * 7 + 5) % 250 for i in range(10)]
    before = stats(lay.prefill)["num_prefill_computed_tokens"]
    usage = complete(lay.url, turn2, max_tokens=4)["usage"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert (num_tokens - 1) // BS * BS <= cached <= num_tokens // BS * BS
    assert cached >= num_prompt_cached + 2 * BS  # the answer's blocks, not only the prompt's
    assert stats(lay.prefill)["num_prefill_computed_tokens"] - before == len(turn2) - cached


def test_client_leaving_mid_answer_sends_no_kv_back(cluster):
    """The client leaves mid-stream: the request ends on both sides and nothing goes back to P, so
    the next turn finds only the prompt's blocks in P's cache."""
    lay = cluster["layer"]
    turn1 = [(i * 23 + 17) % 250 for i in range(40)]
    sent0 = stats(lay.decode)["kv_bytes_sent"]
    body = {"prompt": turn1, "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    got_ids: list[int] = []
    with open_stream(f"{lay.url}/v1/completions", {**body, "stream": True}) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: {"):
                got_ids += json.loads(line[len("data: ") :])["choices"][0]["token_ids"]
            if len(got_ids) >= 2 * BS + 4:
                break  # the client leaves mid-answer
    settle_and_check(lay.instances, timeout=15)
    time.sleep(0.5)  # a back-transfer, had one started, would have sent by now
    settle_and_check(lay.instances)
    assert stats(lay.decode)["kv_bytes_sent"] == sent0
    turn2 = turn1 + got_ids + [(i * 7 + 5) % 250 for i in range(10)]
    usage = complete(lay.url, turn2, max_tokens=4)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == len(turn1) // BS * BS


def test_bad_stop_strings_get_400_naming_the_field(cluster):
    for url in (cluster["layer"].url, cluster["colo"], cluster["colo_sched"]):
        for path, body in STOP_BODIES.items():
            for bad in (["a", "b", "c", "d", "e"], "", [""], [3]):
                status, message = post_error(f"{url}{path}", {**body, "stop": bad})
                assert status == 400 and message.startswith("'stop' must be"), message
                assert f"got {json.dumps(bad)}" in message, message
                assert "a list of at most 4 non-empty strings" in message, message


def test_models_health_and_metrics_parse(cluster):
    lay = cluster["layer"]
    complete(lay.url, "warm up", max_tokens=3)
    assert http_json(f"{lay.url}/v1/models")["data"][0]["id"] == "tiny"
    assert http_json(f"{lay.prefill}/health")["status"] == "ok"
    for url, must in (
        (lay.url, "pdserve_time_to_first_token_seconds"),
        (lay.prefill, "pdserve_kv_transfer_bytes"),
        (lay.decode, "pdserve_kv_blocks"),
        (cluster["colo"], "pdserve_num_requests_running"),
    ):
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert must in families, (url, sorted(families))
        if url == lay.prefill:  # every prefill observed how long its KV send outlasted it
            count = next(
                s.value
                for s in families["pdserve_kv_send_wait_seconds"].samples
                if s.name.endswith("_count")
            )
            assert count >= 1
