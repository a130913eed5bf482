"""OpenAI request validation: good bodies parse, bad ones give 400 messages naming the field."""

from __future__ import annotations

import json

import pytest
from pdserve.server.choices import TokenDelta
from pdserve.server.detokenize import IncrementalDetokenizer
from pdserve.server.openai_json import choice_json, response_json, usage_json
from pdserve.server.openai_render import LogprobsRenderer, kept_logprobs
from pdserve.server.protocol import (
    ProtocolError,
    SamplingSpec,
    parse_chat,
    parse_completion,
)


def test_completion_defaults_and_token_prompt():
    req = parse_completion({"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0})
    assert req.prompt_token_ids == [1, 2, 3] and req.prompt is None
    assert req.sampling.max_tokens == 4 and req.sampling.temperature == 0.0
    assert not req.stream
    req = parse_completion(
        {"prompt": ["hello"], "stream": True, "stream_options": {"include_usage": True}}
    )
    assert req.prompt == "hello" and req.stream and req.include_usage
    req = parse_completion({"prompt": "x", "presence_penalty": -0.5, "frequency_penalty": 2})
    spec = SamplingSpec.from_dict(req.sampling.to_dict())  # as it travels to the instances
    assert spec.presence_penalty == -0.5 and spec.frequency_penalty == 2.0


def test_a_batch_of_prompts_is_one_request_per_prompt():
    req = parse_completion({"prompt": ["ab", [7, 8], "c"], "n": 2, "seed": 4, "max_tokens": 3})
    assert req.prompt is None and req.prompt_token_ids is None
    parts = req.each_prompt()
    assert [(p.prompt, p.prompt_token_ids, p.prompt_batch) for p in parts] == [
        ("ab", None, None),
        (None, [7, 8], None),
        ("c", None, None),
    ]
    assert all(p.n == 2 and p.sampling == req.sampling for p in parts)
    one = parse_completion({"prompt": [[5, 6]]})  # a batch of one is one prompt
    assert one.prompt_token_ids == [5, 6] and one.each_prompt() == [one]
    assert len(parse_completion({"prompt": ["a"] * 128, "n": 2}).each_prompt()) == 128


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_k": 0}, "top_k"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 65}, "n"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
        ({"prompt": [[1], [2, -1]]}, "prompt[1]"),
        ({"prompt": [[1], [[2]]]}, "prompt[1]"),
        ({"prompt": [[]]}, "prompt[0]"),
        ({"prompt": ["a"] * 257}, "257 prompts"),
        ({"prompt": ["a"] * 5, "n": 64}, "320 choices"),
        ({"prompt": "x", "stop": ""}, "stop"),
        ({"prompt": "x", "stop": 7}, "stop"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({"prompt": "x", "logprobs": True}, "logprobs"),
        ({"prompt": "x", "frequency_penalty": "1"}, "frequency_penalty"),
    ],
)
def test_completion_errors_name_the_field(body, field):
    with pytest.raises(ProtocolError) as info:
        parse_completion(body)
    assert field in str(info.value)
    assert info.value.status == 400
    assert info.value.to_json()["error"]["type"] == "invalid_request_error"


def test_stop_strings_parsed():
    assert parse_completion({"prompt": "x"}).stop == []
    assert parse_completion({"prompt": "x", "stop": "\n"}).stop == ["\n"]
    assert parse_completion({"prompt": "x", "stop": []}).stop == []
    req = parse_chat(
        {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "bc", "d", "e"]}
    )
    assert req.stop == ["a", "bc", "d", "e"]
    assert "stop" not in req.sampling.to_dict()  # the renderer applies them, not the engine


@pytest.mark.parametrize(
    "stop, seen",
    [
        ("", '""'),
        ([""], '[""]'),
        (["a", "b", "c", "d", "e"], '["a", "b", "c", "d", "e"]'),
        (["x", 3], '["x", 3]'),
        ([None], "[null]"),
        (7, "7"),
        ({"s": 1}, '{"s": 1}'),
    ],
)
def test_bad_stop_strings_say_what_is_accepted(stop, seen):
    for parse, body in (
        (parse_completion, {"prompt": "x"}),
        (parse_chat, {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        with pytest.raises(ProtocolError) as info:
            parse({**body, "stop": stop})
        message = str(info.value)
        assert info.value.status == 400 and info.value.param == "stop"
        assert message.startswith("'stop' must be") and f"got {seen}" in message
        assert "a list of at most 4 non-empty strings" in message


def test_chat_messages_checked():
    req = parse_chat({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3})
    assert req.messages == [{"role": "user", "content": "hi"}] and req.sampling.max_tokens == 3
    for bad in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}], ["hi"]):
        with pytest.raises(ProtocolError, match="messages"):
            parse_chat({"messages": bad})
    with pytest.raises(ProtocolError, match="JSON object"):
        parse_chat([1, 2])


