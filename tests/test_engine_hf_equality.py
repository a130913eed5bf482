"""Greedy outputs of our engine equal transformers' LlamaForCausalLM on the same tiny random weights,
under every scheduling path: batches of mixed lengths, prefix-cache hits, chunked prefill, preemption."""

from __future__ import annotations

import pytest
from pdserve import LLM, SamplingParams
from tiny_models import (
    LLAMA3_ROPE_SCALING,
    assert_greedy_equal,
    hf_greedy,
    load_hf_model,
    make_tiny_llama,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
VARIANTS = {
    "mha": dict(num_kv_heads=4),
    "gqa-llama3-rope": dict(num_kv_heads=1, rope_scaling=LLAMA3_ROPE_SCALING),
    "gqa-tied-sharded": dict(num_kv_heads=2, tie_word_embeddings=True, max_shard_size="100KB"),
}


def _prompts() -> list[list[int]]:
    # mixed lengths: shorter than, equal to and longer than a 16-token block
    return [[256] + [(7 * i + 3) % 250 for i in range(n)] for n in (3, 15, 40, 71)]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    make_tiny_llama(path, **VARIANTS[request.param])
    model = load_hf_model(path)
    refs = [hf_greedy(model, p, GREEDY.max_tokens) for p in _prompts()]
    return path, refs, model


def _check(checkpoint, outs) -> None:
    """Every output equals transformers' greedy tokens (up to float-noise near-ties)."""
    _, refs, model = checkpoint
    assert len(outs) == len(refs)
    for prompt, out, ref in zip(_prompts(), outs, refs, strict=True):
        assert_greedy_equal(model, prompt, out.token_ids, ref)


def _assert_clean(llm: LLM) -> None:
    llm.engine.check_invariants()
    stats = llm.engine.stats()
    assert stats.num_used_blocks == 0 and stats.num_reserved_blocks == 0, stats


def test_single_prompts_equal_transformers(checkpoint):
    path = checkpoint[0]
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    outs = [llm.generate([prompt], GREEDY)[0] for prompt in _prompts()]
    _check(checkpoint, outs)
    for prompt, out in zip(_prompts(), outs, strict=True):
        assert out.finish_reason == "length"
        assert out.prompt_token_ids == prompt
    _assert_clean(llm)


def test_mixed_batch_equals_transformers(checkpoint):
    path = checkpoint[0]
    llm = LLM(path, device="cpu", num_kv_blocks=64, kv_layout="block-major")
    outs = llm.generate(_prompts(), GREEDY)
    _check(checkpoint, outs)
    _assert_clean(llm)


def test_chunked_prefill_equals_transformers(checkpoint):
    path = checkpoint[0]
    # 20-token budget: the 40- and 71-token prompts take several chunks, mixed with decodes
    llm = LLM(path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=20, block_size=8)
    outs = llm.generate(_prompts(), GREEDY)
    _check(checkpoint, outs)
    _assert_clean(llm)


def test_prefix_cache_hits_equal_transformers(checkpoint):
    path = checkpoint[0]
    llm = LLM(path, device="cpu", num_kv_blocks=64, enable_radix_caching=True)
    first = llm.generate(_prompts(), GREEDY)
    second = llm.generate(_prompts(), GREEDY)  # same prompts: whole blocks come from the tree
    _check(checkpoint, first)
    assert [o.token_ids for o in second] == [o.token_ids for o in first]
    assert (
        second[3].num_cached_tokens == 64
    )  # 72 tokens -> 4 whole blocks cached, the rest computed
    # a prompt extending a finished one hits its prompt and generated blocks
    longer = _prompts()[2] + first[2].token_ids
    out = llm.generate([longer], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    assert out.num_cached_tokens == 64  # 41 prompt + 23 generated tokens have KV: 4 whole blocks
    _assert_clean(llm)


def test_preemption_by_recompute_equals_transformers(checkpoint):
    path = checkpoint[0]
    # 12 blocks of 8 tokens cannot hold all four sequences at once (they need 1+3+8+12 blocks at the end)
    for caching in (False, True):
        llm = LLM(path, device="cpu", num_kv_blocks=14, block_size=8, enable_radix_caching=caching)
        outs = llm.generate(_prompts(), GREEDY)
        _check(checkpoint, outs)
        assert llm.engine.stats().num_preemptions > 0
        _assert_clean(llm)


def test_host_tier_demote_and_promote_equal_transformers(checkpoint):
    path = checkpoint[0]
    llm = LLM(
        path,
        device="cpu",
        num_kv_blocks=16,
        block_size=8,
        enable_radix_caching=True,
        enable_host_tier=True,
        num_host_kv_blocks=40,
    )
    first = llm.generate(_prompts(), GREEDY)
    _check(checkpoint, first)
    # other traffic needs the device blocks: the cached prefixes move to the host tier, not away
    others = [[256] + [(3 * i + 11) % 250 for i in range(n)] for n in (70, 60)]
    llm.generate(others, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.num_demoted_blocks > 0 and stats.num_host_cached_blocks > 0
    hits_before = stats.num_hit_tokens
    outs = llm.generate(_prompts(), GREEDY)  # hits come back from the host tier
    _check(checkpoint, outs)
    stats = llm.engine.stats()
    assert stats.num_promoted_blocks > 0 and stats.num_hit_tokens > hits_before
    kinds = {e.kind for e in llm.engine.drain_cache_events()}
    assert {"inserted", "demoted", "promoted"} <= kinds
    _assert_clean(llm)


def _hf_penalised_logits(
    model, prompt: list[int], out: list[int], presence: float, frequency: float
):
    """transformers' next-token logits after prompt + out, lowered by OpenAI's penalties by hand
    (counting `out` only)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
    for token in set(out):
        logits[token] -= presence + frequency * out.count(token)
    return logits


def test_presence_and_frequency_penalties_equal_transformers(checkpoint):
    """Greedy with penalties, batched with a plain greedy request: each equals its transformers
    reference (the penalties count only the answer's tokens, not the prompt's)."""
    path, plain_refs, model = checkpoint
    presence, frequency = 0.5, 1.5
    penalised = SamplingParams(
        temperature=0.0,
        max_tokens=24,
        ignore_eos=True,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    prompts = _prompts()
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    outs = llm.generate([*prompts, prompts[0]], [penalised] * len(prompts) + [GREEDY])
    changed = False
    for prompt, out, plain in zip(prompts, outs, plain_refs, strict=False):
        changed |= out.token_ids != plain
        # each of our tokens is transformers' penalised argmax after our own prefix (up to a
        # float-noise near-tie, as in assert_greedy_equal)
        for i, token in enumerate(out.token_ids):
            logits = _hf_penalised_logits(model, prompt, out.token_ids[:i], presence, frequency)
            gap = (logits.max() - logits[token]).item()
            assert gap <= 1e-3, f"token {i}: ours {token}, transformers {int(logits.argmax())}"
    assert changed  # the penalties change this model's answers
    assert_greedy_equal(model, prompts[0], outs[-1].token_ids, plain_refs[0])
    _assert_clean(llm)


def test_logit_bias_equals_transformers(checkpoint):
    """Greedy with a logit bias (a ban, two boosts) and a frequency penalty, batched with a plain
    greedy request: each token is transformers' argmax of the biased, penalised logits after our own
    prefix; the banned token never comes; an id outside the vocabulary is refused, nothing taken."""
    path, plain_refs, model = checkpoint
    banned = plain_refs[1][0]  # the plain answer's first token
    bias = {banned: -100.0, 17: 3.0, 42: 1.5}
    biased = SamplingParams(
        temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias=bias, frequency_penalty=0.5
    )
    prompts = _prompts()
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    outs = llm.generate([prompts[1], prompts[2], prompts[0]], [biased, biased, GREEDY])
    for prompt, out in zip(prompts[1:3], outs, strict=False):
        assert banned not in out.token_ids
        for i, token in enumerate(out.token_ids):
            logits = _hf_penalised_logits(model, prompt, out.token_ids[:i], 0.0, 0.5)
            for t, b in bias.items():
                logits[t] += b
            gap = (logits.max() - logits[token]).item()
            assert gap <= 1e-3, f"token {i}: ours {token}, transformers {int(logits.argmax())}"
    assert outs[0].token_ids[0] != plain_refs[1][0]
    assert_greedy_equal(model, prompts[0], outs[2].token_ids, plain_refs[0])
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llm.engine.add_request("bad", prompts[0], SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})
    _assert_clean(llm)


def test_allowed_token_ids_equal_transformers(checkpoint):
    """Greedy restricted to a set of ids (with a penalty, batched with a plain greedy request): each
    token is transformers' argmax over the set after our own prefix; the logprobs stay the model's
    own; an id outside the vocabulary is refused, nothing taken."""
    import torch

    path, plain_refs, model = checkpoint
    allowed = sorted({plain_refs[1][0] + 1, 3, 17, 42, 99, 120} - {plain_refs[1][0]})
    params = SamplingParams(
        temperature=0.0,
        max_tokens=10,
        ignore_eos=True,
        allowed_token_ids=allowed,
        frequency_penalty=0.5,
        logprobs=0,
    )
    prompts = _prompts()
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    outs = llm.generate([prompts[1], prompts[0]], [params, GREEDY])
    out = outs[0]
    assert set(out.token_ids) <= set(allowed) and len(set(out.token_ids)) > 1
    for i, token in enumerate(out.token_ids):
        logits = _hf_penalised_logits(model, prompts[1], out.token_ids[:i], 0.0, 0.5)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        gap = (masked.max() - masked[token]).item()
        assert gap <= 1e-3, f"token {i}: ours {token}, transformers {int(masked.argmax())}"
        raw = torch.log_softmax(
            _hf_penalised_logits(model, prompts[1], out.token_ids[:i], 0, 0), -1
        )
        assert abs(out.logprobs[i].logprob - raw[token].item()) <= 1e-3
    assert_greedy_equal(model, prompts[0], outs[1].token_ids, plain_refs[0])
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.engine.add_request("bad", prompts[0], SamplingParams(allowed_token_ids=[1, vocab]))
    _assert_clean(llm)


def test_prompt_logprobs_equal_transformers(checkpoint):
    """Every prompt token's log-probability given those before it, and the top 3 there, equal
    transformers' log-softmax over one forward of the whole prompt. The prompt is computed whole in
    chunks although its prefix is cached (cached KV has no logits), batched with requests that ask
    for nothing; the generated tokens stay greedy's."""
    import torch

    path, plain_refs, model = checkpoint
    prompts = _prompts()
    prompt = prompts[3]  # 72 tokens: several 32-token chunks
    llm = LLM(
        path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32, enable_radix_caching=True
    )
    llm.generate([prompt], GREEDY)  # its blocks are in the radix cache now
    asked = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate([prompts[0], prompt, prompt], [GREEDY, asked, GREEDY])
    out = outs[1]
    assert outs[0].prompt_logprobs is None and outs[2].prompt_logprobs is None
    assert out.num_cached_tokens == 0 and outs[2].num_cached_tokens > 0
    assert out.token_ids == plain_refs[3][:4] and out.logprobs is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for p in range(1, len(prompt)):
        entry = out.prompt_logprobs[p]
        assert abs(entry.logprob - ref[p - 1, prompt[p]].item()) < 1e-4, p
        values, _ = ref[p - 1].topk(3)
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert all(abs(ref[p - 1, t].item() - lp) < 1e-4 for t, lp in entry.top)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    _assert_clean(llm)


def test_min_tokens_equal_transformers(checkpoint):
    """A stop id that the plain greedy answer produces early: with min_tokens the answer goes on,
    each token transformers' argmax with the stop id held back until min_tokens tokens exist, then
    free again (it may end the answer); batched with a plain request that stops at once."""
    import torch

    path, plain_refs, model = checkpoint
    prompts = _prompts()
    stop = plain_refs[1][2]
    first = plain_refs[1].index(stop)  # the plain answer stops here
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop])
    held = SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop], min_tokens=8
    )
    llm = LLM(path, device="cpu", num_kv_blocks=64)
    outs = llm.generate([prompts[1], prompts[1]], [plain, held])
    assert outs[0].token_ids == plain_refs[1][: first + 1]
    got = outs[1].token_ids
    assert len(got) >= 8 and stop not in got[:8]
    assert got[-1] == stop or len(got) == 20
    for i, token in enumerate(got):
        with torch.no_grad():
            logits = model(torch.tensor([prompts[1] + got[:i]])).logits[0, -1].float()
        if i < 8:
            logits[stop] = float("-inf")
        gap = (logits.max() - logits[token]).item()
        assert gap <= 1e-3, f"token {i}: ours {token}, transformers {int(logits.argmax())}"
    _assert_clean(llm)


