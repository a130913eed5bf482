"""The offline API and request validation: clear errors for bad input, no leaked blocks, sampling
options (stop ids, EOS, seeds, top-k/top-p), tokenizer and chat template, presets."""

from __future__ import annotations

import dataclasses
import time
from array import array

import pytest
import torch
from pdserve import LLM, SamplingParams
from pdserve.engine import EngineConfig, LLMEngine, Tokenizer
from tiny_models import EOS_ID, make_tiny_llama


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_llama(
        str(tmp_path_factory.mktemp("api")), num_kv_heads=2, max_position_embeddings=128
    )
    return LLM(path, device="cpu", num_kv_blocks=32, max_num_seqs=4)


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        engine.check_invariants()
        stats = engine.stats()
        assert stats.num_used_blocks == 0 and not engine.has_unfinished(), stats


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(seed="x"), "seed"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-3), "frequency_penalty"),
        (dict(frequency_penalty="1"), "frequency_penalty"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_take_nothing(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 128])
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[1, 2, 99999]])
    with pytest.raises(ValueError, match="whole cache"):
        LLM(llm.engine.config.model, device="cpu", num_kv_blocks=2).generate([[1] * 40])
    # a good prompt next to a bad one: nothing is queued
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[1, 2, 3], []])
    with pytest.raises(ValueError, match="already"):
        llm.engine.add_request("dup", [1, 2])
        llm.engine.add_request("dup", [1, 2])
    llm.engine.abort_request("dup")


def test_engine_config_validation():
    with pytest.raises(ValueError, match="kv_layout"):
        EngineConfig(kv_layout="diagonal")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="neither a preset"):
        LLMEngine(model="/nonexistent/model")