def test_response_shapes():
    usage = usage_json(10, 3, 8)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 8 and usage["total_tokens"] == 13
    choices = [choice_json("chat", 0, "abc", [1, 2, 3], "length")]
    chat = response_json("chat", "id1", "m", choices, usage)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "abc"
    choices = [choice_json("completion", i, t, [i], "stop") for i, t in enumerate(["ab", "c"])]
    comp = response_json("completion", "id2", "m", choices, usage)
    assert comp["object"] == "text_completion" and [c["text"] for c in comp["choices"]] == [
        "ab",
        "c",
    ]
    assert [c["index"] for c in comp["choices"]] == [0, 1]


def test_logit_bias_parses_token_ids_and_bounds():
    req = parse_completion({"prompt": "x", "logit_bias": {"5": 100, "17": -2.5}})
    assert req.sampling.logit_bias == {5: 100.0, 17: -2.5}
    assert parse_completion({"prompt": "x", "logit_bias": {}}).sampling.logit_bias is None
    bad = [
        {"x": 1},
        {"-1": 1},
        {"\u00b2": 1},  # a digit to str.isdigit, not to int()
        {"9" * 5000: 1},
        {"5": 100.5},
        {"5": True},
        {"5": "1"},
        {str(i): 1 for i in range(1025)},
    ]
    for logit_bias in bad:
        with pytest.raises(ProtocolError) as info:
            parse_completion({"prompt": "x", "logit_bias": logit_bias})
        assert info.value.param == "logit_bias" and len(str(info.value)) < 200
    # the internal JSON form (string keys) comes back as ints; values are SamplingParams' to check
    spec = SamplingSpec.from_dict({"logit_bias": {"5": 2.0}})
    assert spec.logit_bias == {5: 2.0}


