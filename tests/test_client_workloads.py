"""Workloads: the lenient ShareGPT parse (packaged and synthetic truncated files), prompt and
history construction, seeded sampling, and config errors that name the flag."""

from __future__ import annotations

import argparse
import json

import pytest
from pdserve.client import bench
from pdserve.client.results import BenchConfig
from pdserve.client.runner import build_workload, request_body
from pdserve.client.sharegpt import load_sharegpt, pair_turns, parse_sharegpt_text
from pdserve.client.workloads import chat_messages, completion_prompt


def test_packaged_sharegpt_parses_up_to_the_truncation() -> None:
    conversations = load_sharegpt()
    assert 17_000 <= len(conversations) <= 18_500
    assert 12_000 <= sum(c.num_messages >= 4 for c in conversations) <= 14_000
    assert sum(len(c.turns) >= 2 for c in conversations) > 10_000


def _conversation(i: int, n_pairs: int) -> dict:
    messages = []
    for k in range(n_pairs):
        messages += [{"from": "human", "value": f"q{i}.{k}"}, {"from": "gpt", "value": f"a{i}.{k}"}]
    return {"id": f"c{i}", "conversations": messages}


def test_synthetic_truncated_file(tmp_path) -> None:
    whole = json.dumps([_conversation(i, i + 1) for i in range(4)], indent=2)
    cut = whole[: whole.index('"q3.2"') + 3]  # inside the last conversation
    conversations = parse_sharegpt_text(cut)
    assert [c.conversation_id for c in conversations] == ["c0", "c1", "c2"]
    assert conversations[2].turns == (("q2.0", "a2.0"), ("q2.1", "a2.1"), ("q2.2", "a2.2"))
    assert len(parse_sharegpt_text(whole)) == 4
    path = tmp_path / "cut.json"
    path.write_text(cut)
    assert len(load_sharegpt(str(path))) == 3
    with pytest.raises(ValueError, match="expected a JSON array"):
        parse_sharegpt_text('{"id": 1}')


def test_pairing_skips_leading_assistant_and_stops_at_a_break() -> None:
    messages = [
        {"from": "gpt", "value": "hello"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "human", "value": "q3"},
        {"from": "gpt", "value": "a3"},
    ]
    assert pair_turns(messages) == (("q1", "a1"),)


def test_history_prompts_grow_by_prefix() -> None:
    history = [("hi", " hello"), ("more", " sure")]
    p1 = completion_prompt([], "hi")
    p2 = completion_prompt(history[:1], "more")
    p3 = completion_prompt(history, "end")
    assert p1 == "User: hi\nAssistant:"
    assert p2 == p1 + " hello\nUser: more\nAssistant:"
    assert p3.startswith(p2 + " sure\n") and p3.endswith("User: end\nAssistant:")
    assert chat_messages(history, "end") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": " hello"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": " sure"},
        {"role": "user", "content": "end"},
    ]


def test_random_token_id_prompts_are_exact_and_seeded() -> None:
    config = BenchConfig(input_len=17, output_len=5, num_requests=4, seed=3)
    conversations = build_workload(config)
    body = request_body(config, "m", conversations[0].turns[0], [])
    assert len(body["prompt"]) == 17 and all(16 <= t < 256 for t in body["prompt"])
    assert body["max_tokens"] == 5 and body["ignore_eos"] and body["stream"]
    assert [c.turns for c in build_workload(config)] == [c.turns for c in conversations]
    other = build_workload(BenchConfig(input_len=17, num_requests=4, seed=4))
    assert [c.turns for c in other] != [c.turns for c in conversations]
    text = request_body(
        BenchConfig(prompt_format="text"),
        "m",
        build_workload(BenchConfig(prompt_format="text", input_len=10))[0].turns[0],
        [],
    )
    assert isinstance(text["prompt"], str) and len(text["prompt"]) == 40


def test_sharegpt_workload_caps_turns_chars_and_output(tmp_path) -> None:
    path = tmp_path / "d.json"
    data = [_conversation(i, 5) for i in range(10)]
    data[0]["conversations"][0]["value"] = "x" * 500
    path.write_text(json.dumps(data))
    config = BenchConfig(
        dataset="sharegpt",
        sharegpt_path=str(path),
        multi_turn=True,
        max_turns=3,
        num_requests=10,
        max_input_chars=100,
        output_len=1,
    )
    conversations = build_workload(config)
    assert len(conversations) == 10 and all(len(c.turns) == 3 for c in conversations)
    assert max(len(t.user_text) for c in conversations for t in c.turns) == 100
    assert all(t.max_tokens == 1 for c in conversations for t in c.turns)
    single = build_workload(
        BenchConfig(dataset="sharegpt", sharegpt_path=str(path), num_requests=4)
    )
    assert all(len(c.turns) == 1 for c in single)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pdserve bench")
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--endpoint", "grpc"], ["--endpoint", "'completions'", "'chat'"]),
        (["--dataset", "alpaca"], ["--dataset", "'random'", "'sharegpt'"]),
        (["--request-rate", "-1"], ["--request-rate", "> 0 or 'inf'"]),
        (["--num-requests", "0"], ["--num-requests", ">= 1"]),
        (["--input-len", "abc"], ["--input-len", "integer"]),
    ],
)
def test_bad_flags_name_the_flag_and_the_allowed_values(argv, expected, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _parse(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_inconsistent_flags_are_refused_before_sending(capsys) -> None:
    args = _parse(["--prompt-format", "ids", "--endpoint", "chat"])
    assert bench.run(args) == 2
    err = capsys.readouterr().err
    assert "--prompt-format ids" in err and "--endpoint chat" in err
    args = _parse(["--token-id-range", "10", "5"])
    assert bench.run(args) == 2 and "--token-id-range" in capsys.readouterr().err
    assert _parse(["--request-rate", "inf"]).request_rate == float("inf")


def test_extra_body_joins_every_request_but_never_replaces_a_client_field(capsys) -> None:
    args = _parse(["--extra-body", '{"logit_bias": {"7": -100}, "top_p": 0.5}', "--multi-turn"])
    config = bench.config_from_args(args)
    config.validate()
    turn = build_workload(config)[0].turns[1]
    body = request_body(config, "m", turn, [("hi", " there")])
    assert body["logit_bias"] == {"7": -100} and body["top_p"] == 0.5
    assert body["prompt"].startswith("User: hi\nAssistant: there\n") and body["model"] == "m"
    for text, expected in (("[1, 2]", "expected a JSON object, got list"), ("{bad", "JSON object")):
        with pytest.raises(SystemExit):
            _parse(["--extra-body", text])
        assert "--extra-body" in (err := capsys.readouterr().err) and expected in err
    args = _parse(["--extra-body", '{"temperature": 1.0}'])
    assert bench.run(args) == 2
    err = capsys.readouterr().err
    assert "--extra-body may not set 'temperature'" in err and "--temperature" in err
    for key in ("n", "max_completion_tokens"):
        assert bench.run(_parse(["--extra-body", json.dumps({key: 2})])) == 2
        assert f"--extra-body may not set {key!r}" in capsys.readouterr().err