def test_stop_token_and_eos(llm):
    base = llm.generate(
        [[256, 1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    )[0]
    stop_at = base.token_ids[3]
    out = llm.generate(
        [[256, 1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_at])
    )[0]
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_at) + 1]
    assert out.finish_reason == "stop"
    eos_engine = llm.engine.scheduler
    eos_engine.eos_token_ids.add(stop_at)  # pretend the model's EOS is that token
    try:
        out = llm.generate([[256, 1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
        out = llm.generate(
            [[256, 1, 2, 3]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        )[0]
        assert out.token_ids == base.token_ids
    finally:
        eos_engine.eos_token_ids.discard(stop_at)
    assert EOS_ID in eos_engine.eos_token_ids


def test_sampling_seeds_and_filters(llm):
    prompt = [256, 40, 41, 42]
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    alone = llm.generate([prompt], seeded)[0].token_ids
    in_batch = llm.generate([[256, 9], prompt, [256, 7, 7]], [seeded, seeded, seeded])[1].token_ids
    assert alone == in_batch  # a seed fixes the tokens regardless of the batch
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[
        0
    ].token_ids
    top1 = llm.generate(
        [prompt], SamplingParams(temperature=2.0, top_k=1, max_tokens=10, ignore_eos=True)
    )[0]
    assert top1.token_ids == greedy
    tiny_p = llm.generate(
        [prompt], SamplingParams(temperature=2.0, top_p=1e-6, max_tokens=10, ignore_eos=True)
    )[0]
    assert tiny_p.token_ids == greedy
    draws = {
        tuple(
            llm.generate([prompt], SamplingParams(temperature=5.0, seed=s, max_tokens=4))[
                0
            ].token_ids
        )
        for s in range(4)
    }
    assert len(draws) > 1


def test_penalties_lower_the_logits_of_generated_tokens():
    """apply_penalties against OpenAI's formula written out; sampled rows draw from the penalised
    distribution; rows without penalties are untouched and need no output ids."""
    from pdserve.engine.sampler import apply_penalties, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    params = [
        SamplingParams(presence_penalty=0.7, frequency_penalty=0.2),
        SamplingParams(),
        SamplingParams(presence_penalty=-1.0),
    ]
    outputs = [[3, 3, 5, 3], None, []]
    got = apply_penalties(logits, params, outputs)
    want = logits.clone()
    for token in (3, 5):
        want[0, token] -= 0.7 + 0.2 * outputs[0].count(token)
    assert torch.allclose(got, want) and torch.equal(logits[1:], got[1:])
    # greedy picks the penalised argmax: push token 3 from first to last
    peaked = torch.zeros(1, 11)
    peaked[0, 3] = 1.0
    greedy = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert sample(peaked, [greedy], [2], [[3]]) == [
        int(torch.argmax(apply_penalties(peaked, [greedy], [[3]])))
    ]
    assert sample(peaked, [greedy], [2], [[3]]) != [3]
    # sampled rows draw from the penalised distribution: of two even tokens, the generated one
    # (2 / 0.05 = 40 logits down) is never drawn again, where unpenalised seeds draw both
    even = torch.zeros(1, 2)
    cold = [SamplingParams(temperature=0.05, seed=s, presence_penalty=2.0) for s in range(12)]
    assert {sample(even, [p], [1], [[1]])[0] for p in cold} == {0}
    plain = [SamplingParams(temperature=0.05, seed=s) for s in range(12)]
    assert {sample(even, [p], [1])[0] for p in plain} == {0, 1}
    with pytest.raises(ValueError, match="output token ids"):
        apply_penalties(logits, params, None)
    # the engine hands generated ids over as array('q'), read in place: the same result
    arrays = [array("q", o) if o is not None else None for o in outputs]
    assert torch.equal(apply_penalties(logits, params, arrays), got)


def test_logit_bias_adds_to_the_logits_of_its_rows():
    from pdserve.engine.sampler import apply_logit_bias, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    params = [
        SamplingParams(logit_bias={2: 1.5, 7: -100.0}),
        SamplingParams(),
        SamplingParams(logit_bias={2: -0.25}),
    ]
    got = apply_logit_bias(logits, params)
    want = logits.clone()
    want[0, 2] += 1.5
    want[0, 7] -= 100.0
    want[2, 2] -= 0.25
    assert torch.allclose(got, want) and torch.equal(got[1], logits[1])
    forced = SamplingParams(temperature=0.0, logit_bias={9: 100.0})
    assert sample(logits[:1], [forced], [0]) == [9]


def test_allowed_token_ids_keep_only_their_logits():
    from pdserve.engine.sampler import apply_allowed_token_ids, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    params = [
        SamplingParams(temperature=0.0, allowed_token_ids=[7, 2, 7]),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, allowed_token_ids=[10]),
    ]
    assert params[0].allowed_token_ids == [2, 7]  # sorted, without repeats
    got = apply_allowed_token_ids(logits, params)
    want = torch.full_like(logits, float("-inf"))
    want[0, [2, 7]] = logits[0, [2, 7]]
    want[1] = logits[1]
    want[2, 10] = logits[2, 10]
    assert torch.equal(got, want)
    assert sample(logits, params, [0, 0, 0]) == [
        2 if logits[0, 2] > logits[0, 7] else 7,
        int(logits[1].argmax()),
        10,
    ]
    # sampled (hot, top-k, top-p) requests stay inside the set too; a bias may not leave it
    hot = [
        SamplingParams(temperature=2.0, seed=s, allowed_token_ids=[3, 5], logit_bias={4: 100.0})
        for s in range(40)
    ]
    hot[0].top_k, hot[1].top_p = 5, 0.9
    assert set(sample(logits[:1].expand(40, -1), hot, list(range(40)))) <= {3, 5}
    for bad in ([], [1, -1], [True], "12"):
        with pytest.raises(ValueError, match="allowed_token_ids"):
            SamplingParams(allowed_token_ids=bad)


def test_a_migrated_request_goes_on_as_if_it_never_moved(llm):
    """num_prior_output_tokens: a request re-prefilled with k of its tokens appended to the prompt
    draws the same tokens as the one that never moved: max_tokens, min_tokens, the penalties and the
    seeded noise all count the k tokens as generated."""
    prompt = [256, 17, 99, 3]
    params = SamplingParams(
        temperature=0.8,
        seed=5,
        max_tokens=24,
        min_tokens=20,
        frequency_penalty=1.5,
        presence_penalty=0.5,
    )
    whole = llm.generate([prompt], params)[0]
    k = 9
    moved = llm.generate(
        [prompt + whole.token_ids[:k]],
        dataclasses.replace(params, num_prior_output_tokens=k),
    )[0]
    assert moved.token_ids == whole.token_ids[k:]
    assert moved.finish_reason == whole.finish_reason
    # the same continuation counting from zero (the budgets cut by k, as the scheduler once did)
    # differs: the test can tell
    naive = llm.generate(
        [prompt + whole.token_ids[:k]],
        dataclasses.replace(params, max_tokens=24 - k, min_tokens=20 - k),
    )[0]
    assert naive.token_ids != whole.token_ids[k:]
    with pytest.raises(ValueError, match="num_prior_output_tokens"):
        SamplingParams(max_tokens=4, num_prior_output_tokens=4)
    with pytest.raises(ValueError, match="num_prior_output_tokens"):
        SamplingParams(num_prior_output_tokens=-1)
    with pytest.raises(ValueError, match="below the prompt length"):
        llm.generate([[256, 1]], SamplingParams(max_tokens=8, num_prior_output_tokens=2))


def test_min_tokens_holds_back_stop_and_eos_ids_until_reached():
    from pdserve.engine.sampler import apply_min_tokens, sample

    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    logits[:, 4] = 50.0  # the EOS below: every row's greedy pick
    params = [
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, stop_token_ids=[6]),
        SamplingParams(temperature=0.0, max_tokens=8, min_tokens=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=8),
    ]
    resolved = [p.with_min_tokens_resolved([4], 11) for p in params]
    assert resolved[0].min_tokens_banned_ids == [4, 6] and params[0].min_tokens_banned_ids == []
    assert resolved[1].min_tokens_banned_ids == [] and resolved[2] is params[2]
    got = apply_min_tokens(logits, resolved, [2, 0, 0])
    want = logits.clone()
    want[0, [4, 6]] = float("-inf")
    assert torch.equal(got, want)
    assert apply_min_tokens(logits, resolved, [3, 0, 0]) is logits  # reached: nothing banned
    assert (
        sample(logits, resolved, [2, 2, 2])[0] != 4
        and sample(logits, resolved, [3, 2, 2]) == [4] * 3
    )
    with pytest.raises(ValueError, match="min_tokens must be in"):
        SamplingParams(max_tokens=2, min_tokens=3)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
    # a stop id past the vocabulary is never sampled: nothing to hold back (and no index past V)
    assert SamplingParams(min_tokens=2, stop_token_ids=[11, 6]).with_min_tokens_resolved(
        [4], 11
    ).min_tokens_banned_ids == [4, 6]
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[1 << 64])
    with pytest.raises(ValueError, match="nothing could be sampled"):
        SamplingParams(
            min_tokens=1, allowed_token_ids=[4, 6], stop_token_ids=[6]
        ).with_min_tokens_resolved([4], 11)


def test_text_prompts_chat_template_and_outputs(llm):
    out = llm.generate("héllo", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert out.prompt == "héllo" and out.prompt_token_ids == [256, 104, 195, 169, 108, 108, 111]
    assert len(out.token_ids) == 5 and isinstance(out.text, str)
    tok = llm.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<s><|user|>hi\n<|assistant|>"
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert ids[0] == 256 and ids[1] != 256  # BOS written by the template is not doubled
    assert (
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=2)).prompt_token_ids
        == ids
    )