def test_logprobs_equal_transformers(checkpoint):
    """Each generated token's log-probability and the top 5 equal transformers' log-softmax of the
    raw logits after the same prefix, in a batch where a request without logprobs gets none, and
    with penalties (they change the choice, not the reported distribution)."""
    import torch

    path, _, model = checkpoint
    asked = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5)
    penalised = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0, frequency_penalty=2.0
    )
    prompts = _prompts()
    llm = LLM(path, device="cpu", num_kv_blocks=64, max_num_batched_tokens=32)  # chunked too
    outs = llm.generate(prompts[:3], [asked, GREEDY, penalised])
    assert outs[1].logprobs is None
    for out, prompt, top_n in ((outs[0], prompts[0], 5), (outs[2], prompts[2], 0)):
        assert len(out.logprobs) == len(out.token_ids)
        for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + out.token_ids[:i]])).logits[0, -1]
            ref = torch.log_softmax(logits.float(), dim=-1)
            assert abs(entry.logprob - ref[token].item()) < 1e-4, (i, entry.logprob)
            assert len(entry.top) == top_n
            values, ids = ref.topk(top_n)
            assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
            if top_n:  # ids agree up to float-noise near-ties
                assert all(abs(ref[t].item() - lp) < 1e-4 for t, lp in entry.top)
    _assert_clean(llm)