def test_allowed_token_ids_parse_sorted_and_bounded():
    req = parse_chat(
        {"messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [9, 3, 9]}
    )
    assert req.sampling.allowed_token_ids == [3, 9]
    assert parse_completion({"prompt": "x"}).sampling.allowed_token_ids is None
    for bad in (
        [],
        [1, -2],
        [1.5],
        [True],
        [None],
        "12",
        {"1": 1},
        [1 << 64],  # past int64: a 400, not an overflow deep inside
        list(range((1 << 17) + 1)),
    ):
        with pytest.raises(ProtocolError) as info:
            parse_completion({"prompt": "x", "allowed_token_ids": bad})
        assert info.value.param == "allowed_token_ids" and len(str(info.value)) < 200
    # the spec crosses to the instances as JSON and comes back the same
    spec = SamplingSpec.from_dict(json.loads(json.dumps(req.sampling.to_dict())))
    assert spec.allowed_token_ids == [3, 9]


def test_min_tokens_parse_and_bounds():
    assert (
        parse_completion({"prompt": "x", "min_tokens": 5, "max_tokens": 5}).sampling.min_tokens == 5
    )
    assert parse_completion({"prompt": "x"}).sampling.min_tokens == 0
    for body in ({"min_tokens": 17}, {"min_tokens": -1}, {"min_tokens": 1.5}, {"min_tokens": True}):
        with pytest.raises(ProtocolError) as info:
            parse_completion({"prompt": "x", **body})
        assert info.value.param == "min_tokens", body
    with pytest.raises(ProtocolError, match="must not exceed max_tokens"):
        parse_chat(
            {
                "messages": [{"role": "user", "content": "x"}],
                "min_tokens": 9,
                "max_completion_tokens": 8,
            }
        )


def test_choice_sampling_offsets_the_seed():
    req = parse_completion({"prompt": "x", "n": 3, "seed": 7, "temperature": 0.8})
    assert req.n == 3
    assert [req.choice_sampling(i).seed for i in range(3)] == [7, 8, 9]
    assert req.choice_sampling(2).temperature == 0.8
    unseeded = parse_completion({"prompt": "x", "n": 2})
    assert unseeded.choice_sampling(1).seed is None


def test_incremental_detokenizer_holds_split_characters():
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(decode)
    euro = list("€".encode())
    assert detok.add([ord("a")]) == "a"
    assert detok.add(euro[:1]) == ""
    assert detok.add(euro[1:]) == "€"
    assert detok.add([], final=True) == ""


def test_logprobs_fields_parse():
    assert parse_completion({"prompt": "x", "logprobs": 0}).sampling.logprobs == 0
    assert parse_completion({"prompt": "x"}).sampling.logprobs is None
    messages = [{"role": "user", "content": "hi"}]
    assert parse_chat({"messages": messages, "logprobs": True}).sampling.logprobs == 0
    chat = parse_chat({"messages": messages, "logprobs": True, "top_logprobs": 4})
    assert chat.sampling.logprobs == 4
    with pytest.raises(ProtocolError, match="top_logprobs"):
        parse_chat({"messages": messages, "top_logprobs": 4})


def test_echo_asks_choice_0_for_the_prompt_logprobs():
    req = parse_completion({"prompt": "x", "echo": True, "logprobs": 2, "n": 3, "seed": 5})
    assert req.echo and req.sampling.prompt_logprobs == 2 and req.sampling.logprobs == 2
    assert [req.choice_sampling(i).prompt_logprobs for i in range(3)] == [2, None, None]
    assert [req.choice_sampling(i).seed for i in range(3)] == [5, 6, 7]
    plain = parse_completion({"prompt": "x", "echo": True})
    assert plain.echo and plain.sampling.prompt_logprobs is None and not plain.echo_only
    # max_tokens 0: the prompt alone (one token is sampled and left out); only with echo
    only = parse_completion({"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": 1})
    assert only.echo_only and only.sampling.max_tokens == 1 and only.sampling.prompt_logprobs == 1
    for body in ({"prompt": "x", "max_tokens": 0}, {"prompt": "x", "max_tokens": -1}):
        with pytest.raises(ProtocolError) as info:
            parse_completion(body)
        assert info.value.param == "max_tokens"
    with pytest.raises(ProtocolError, match="max_tokens"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})
    assert parse_completion({"prompt": "x", "logprobs": 2}).sampling.prompt_logprobs is None
    # an echoed prompt's first token has no log-probability
    r = LogprobsRenderer("completion", lambda ids: "".join(chr(97 + i) for i in ids))
    assert r.render([0, 1], [None, {"logprob": -1.0, "top": [[1, -1.0]]}]) == {
        "tokens": ["a", "b"],
        "token_logprobs": [None, -1.0],
        "top_logprobs": [None, {"b": -1.0}],
        "text_offset": [0, 1],
    }


def test_logprobs_objects_and_a_stop_strings_cut():
    def decode(ids):
        return "".join(chr(97 + i) for i in ids)  # token i reads as one letter

    entries = [
        {"logprob": -0.1 * (i + 1), "top": [[i, -0.1 * (i + 1)], [9, -3.0]]} for i in range(4)
    ]
    r = LogprobsRenderer("completion", decode)
    assert r.render([0, 1], entries[:2]) == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"a": -0.1, "j": -3.0}, {"b": -0.2, "j": -3.0}],
        "text_offset": [0, 1],
    }
    assert r.render([2], entries[2:3])["text_offset"] == [2]  # a stream's next chunk goes on
    assert LogprobsRenderer("chat", decode).render([1], entries[1:2]) == {
        "content": [
            {
                "token": "b",
                "logprob": -0.2,
                "bytes": [98],
                "top_logprobs": [
                    {"token": "b", "logprob": -0.2, "bytes": [98]},
                    {"token": "j", "logprob": -3.0, "bytes": [106]},
                ],
            }
        ]
    }
    # a stop string keeps a prefix of a delta's tokens: their entries only
    assert kept_logprobs(TokenDelta([0, 1, 2], None, None, entries[:3]), [0, 1]) == entries[:2]
    with pytest.raises(RuntimeError, match="carried 0"):
        kept_logprobs(TokenDelta([0]), [0])
    # texts that collide in a completions top_logprobs dict keep the likeliest's value
    top = [{"logprob": -1.0, "top": [[0, -1.0], [1, -2.0]]}]
    assert LogprobsRenderer("completion", lambda ids: "?").render([0], top)["top_logprobs"] == [
        {"?": -1.0}
    ]