def test_tiny_preset_is_fast():
    llm = LLM("tiny", device="cpu", kv_cache_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate("warm up", params)
    start = time.perf_counter()
    out = llm.generate("The quick brown fox", params)[0]
    elapsed_s = time.perf_counter() - start
    assert len(out.token_ids) == 64
    print(
        f"tiny preset: prompt + 64 decode steps in {elapsed_s * 1e3:.0f} ms"
    )  # not asserted (STYLE 10)
    bt = Tokenizer.byte_level()
    assert bt.decode(bt.encode("añb")) == "añb"


def test_abort_mid_flight_returns_every_block(llm):
    engine = llm.engine
    for i in range(6):
        engine.add_request(f"a{i}", [256] + list(range(1, 30 + i)), SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_used_blocks > 0
    for i in range(6):
        assert engine.abort_request(f"a{i}")
    assert not engine.has_unfinished()


def test_gpu_kv_budget_is_a_per_instance_share():
    """Two instances at utilization 0.3 share one device: the second one's budget does not shrink by
    the memory the first one holds, only by what is actually free."""
    from pdserve.engine.model_runner import kv_budget_nbytes

    gib = 1 << 30
    first = kv_budget_nbytes(80 * gib, 79 * gib, 0.3, peak_nbytes=2 * gib, allocated_nbytes=1 * gib)
    assert (
        first == 24 * gib - 2 * gib
    )  # share of 0.3 * 80, less this instance's weights + activations
    # the first instance now holds 24 GiB; the second gets the same share
    second = kv_budget_nbytes(
        80 * gib, 55 * gib, 0.3, peak_nbytes=2 * gib, allocated_nbytes=1 * gib
    )
    assert second == first
    # capped by what is free: 5 GiB free, 1 GiB of activations to come, 256 MiB margin
    tight = kv_budget_nbytes(80 * gib, 5 * gib, 0.3, peak_nbytes=2 * gib, allocated_nbytes=1 * gib)
    assert tight == 4 * gib - (256 << 20)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.01"):
        kv_budget_nbytes(80 * gib, 79 * gib, 0.01, peak_nbytes=2 * gib, allocated_nbytes=1 * gib)
