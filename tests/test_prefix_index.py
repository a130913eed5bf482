"""The scheduler's per-instance prefix mirrors follow cache events exactly."""

from __future__ import annotations

import random

from pdserve.server.prefix_index import (
    TIER_GPU,
    TIER_HOST,
    CacheEvent,
    PrefixIndex,
    default_hash_blocks,
    python_hash_blocks,
)

BS = 4


def inserted(hashes, tokens, tier=TIER_GPU, parent=0):
    return {
        "kind": "inserted",
        "tier": tier,
        "parent_hash": parent,
        "block_hashes": hashes,
        "token_ids": tokens,
    }


def test_hashes_chain_over_whole_blocks_only():
    for hb in {python_hash_blocks, default_hash_blocks()}:
        toks = list(range(10))
        h = hb(toks, BS)
        assert len(h) == 2
        assert hb(toks[:8], BS) == h
        assert hb([99] + toks[1:], BS)[1] != h[1]  # the chain carries the prefix


def test_insert_match_evict_demote_promote():
    hb = default_hash_blocks()
    index = PrefixIndex(hb)
    index.add_instance("p0", BS)
    prompt = list(range(100, 113))  # 3 whole blocks + 1 token
    hashes = hb(prompt, BS)
    index.apply_events("p0", [inserted(hashes[:2], prompt[:8])])
    assert index.cached_tokens("p0", prompt) == 8
    index.apply_events("p0", [inserted(hashes[2:], prompt[8:12], parent=hashes[1])])
    assert index.cached_tokens("p0", prompt) == 12
    assert index.cached_tokens("p0", [1] + prompt[1:]) == 0
    index.apply_events(
        "p0",
        [
            {
                "kind": "demoted",
                "tier": TIER_GPU,
                "parent_hash": hashes[1],
                "block_hashes": hashes[2:],
            }
        ],
    )
    assert index.cached_tokens("p0", prompt) == 12  # still held, on the host tier
    index.apply_events(
        "p0",
        [
            {
                "kind": "promoted",
                "tier": TIER_HOST,
                "parent_hash": hashes[1],
                "block_hashes": hashes[2:],
            }
        ],
    )
    index.apply_events(
        "p0",
        [
            {
                "kind": "evicted",
                "tier": TIER_GPU,
                "parent_hash": hashes[1],
                "block_hashes": hashes[2:],
            }
        ],
    )
    assert index.cached_tokens("p0", prompt) == 8
    assert index.cached_tokens("unknown", prompt) == 0


def test_event_kind_as_enum_or_object():
    class Kind:
        name = "INSERTED"

    class Ev:
        kind = Kind()
        tier = 0
        parent_hash = 0
        block_hashes = [5]
        token_ids = [1, 2, 3, 4]

    ev = CacheEvent.from_any(Ev())
    assert ev.kind == "inserted" and ev.block_hashes == [5]


def test_mirror_matches_a_plain_model_on_random_event_sequences():
    hb = default_hash_blocks()
    rng = random.Random(0)
    index = PrefixIndex(hb)
    index.add_instance("d", BS)
    held: set[tuple[int, ...]] = (
        set()
    )  # prefixes (as token tuples of whole blocks) the "instance" holds
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(4, 24))] for _ in range(30)]
    for _ in range(300):
        p = rng.choice(prompts)
        n = len(p) // BS
        if n == 0:
            continue
        hashes = hb(p, BS)
        if rng.random() < 0.6:
            k = rng.randrange(n) + 1
            new = [i for i in range(k) if tuple(p[: (i + 1) * BS]) not in held]
            if new and new == list(
                range(new[0], k)
            ):  # a tree inserts a suffix under an existing prefix
                index.apply_events(
                    "d", [inserted([hashes[i] for i in new], p[new[0] * BS : k * BS])]
                )
                held.update(tuple(p[: (i + 1) * BS]) for i in new)
        else:
            # evict the deepest held block on this path if it is a leaf
            depth = max((i for i in range(n) if tuple(p[: (i + 1) * BS]) in held), default=-1)
            if depth >= 0:
                key = tuple(p[: (depth + 1) * BS])
                if not any(len(h) > len(key) and h[: len(key)] == key for h in held):
                    held.discard(key)
                    index.apply_events(
                        "d",
                        [
                            {
                                "kind": "evicted",
                                "tier": 0,
                                "parent_hash": 0,
                                "block_hashes": [hashes[depth]],
                            }
                        ],
                    )
        for q in prompts:
            expect = 0
            while expect + BS <= len(q) and tuple(q[: expect + BS]) in held:
                expect += BS
            assert index.cached_tokens("d", q) == expect
            assert index.matcher(q)("d") == expect
