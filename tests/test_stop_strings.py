"""Stop strings on plain Python: the matcher's hold-back and cut, and one choice's text token by token.

The servers apply them in one place (detokenize.ChoiceText, used by instances and the scheduler);
tests/test_cluster_disagg.py checks them end to end on every serving path.
"""

from __future__ import annotations

import random

import pytest
from pdserve.server.detokenize import ChoiceText, StopStringMatcher


def feed(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.add(p) for p in pieces]


def test_holds_back_a_possible_start_across_pieces():
    m = StopStringMatcher(["abc"])
    assert feed(m, ["xa", "b"]) == ["x", ""]  # "ab" may become "abc"
    assert m.add("d") == "abd"  # it did not: released
    assert feed(m, ["a", "b", "c", "z"]) == ["", "", "", ""]
    assert m.stopped and m.flush() == ""


def test_stop_string_split_over_many_pieces():
    m = StopStringMatcher(["STOP"])
    assert feed(m, list("xySTO")) == ["x", "y", "", "", ""]
    assert not m.stopped
    assert m.add("P") == "" and m.stopped


def test_text_after_the_stop_string_is_dropped():
    m = StopStringMatcher(["\n\n"])
    assert m.add("one\ntwo\n\nthree") == "one\ntwo" and m.stopped
    assert m.add("more") == "" and m.flush() == ""


def test_several_stop_strings_the_first_completed_wins():
    m = StopStringMatcher(["\n\n", "END", "x"])
    assert feed(m, ["hello E", "N"]) == ["hello ", ""]
    assert m.add("xD") == "EN" and m.stopped  # "x" completes before "END" could
    m = StopStringMatcher(["bc", "abcd"])
    assert m.add("abcd") == "a"  # "bc" ends first, as if read one character at a time
    m = StopStringMatcher(["bc", "abc"])
    assert m.add("abc") == ""  # both end together: cut before the longer
    m = StopStringMatcher(["aab"])
    assert feed(m, ["a", "a", "a", "b"]) == ["", "", "a", ""] and m.stopped


def test_no_stop_hit_releases_everything():
    m = StopStringMatcher(["xyz", "!!"])
    out = feed(m, ["abc x", "y", " done!"])
    assert out == ["abc ", "", "xy done"]
    assert not m.stopped and m.flush() == "!"


def test_empty_stop_strings_refused():
    for stop in ([], [""], ["a", ""]):
        with pytest.raises(ValueError, match="non-empty"):
            StopStringMatcher(stop)


def reference_cut(text: str, stop: list[str]) -> str | None:
    """The text before the first stop string completed, reading one character at a time."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stop if text[:end].endswith(s)]
        if hits:
            return text[: end - max(len(s) for s in hits)]
    return None


def longest_start(text: str, stop: list[str]) -> str:
    """The longest suffix of `text` that some stop string begins with ("" if none)."""
    starts = [text[i:] for i in range(len(text)) if any(s.startswith(text[i:]) for s in stop)]
    return max(starts, key=len, default="")


def test_matches_a_character_by_character_reference():
    rng = random.Random(0)
    for _ in range(2000):
        stop = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 12)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 4))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        m = StopStringMatcher(stop)
        released = seen = ""
        for piece in pieces:
            released += m.add(piece)
            seen += piece
            assert reference_cut(released, stop) is None  # no stop string ever goes out
            if not m.stopped:  # held back: exactly the longest possible start of one
                assert released + longest_start(seen, stop) == seen, (stop, pieces)
        want = reference_cut(text, stop)
        if want is None:
            assert not m.stopped and released + m.flush() == text
        else:
            assert m.stopped and released == want, (stop, text, pieces)


def byte_decode(token_ids: list[int]) -> str:
    return bytes(token_ids).decode("utf-8", errors="replace")


def test_choice_text_keeps_tokens_up_to_the_one_that_completes_the_stop():
    ids = list("a€b STOP c".encode())
    choice = ChoiceText(byte_decode, ["STOP"])
    got = [choice.add(ids[i : i + 3], final=False) for i in range(0, len(ids), 3)]
    stop_end = ids.index(ord("P")) + 1
    assert choice.stopped and choice.token_ids == ids[:stop_end]
    assert "".join(text for _, text in got) == choice.text == "a€b "
    assert [t for kept, _ in got for t in kept] == ids[:stop_end]
    assert choice.add([ord("x")], final=True) == ([], "")  # after the stop: nothing


def test_choice_text_looks_for_stop_strings_only_after_min_tokens():
    ids = list(b"ab STOP cd STOP ef")
    # the first STOP lies in the first 7 tokens ("ab STOP"): kept; the second one ends the text
    choice = ChoiceText(byte_decode, ["STOP"], min_tokens=7)
    got = [choice.add(ids[i : i + 4], final=False) for i in range(0, len(ids), 4)]
    assert choice.stopped and "".join(text for _, text in got) == choice.text == "ab STOP cd "
    assert choice.token_ids == ids[: ids.index(ord("P"), 8) + 1]
    # a stop string that starts inside the first min_tokens tokens does not count
    choice = ChoiceText(byte_decode, ["STOP"], min_tokens=4)
    parts = [choice.add([t], final=False)[1] for t in ids[:7]]
    assert not choice.stopped and "".join(parts) == "ab STOP"


def test_choice_text_without_a_hit_gives_the_whole_text():
    ids = list("tail €".encode())
    choice = ChoiceText(byte_decode, ["€!"])
    parts = [choice.add([t], final=False)[1] for t in ids[:-1]]
    parts.append(choice.add(ids[-1:], final=True)[1])
    assert "".join(parts) == choice.text == "tail €" and not choice.stopped
    assert parts[-1] == "€"  # held: a split character, then a possible "€!"
    assert choice.token_ids == ids


def test_choice_text_whole_reply_without_stop_decodes_once():
    calls = []

    def decode(token_ids):
        calls.append(len(token_ids))
        return byte_decode(token_ids)

    choice = ChoiceText(decode, [], incremental=False)
    for t in b"hello":
        assert choice.add([t], final=False) == ([t], "")
    assert choice.text == "hello" and calls == [5]
