"""Text out of generated tokens: incremental detokenization (never a split character), stop strings (never
a partial one shown), and one choice's text combining the two. Plain Python, used by whoever renders the
text (the colocated instance or the scheduler)."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas without splitting a multi-byte character."""

    def __init__(self, decode):
        self._decode = decode  # decode(list[int]) -> str
        self._token_ids: list[int] = []
        self._num_emitted_chars = 0

    def add(self, new_token_ids: list[int], final: bool = False) -> str:
        self._token_ids.extend(new_token_ids)
        text = self._decode(self._token_ids)
        if not final and text.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        delta = text[self._num_emitted_chars :]
        self._num_emitted_chars = len(text)
        return delta


class StopStringMatcher:
    """Cuts a growing text at the first stop string, holding back what may yet become one.

    `add(text)` returns the text that can go out now: everything but the longest suffix that is a
    prefix of some stop string (that suffix is held until it can no longer match). Once a stop string
    is complete, `stopped` is set, `add` returns the text before it, and the stop string and all that
    follows are dropped. `flush()` gives the held text back at the end of a stream that did not stop.
    """

    def __init__(self, stop: list[str]):
        if not stop or not all(stop):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        self.stop = list(stop)
        self.stopped = False
        self._max_len = max(len(s) for s in self.stop)
        # NOTE: a stop string can only start in `_pending`: released text had no suffix that
        # begins one, so searching `_pending` alone finds every occurrence.
        self._pending = ""

    def add(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self._pending + text
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self._pending = ""
            return pending[:cut]
        num_held = self._num_held_chars(pending)
        self._pending = pending[len(pending) - num_held :]
        return pending[: len(pending) - num_held]

    def flush(self) -> str:
        held, self._pending = self._pending, ""
        return held

    def _first_stop(self, text: str) -> int | None:
        """Where the text ends: the start of the stop string completed first (as if read one character
        at a time; of two completed at once, the longer), or None."""
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop:
            start = text.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best):
                best = (start + len(s), start)
        return None if best is None else best[1]

    def _num_held_chars(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for n in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


class ChoiceText:
    """One choice's text as its tokens arrive: incremental detokenization, then the stop strings.

    With stop strings the tokens are detokenized one at a time, so the token that completes a stop
    string is known: it is the last one kept (usage counts up to it) and later ones are dropped.
    Not `incremental` (a whole reply without stop strings), the text is decoded once, at the end.
    The first `min_tokens` tokens' text goes out unsearched: a stop string counts only where it
    starts in the text of a later token (vLLM's min_tokens, which holds back stop strings too).
    """

    def __init__(self, decode, stop: list[str], incremental: bool = True, min_tokens: int = 0):
        self._decode = decode  # decode(list[int]) -> str
        self._detok = IncrementalDetokenizer(decode)
        self._stop = StopStringMatcher(stop) if stop else None
        self._incremental = incremental or self._stop is not None
        self._parts: list[str] = []  # the text handed out so far
        self.token_ids: list[int] = []  # the tokens kept: all received, or up to the stop string
        self._min_tokens = min_tokens

    @property
    def stopped(self) -> bool:
        return self._stop is not None and self._stop.stopped

    @property
    def text(self) -> str:
        """All of the text so far (after the last `add`, the whole reply)."""
        return "".join(self._parts) if self._incremental else self._decode(self.token_ids)

    def add(self, new_token_ids: list[int], final: bool) -> tuple[list[int], str]:
        """(the tokens of `new_token_ids` kept, the text that may go out now); `final`: no more follow."""
        if self.stopped:
            return [], ""
        if not self._incremental:
            self.token_ids.extend(new_token_ids)
            return list(new_token_ids), ""
        if self._stop is None:
            kept, text = list(new_token_ids), self._detok.add(new_token_ids, final)
        else:
            kept, text = self._add_until_stop(new_token_ids, final)
        self.token_ids.extend(kept)
        self._parts.append(text)
        return kept, text

    def _add_until_stop(self, new_token_ids: list[int], final: bool) -> tuple[list[int], str]:
        kept: list[int] = []
        parts: list[str] = []
        for token_id in new_token_ids:
            kept.append(token_id)
            text = self._detok.add([token_id])
            if len(self.token_ids) + len(kept) <= self._min_tokens:
                parts.append(text)  # nothing is searched yet, so the matcher holds nothing
                continue
            parts.append(self._stop.add(text))
            if self._stop.stopped:
                return kept, "".join(parts)
        if final:  # the detokenizer's held bytes, then the text held for the stop strings
            parts.append(self._stop.add(self._detok.add([], final=True)))
            if not self._stop.stopped:
                parts.append(self._stop.flush())
        return kept, "".join(parts)
