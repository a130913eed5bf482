"""Engine and model configuration: what the user asked for (EngineConfig) and what the checkpoint is (ModelConfig).

ModelConfig reads a Hugging Face `config.json` (old `rope_scaling`/`rope_theta` and new `rope_parameters`
spellings) or a named preset with random weights, so the rest of the engine sees one normalised shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

# Shapes of well-known checkpoints, used with random weights for benchmarks and demos (SPEC §2).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=260,  # 256 bytes + <s> </s> <pad> <unk> of the byte-level tokenizer
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=257,
        torch_dtype="float32",
    ),
    "llama-2-7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float16",
    ),
    "llama-2-13b": dict(
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float16",
    ),
    "llama-3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        bos_token_id=128000,
        eos_token_id=128001,
        torch_dtype="bfloat16",
    ),
}

KV_LAYOUTS = ("layer-major", "block-major")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """The architecture of one Llama-family checkpoint, normalised from config.json or a preset."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "llama3"|"linear"|"default", ...}
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str
    model_dir: str | None  # None for presets (random weights, byte-level tokenizer)
    name: str

    @classmethod
    def from_dict(cls, raw: dict[str, Any], model_dir: str | None, name: str) -> ModelConfig:
        arch = raw.get("architectures") or ["LlamaForCausalLM"]
        model_type = raw.get("model_type", "llama")
        if model_type not in ("llama", "mistral") and "LlamaForCausalLM" not in arch:
            raise ValueError(
                f"model {name!r} has model_type {model_type!r} ({arch}); only the Llama family "
                "(model_type 'llama' or 'mistral') is supported"
            )
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope_params = dict(raw.get("rope_parameters") or {})
        rope_theta = float(rope_params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = raw.get("rope_scaling") or rope_params or None
        if scaling is not None:
            scaling = dict(scaling)
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            scaling["rope_type"] = rope_type
            if rope_type not in ("default", "llama3", "linear"):
                raise ValueError(
                    f"rope type {rope_type!r} is not supported; use 'default', 'linear' or 'llama3'"
                )
            if rope_type == "default":
                scaling = None
        eos = raw.get("eos_token_id")
        eos_ids = (
            [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
        )
        if raw.get("mlp_bias") or raw.get("attention_bias"):
            raise ValueError("Llama checkpoints with attention_bias/mlp_bias are not supported")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            model_dir=model_dir,
            name=name,
        )

    @classmethod
    def load(cls, model: str) -> ModelConfig:
        """A preset name (see PRESETS) or a Hugging Face directory holding config.json."""
        if model in PRESETS:
            return cls.from_dict(dict(PRESETS[model]), None, model)
        path = os.path.join(model, "config.json")
        if not os.path.isfile(path):
            raise ValueError(
                f"model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a directory "
                "with a config.json"
            )
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        gen_path = os.path.join(model, "generation_config.json")
        config = cls.from_dict(raw, model, os.path.basename(os.path.normpath(model)))
        if os.path.isfile(gen_path):
            with open(gen_path, encoding="utf-8") as f:
                gen_eos = json.load(f).get("eos_token_id")
            extra = [] if gen_eos is None else ([gen_eos] if isinstance(gen_eos, int) else gen_eos)
            config.eos_token_ids += [int(e) for e in extra if int(e) not in config.eos_token_ids]
        return config


@dataclass
class EngineConfig:
    """Everything LLMEngine needs; field names match the CLI flags (`--block-size` → block_size)."""

    model: str = "tiny"
    tokenizer: str | None = None  # directory with tokenizer.json; default: the model directory
    load_format: str = "auto"  # auto | safetensors | dummy (random weights for any config)
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's half type (bf16 default) on GPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit pool size; overrides the two sizings below
    kv_cache_gb: float = 1.0  # CPU: bytes of KV cache
    gpu_memory_utilization: float = (
        0.9  # GPU: fraction of device memory for weights + activations + KV
    )
    kv_layout: str = "layer-major"  # layer-major | block-major (--use-agg-block)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_chunked_prefill: bool = True
    enable_radix_caching: bool = False
    # --enable-radix-evictor: after each step, when more than the high watermark of the KV pool is
    # used (in use + cached), drop least-recently-used cached prefixes down to the low watermark
    enable_radix_evictor: bool = False
    evictor_high_watermark: float = 0.9
    evictor_low_watermark: float = 0.7
    # --enable-trans-to-dram: a second, host-memory tier for cached prefixes (pinned on GPU machines)
    enable_host_tier: bool = False
    host_kv_cache_gb: float = 1.0
    num_host_kv_blocks: int | None = None  # explicit host pool size; overrides host_kv_cache_gb
    # --tensor-parallel-size: ranks (one process each; rank 0 in the engine's process), one GPU each on CUDA
    tensor_parallel_size: int = 1
    # GPU fast path (issue 5). attention_backend: auto (triton on CUDA when Triton is installed, else
    # torch) | torch | triton. enforce_eager: no CUDA graphs for decode. fused_ops / small_batch_gemv:
    # the fused elementwise Triton kernels and the decode GEMV (used with the triton backend only).
    # pdl: launch those kernels with programmatic dependent launch where supported (sm90+, ops/pdl.py).
    attention_backend: str = "auto"
    enforce_eager: bool = False
    fused_ops: bool = True
    small_batch_gemv: bool = True
    pdl: bool = True
    cuda_graph_max_batch_size: int = (
        128  # decode batches up to min(this, max_num_seqs) replay graphs
    )
    # steps with prompt chunks of at most this many tokens in all (and max_num_batched_tokens) replay
    # graphs of their own, one row per token, while their attention tiles read little KV
    # (cuda_graph.py). 0: such steps run eagerly
    cuda_graph_max_prefill_tokens: int = 512
    # --worker-use-ray: start the workers as Ray tasks (Ray must be installed) instead of multiprocessing
    worker_use_ray: bool = False
    # tensor parallelism on GPUs of one machine: the model's all-reduce / logits gather go through the
    # IPC collectives (engine/ipc_collectives.py), which decode CUDA graphs capture; off
    # (--disable-custom-all-reduce): NCCL only, and decode at TP > 1 runs eagerly
    custom_all_reduce: bool = True

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(
                f"attention_backend must be one of auto, torch, triton; got {self.attention_backend!r}"
            )
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_seqs ({self.max_num_seqs}) and max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= 1"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.enable_host_tier and not self.enable_radix_caching:
            raise ValueError(
                "enable_host_tier needs enable_radix_caching (the host tier holds cached prefixes)"
            )
        if self.enable_radix_evictor and not self.enable_radix_caching:
            raise ValueError(
                "enable_radix_evictor needs enable_radix_caching (it evicts cached prefixes)"
            )
        if not 0.0 < self.evictor_low_watermark < self.evictor_high_watermark <= 1.0:
            raise ValueError(
                f"need 0 < evictor_low_watermark ({self.evictor_low_watermark}) < "
                f"evictor_high_watermark ({self.evictor_high_watermark}) <= 1"
            )
        if self.cuda_graph_max_prefill_tokens < 0:
            raise ValueError(
                "cuda_graph_max_prefill_tokens must be >= 0 (0: prompt chunks run eagerly), got "
                f"{self.cuda_graph_max_prefill_tokens}"
            )
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be an int >= 1, got {self.tensor_parallel_size!r}"
            )
