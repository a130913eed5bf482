"""OpenAI request validation: good bodies parse, bad ones give 400 messages naming the field."""

from __future__ import annotations

import pytest
from pdserve.server.protocol import (
    IncrementalDetokenizer,
    ProtocolError,
    parse_chat,
    parse_completion,
    response_json,
    usage_json,
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
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "bogus": 1}, "bogus"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "x", "stop": ["\n"]}, "stop"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ],
)
def test_completion_errors_name_the_field(body, field):
    with pytest.raises(ProtocolError) as info:
        parse_completion(body)
    assert field in str(info.value)
    assert info.value.status == 400
    assert info.value.to_json()["error"]["type"] == "invalid_request_error"


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
    chat = response_json("chat", "id1", "m", "abc", [1, 2, 3], "length", usage)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "abc"
    comp = response_json("completion", "id2", "m", "abc", [1], "stop", usage)
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"] == "abc"


def test_incremental_detokenizer_holds_split_characters():
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    detok = IncrementalDetokenizer(decode)
    euro = list("€".encode())
    assert detok.add([ord("a")]) == "a"
    assert detok.add(euro[:1]) == ""
    assert detok.add(euro[1:]) == "€"
    assert detok.add([], final=True) == ""
