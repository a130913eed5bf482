"""Workloads for the load client: what each request says, and when each conversation arrives.

Every workload is a list of conversations; a single-turn request is a conversation of one turn, so
the runner has one code path. Arrivals are Poisson (exponential gaps) from a seeded generator.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

# Short, common English words: with a BPE tokenizer most are one token each, so a prompt of
# N words plus spaces is roughly N..1.5N tokens; with a byte-level tokenizer it is its length in bytes.
_WORDS = (
    "the of and to in is it that for on was with as at by be this from or have an are not but had "
    "his they you were her she which there all one can we their what so if out up about who more "
    "when some them will would time two may then do my into its now like way our first than been "
    "long day find water call made over down did get come part sound new work year place live back"
).split()


@dataclass(frozen=True)
class Turn:
    """One user turn. `prompt_token_ids` is set only for single-turn random prompts sent as
    token ids (exact length); otherwise the prompt is text built from the history + `user_text`."""

    user_text: str
    max_tokens: int
    prompt_token_ids: tuple[int, ...] | None = None
    reference_answer: str | None = None  # the dataset's answer (ShareGPT), for the record only


@dataclass
class Conversation:
    """Turns sent one after another; turn k waits for turn k-1's answer."""

    conversation_id: int
    turns: list[Turn]
    arrival_time_s: float = 0.0  # offset from the start of the run
    source_id: str | None = None  # e.g. the ShareGPT record id
    history: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant) so far


def poisson_arrival_times(num: int, rate: float, rng: random.Random) -> list[float]:
    """`num` arrival offsets in seconds: the first at 0, then exponential gaps of mean 1/rate.
    `rate == inf` puts every arrival at 0. Raises `ValueError` for a rate that is not > 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    times, now = [], 0.0
    for i in range(num):
        if i > 0:
            now += rng.expovariate(rate)
        times.append(now)
    return times


def random_token_ids(num_tokens: int, rng: random.Random, low: int, high: int) -> tuple[int, ...]:
    """`num_tokens` ids drawn uniformly from [low, high)."""
    return tuple(rng.randrange(low, high) for _ in range(num_tokens))


def random_text(num_chars: int, rng: random.Random) -> str:
    """Random common words joined by spaces, `num_chars` characters long (cut on the last word)."""
    words, length = [], 0
    while length < num_chars:
        word = rng.choice(_WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:num_chars]


def estimate_tokens(text: str, chars_per_token: float) -> int:
    """Token count of `text` guessed from its length (at least 1)."""
    return max(1, round(len(text) / chars_per_token))


def build_random_workload(
    num_conversations: int,
    input_len: int,
    output_len: int,
    *,
    rng: random.Random,
    use_token_ids: bool,
    num_turns: int = 1,
    token_id_range: tuple[int, int] = (16, 256),
    chars_per_token: float = 4.0,
) -> list[Conversation]:
    """Random prompts of `input_len` tokens: exact token ids when `use_token_ids` (single-turn
    completions only), else about `input_len * chars_per_token` characters of random words."""
    conversations = []
    for conversation_id in range(num_conversations):
        turns = []
        for _ in range(num_turns):
            ids = random_token_ids(input_len, rng, *token_id_range) if use_token_ids else None
            text = "" if ids is not None else random_text(round(input_len * chars_per_token), rng)
            turns.append(Turn(user_text=text, max_tokens=output_len, prompt_token_ids=ids))
        conversations.append(Conversation(conversation_id=conversation_id, turns=turns))
    return conversations


def build_sharegpt_workload(
    dialogues: list[tuple[str, tuple[tuple[str, str], ...]]],
    num_conversations: int,
    *,
    rng: random.Random,
    output_len: int,
    max_turns: int | None,
    max_input_chars: int,
    chars_per_token: float = 4.0,
) -> list[Conversation]:
    """Samples `num_conversations` dialogues (without replacement while there are enough, then
    with) given as (source id, (human, answer) pairs). Each turn asks for the dataset answer's
    estimated token count, capped at `output_len`. A user message longer than `max_input_chars`
    is cut to that length; conversations have at most `max_turns` turns (None: all)."""
    usable = [d for d in dialogues if d[1]]
    if not usable:
        raise ValueError("the ShareGPT data holds no conversation with a human/assistant pair")
    if num_conversations <= len(usable):
        chosen = rng.sample(usable, num_conversations)
    else:
        chosen = [rng.choice(usable) for _ in range(num_conversations)]
    conversations = []
    for conversation_id, (source_id, pairs) in enumerate(chosen):
        kept = pairs if max_turns is None else pairs[:max_turns]
        turns = [
            Turn(
                user_text=human[:max_input_chars],
                max_tokens=min(output_len, estimate_tokens(answer, chars_per_token)),
                reference_answer=answer,
            )
            for human, answer in kept
        ]
        conversations.append(
            Conversation(conversation_id=conversation_id, turns=turns, source_id=source_id)
        )
    return conversations


def completion_prompt(history: list[tuple[str, str]], user_text: str) -> str:
    """Prompt text for the completions endpoint: every turn is "User: <text>\nAssistant:" and
    the answer follows as generated, so turn k's prompt is exactly turn k-1's prompt + its answer
    + the new turn (a growing shared prefix, which is what context caching is for)."""
    parts = [f"User: {user}\nAssistant:{answer}\n" for user, answer in history]
    parts.append(f"User: {user_text}\nAssistant:")
    return "".join(parts)


def chat_messages(history: list[tuple[str, str]], user_text: str) -> list[dict[str, str]]:
    """OpenAI chat messages: the history as alternating user/assistant messages, then the new one."""
    messages = []
    for user, answer in history:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": user_text})
    return messages
