"""Tiny random Llama checkpoints in Hugging Face format, for tests across components (no downloads).

`make_tiny_llama(path)` writes config.json, safetensors weights (optionally sharded with an index),
a byte-level tokenizer.json and a tokenizer_config.json with a chat template. Import it as
`from tiny_models import make_tiny_llama` (pytest puts tests/ on sys.path: tests/ has no __init__.py).
"""

from __future__ import annotations

import json
import os
from typing import Any

BOS_ID, EOS_ID = 256, 257
VOCAB_SIZE = (
    260  # 256 bytes + <s> </s> <pad> <unk>, the same ids as the engine's byte-level tokenizer
)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def write_byte_tokenizer(path: str) -> None:
    """tokenizer.json (byte-level BPE, no merges, BOS added) + tokenizer_config.json with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": BOS_ID, "</s>": EOS_ID, "<pad>": 258, "<unk>": 259})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>", "<pad>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}, f)


def _byte_of(ch: str) -> int:
    """The byte the GPT-2 byte-level alphabet maps to `ch` (printable bytes map to themselves)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs, strict=False))[ch]


def tiny_llama_config(
    num_kv_heads: int = 2,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.2,
):
    """A transformers LlamaConfig small enough for CPU tests. The large initializer_range gives peaked
    logits, so greedy argmax is not decided by float rounding."""
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        rope_theta=10000.0 if rope_scaling is None else 500000.0,
    )
    if rope_scaling is not None:
        kwargs["rope_scaling"] = dict(rope_scaling)
    return LlamaConfig(**kwargs)


def make_tiny_llama(
    path: str,
    *,
    seed: int = 0,
    with_tokenizer: bool = True,
    max_shard_size: str | None = None,
    **config_kwargs: Any,
) -> str:
    """Writes a random tiny LlamaForCausalLM to `path` (created) and returns `path`.

    config_kwargs go to tiny_llama_config (num_kv_heads, rope_scaling, tie_word_embeddings, ...);
    max_shard_size (e.g. "50KB") writes sharded safetensors with model.safetensors.index.json.
    """
    import torch
    from transformers import LlamaForCausalLM

    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_kwargs)).eval()
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **save_kwargs)
    if with_tokenizer:
        write_byte_tokenizer(path)
    return path


def load_hf_model(path: str):
    """The same checkpoint under transformers, fp32, eval mode (the reference in equality tests)."""
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation under transformers (no EOS stop), new token ids only."""
    import torch

    ids = torch.tensor([prompt_token_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt_token_ids) :].tolist()


def assert_greedy_equal(
    model, prompt_token_ids: list[int], ours: list[int], ref: list[int], tol: float = 1e-3
) -> None:
    """Our greedy tokens equal transformers' `ref`, or they part at a float-noise near-tie.

    Random tiny models have near-ties that a different thread count or BLAS can flip. At the first
    difference, transformers' logit of our token must be within `tol` of its maximum (a real bug
    gives gaps of order 1); after that the two runs legitimately continue differently.
    """
    import torch

    assert len(ours) == len(ref), (ours, ref)
    if ours == ref:
        return
    i = next(j for j, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b)
    ids = torch.tensor([prompt_token_ids + ours[:i]], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(ids).logits[0, -1].float()
    gap = (logits.max() - logits[ours[i]]).item()
    assert gap <= tol, (
        f"token {i}: ours {ours[i]}, transformers {ref[i]}, logit gap {gap:.3g} > {tol}"
    )
