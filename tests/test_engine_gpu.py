"""GPU checks (marker `gpu`): bf16 logits close to transformers', greedy equal on short runs, and the
GPU-only padded decode path equal to transformers under batching, chunking and prefix caching.

Tolerance: bf16 keeps 8 bits of mantissa, so neither implementation is exact; we require our bf16
logits to be no further from the fp32 reference than 2x transformers' own bf16 error (+0.02 absolute
slack), i.e. our kernels lose no more precision than the reference implementation does.
"""

from __future__ import annotations

import pytest
import torch
from pdserve import LLM, SamplingParams
from pdserve.engine import LLMEngine
from tiny_models import LLAMA3_ROPE_SCALING, assert_greedy_equal, make_tiny_llama

pytestmark = pytest.mark.gpu

PROMPTS = [[256] + [(11 * i + 5) % 250 for i in range(n)] for n in (5, 16, 37, 70)]


@pytest.fixture(scope="module", params=["mha", "gqa-llama3"])
def ckpt(request, tmp_path_factory):
    kw = (
        dict(num_kv_heads=4)
        if request.param == "mha"
        else dict(num_kv_heads=1, rope_scaling=LLAMA3_ROPE_SCALING)
    )
    return make_tiny_llama(str(tmp_path_factory.mktemp(request.param)), **kw)


def _hf(path: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).to("cuda").eval()


def _our_last_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    engine.add_request("logits", prompt, SamplingParams(max_tokens=1))
    batch, _ = engine.scheduler.schedule()
    logits = engine.runner.logits_for(batch)[0]
    engine.abort_request("logits")
    return logits


def test_bf16_logits_close_to_transformers(ckpt):
    engine = LLMEngine(model=ckpt, device="cuda", dtype="bfloat16", num_kv_blocks=64)
    hf32, hf16 = _hf(ckpt, torch.float32), _hf(ckpt, torch.bfloat16)
    for prompt in PROMPTS:
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            ref = hf32(ids).logits[0, -1].float()
            theirs = hf16(ids).logits[0, -1].float()
        ours = _our_last_logits(engine, prompt)
        their_err = (theirs - ref).abs().max().item()
        our_err = (ours - ref).abs().max().item()
        assert our_err <= 2 * their_err + 0.02, (our_err, their_err)
    assert engine.stats().num_used_blocks == 0


def test_bf16_greedy_equals_transformers_on_short_runs(ckpt):
    """Every token equal to transformers' bf16 greedy choice, except where transformers itself sees a
    near-tie: its top logit beats ours by less than 2x its own bf16 error there (bf16 noise decides).
    (The first token was once required to be exact; the GPU fast path — fused residual add, Triton
    attention — rounds differently from transformers and flipped one such near-tie on an H100.)"""
    hf32, hf16 = _hf(ckpt, torch.float32), _hf(ckpt, torch.bfloat16)
    llm = LLM(ckpt, device="cuda", dtype="bfloat16", num_kv_blocks=64)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    num_exact = 0
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = torch.tensor([prompt + out.token_ids[:-1]], device="cuda")
        with torch.no_grad():
            l16 = hf16(ids).logits[0, len(prompt) - 1 :].float()
            l32 = hf32(ids).logits[0, len(prompt) - 1 :].float()
        noise = (l16 - l32).abs().max(dim=-1).values
        for i, token in enumerate(out.token_ids):
            gap = (l16[i].max() - l16[i, token]).item()
            assert gap <= 2 * noise[i].item(), (
                i,
                token,
                int(l16[i].argmax()),
                gap,
                noise[i].item(),
            )
        num_exact += out.token_ids == _hf_greedy_gpu(hf16, prompt, 6)
    print(f"bf16 greedy: {num_exact}/{len(PROMPTS)} runs identical to transformers bf16")


def _hf_greedy_gpu(model, prompt, n):
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_fp32_gpu_paths_equal_transformers(ckpt):
    """fp32 on the GPU: padded decode attention, chunked prefill, prefix hits, preemption, host tier."""
    hf32 = _hf(ckpt, torch.float32)
    refs = [_hf_greedy_gpu(hf32, p, 16) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for kw in (
        dict(num_kv_blocks=64),
        dict(
            num_kv_blocks=64,
            max_num_batched_tokens=24,
            enable_radix_caching=True,
            kv_layout="block-major",
        ),
        dict(num_kv_blocks=14, block_size=8),  # preemption
        dict(
            num_kv_blocks=16,
            block_size=8,
            enable_radix_caching=True,
            enable_host_tier=True,
            num_host_kv_blocks=40,
        ),
    ):
        llm = LLM(ckpt, device="cuda", dtype="float32", **kw)
        for _ in range(2):  # the second round hits the prefix cache when it is on
            for prompt, out, ref in zip(PROMPTS, llm.generate(PROMPTS, params), refs, strict=True):
                assert_greedy_equal(hf32, prompt, out.token_ids, ref)
        llm.engine.check_invariants()
        assert llm.engine.stats().num_used_blocks == 0


def test_gpu_memory_utilization_sizes_the_cache():
    engine = LLMEngine(model="tiny", device="cuda", gpu_memory_utilization=0.05)
    layout = engine.kv_layout()
    free, total = torch.cuda.mem_get_info()
    assert layout.nbytes <= 0.05 * total and layout.num_blocks > 100
    assert layout.device.startswith("cuda")
