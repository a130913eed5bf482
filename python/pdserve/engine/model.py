"""The Llama-family decoder (Llama 2 MHA, Llama 3 / Mistral GQA) over a paged KV cache.

`forward` takes flattened tokens of a whole batch (prefill chunks and decode tokens mixed) and calls
`after_layer(layer_idx)` right after each layer's KV is written, which is where layer-wise transfer hooks in.

`attention_backend="triton"` (GPU, issue 5) selects the Triton attention path (RoPE fused with the KV
write); `fused_ops=True` adds the fused residual-add + RMSNorm and SiLU*mul kernels. The torch path is the
reference and the CPU path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pdserve.engine.attention import (
    AttentionMetadata,
    TorchPagedAttention,
    TritonPagedAttention,
    causal_attention_no_cache,
)
from pdserve.engine.config import ModelConfig
from pdserve.engine.layers import (
    ColumnParallelLinear,  # noqa: F401  (re-exported for kernels/TP code)
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from pdserve.ops.linear import linear_partials


class _RopeTable:
    """[max_position, head_dim] fp32 table (cos of the head_dim/2 frequencies, then their sin) that the
    fused RoPE kernel reads; built once from the rotary buffers on first use and shared by all layers."""

    def __init__(self, rotary: RotaryEmbedding):
        self.rotary = rotary
        self.table: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        cos = self.rotary.cos_cached
        if self.table is None or self.table.device != cos.device:
            half = cos.shape[1] // 2
            self.table = torch.cat(
                [cos[:, :half], self.rotary.sin_cached[:, :half]], 1
            ).contiguous()
        return self.table


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        tp_size: int,
        tp_rank: int,
        rope_table: _RopeTable | None = None,
    ):
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            tp_size,
            tp_rank,
        )
        self.num_heads = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_rank
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, tp_size, tp_rank
        )
        self.rotary = rotary
        # set by a fused decoder layer: o_proj may return unreduced split-K partials (tp_size 1 only:
        # with tensor parallelism the all-reduce needs the reduced sum)
        self.partial_out = False
        if rope_table is not None:
            self.attn = TritonPagedAttention(
                self.num_heads, self.num_kv_heads, self.head_dim, rope_table
            )
        else:
            self.attn = TorchPagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        hidden: torch.Tensor,
        kv_layer: torch.Tensor | None,
        meta: AttentionMetadata | None,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(hidden)
        if kv_layer is not None and getattr(self.attn, "fuses_rope", False):
            q = qkv[:, :q_size].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, q_size : q_size + kv_size].view(num_tokens, self.num_kv_heads, self.head_dim)
            v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
            return self._o_proj(self.attn.forward(q, k, v, kv_layer, meta))
        # q and k rotated together: one set of RoPE kernels for both
        qk = self.rotary(cos_sin, qkv[:, : q_size + kv_size].view(num_tokens, -1, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if kv_layer is None:  # profiling run without a cache: one causal sequence
            out = causal_attention_no_cache(q, k, v, self.attn.scale)
        else:
            out = self.attn.forward(q, k, v, kv_layer, meta)
        return self._o_proj(out)

    def _o_proj(self, x: torch.Tensor) -> torch.Tensor:
        if self.partial_out:  # split-K partials go unreduced to the next add+RMSNorm kernel
            return linear_partials(x, self.o_proj.weight)
        return self.o_proj(x)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp_size: int, tp_rank: int, fused_ops: bool = False):
        super().__init__()
        self.fused_ops = fused_ops
        self.partial_out = False  # see LlamaAttention.partial_out
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], tp_size, tp_rank
        )
        self.down_proj = RowParallelLinear(inter, config.hidden_size, tp_size, tp_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops:
            from pdserve.ops.fused import silu_and_mul

            act = silu_and_mul(self.gate_up_proj(x))
            if self.partial_out:
                return linear_partials(act, self.down_proj.weight)
            return self.down_proj(act)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        rotary: RotaryEmbedding,
        tp_size: int,
        tp_rank: int,
        rope_table: _RopeTable | None = None,
        fused_ops: bool = False,
    ):
        super().__init__()
        self.fused_ops = fused_ops
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary, tp_size, tp_rank, rope_table)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config, tp_size, tp_rank, fused_ops)
        if fused_ops and tp_size == 1:
            self.self_attn.partial_out = self.mlp.partial_out = True

    def forward(self, cos_sin, hidden, kv_layer, meta) -> torch.Tensor:
        hidden = hidden + self.self_attn(cos_sin, self.input_layernorm(hidden), kv_layer, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def forward_fused(
        self, cos_sin, delta: torch.Tensor, residual: torch.Tensor | None, kv_layer, meta
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual-stream form: the layer input is residual + delta (residual None: delta alone).
        Returns (this layer's delta, the residual stream before it); the add rides in the norm kernel."""
        from pdserve.ops.fused import add_rms_norm

        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        x, residual = add_rms_norm(delta, norm1.weight, norm1.eps, residual)
        attn = self.self_attn(cos_sin, x, kv_layer, meta)
        x, residual = add_rms_norm(attn, norm2.weight, norm2.eps, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        tp_size: int,
        tp_rank: int,
        attention_backend: str = "torch",
        fused_ops: bool = False,
    ):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_size, tp_rank
        )
        # one rotary table shared by all layers (a buffer, so it follows .to(device))
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        if attention_backend not in ("torch", "triton"):
            raise ValueError(
                f"attention_backend must be 'torch' or 'triton', got {attention_backend!r}"
            )
        rope_table = _RopeTable(self.rotary) if attention_backend == "triton" else None
        self.fused_ops = fused_ops
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, tp_size, tp_rank, rope_table, fused_ops)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Checkpoint names map onto fused parameters through `packed_modules`:
    checkpoint sub-name -> (our sub-name, shard id)."""

    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        config: ModelConfig,
        tp_size: int = 1,
        tp_rank: int = 0,
        attention_backend: str = "torch",
        fused_ops: bool = False,
    ):
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.model = LlamaModel(config, tp_size, tp_rank, attention_backend, fused_ops)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_size, tp_rank)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_layers: list[torch.Tensor] | None,
        meta: AttentionMetadata | None,
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """input_ids/positions [T] int64 -> hidden states [T, hidden] (final norm applied).

        kv_layers[l] is layer l's cache view [num_blocks, 2, block_size, KVH, D]; None for profiling.
        """
        hidden = self.model.embed_tokens(input_ids)
        if meta is not None:
            meta.positions = positions
        # the Triton backend rotates inside its KV-write kernel; the table gather is only for torch
        fused_rope = kv_layers is not None and self.attention_backend == "triton"
        cos_sin = None if fused_rope else self.model.rotary.cos_sin(positions, hidden.dtype)
        if self.model.fused_ops:
            residual = None
            for layer_idx, layer in enumerate(self.model.layers):
                kv_layer = None if kv_layers is None else kv_layers[layer_idx]
                hidden, residual = layer.forward_fused(cos_sin, hidden, residual, kv_layer, meta)
                if after_layer is not None:
                    after_layer(layer_idx)
            from pdserve.ops.fused import add_rms_norm

            norm = self.model.norm
            return add_rms_norm(hidden, norm.weight, norm.eps, residual)[0]
        for layer_idx, layer in enumerate(self.model.layers):
            hidden = layer(
                cos_sin, hidden, None if kv_layers is None else kv_layers[layer_idx], meta
            )
            if after_layer is not None:
                after_layer(layer_idx)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> logits [N, vocab] in fp32."""
        return self.lm_head(hidden).float()
