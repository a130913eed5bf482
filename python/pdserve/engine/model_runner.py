"""Owns the device side of one engine rank: the model weights, the paged KV cache tensor (DESIGN §2),
and one forward + sample per scheduled batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.attention import AttentionMetadata, triton_attention_available
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.loader import init_dummy, load_safetensors
from pdserve.engine.model import LlamaForCausalLM
from pdserve.engine.sampler import sample
from pdserve.engine.scheduler import ScheduledBatch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class KVLayout:
    """Where the piece of (layer l, block b) lives: base_addr + l*layer_stride_nbytes + b*block_stride_nbytes,
    piece_nbytes long (K then V, each [block_size, num_kv_heads, head_dim])."""

    base_addr: int
    nbytes: int
    num_layers: int
    num_blocks: int
    piece_nbytes: int
    layer_stride_nbytes: int
    block_stride_nbytes: int
    device: str
    layout: str = "layer-major"
    block_size: int = 16
    num_kv_heads: int = 1
    head_dim: int = 1
    dtype: str = "float32"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} requested but no CUDA device is available; use device='cpu'"
        )
    return device


def resolve_dtype(name: str, device: torch.device, model_config: ModelConfig) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if model_config.torch_dtype == "float16" else torch.bfloat16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda":
            # cuDNN's SDPA builds a plan per new shape (hundreds of ms each); every prompt length is
            # a new shape here, so use the flash / memory-efficient kernels, which need no plans
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.dtype = resolve_dtype(config.dtype, self.device, model_config)
        self.block_size = config.block_size
        self.attention_backend = self._pick_attention_backend()
        fast = self.attention_backend == "triton"
        from pdserve.ops.linear import set_small_batch_gemv

        set_small_batch_gemv(
            fast and config.small_batch_gemv
        )  # process-wide: the last engine decides
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(
                model_config,
                attention_backend=self.attention_backend,
                fused_ops=fast and config.fused_ops,
            )
        self.model.eval()
        use_dummy = config.load_format == "dummy" or model_config.model_dir is None
        if use_dummy:
            init_dummy(self.model, config.seed)
        else:
            load_safetensors(self.model, model_config.model_dir)
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.num_blocks = self._num_kv_blocks()
        self.kv_cache, self.kv_layers = self._allocate_kv_cache(self.num_blocks)
        self.decode_graphs = self._capture_decode_graphs() if fast else None
        self.num_host_blocks = 0
        self.host_kv_cache: torch.Tensor | None = None
        if config.enable_host_tier:
            self.num_host_blocks = config.num_host_kv_blocks or max(
                1,
                int(config.host_kv_cache_gb * (1 << 30))
                // (self.piece_nbytes * model_config.num_hidden_layers),
            )
            self.host_kv_cache = torch.empty(
                self.kv_cache.shape[:1] + (self.num_host_blocks,) + self.kv_cache.shape[2:]
                if config.kv_layout == "layer-major"
                else (self.num_host_blocks,) + self.kv_cache.shape[1:],
                dtype=self.dtype,
                pin_memory=self.device.type == "cuda",
            )

    # ---- GPU fast path (issue 5) --------------------------------------------------------------
    def _pick_attention_backend(self) -> str:
        wanted = self.config.attention_backend
        available = triton_attention_available(self.device, self.model_config.head_dim)
        if wanted == "triton" and not available:
            raise ValueError(
                f"attention_backend='triton' needs a CUDA device, Triton and head_dim in 16..256 (a power "
                f"of two); got device {self.device}, head_dim {self.model_config.head_dim}"
            )
        if (
            wanted == "auto"
        ):  # fp32 (a testing dtype) keeps the exact torch path: Triton dots are tf32
            half = self.dtype in (torch.bfloat16, torch.float16)
            return "triton" if available and half else "torch"
        return wanted

    def _capture_decode_graphs(self):
        if self.config.enforce_eager:
            return None
        from pdserve.engine.cuda_graph import DecodeGraphs, capture_sizes

        mc = self.model_config
        max_model_len = min(
            self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        max_bs = min(self.config.cuda_graph_max_batch_size, self.config.max_num_seqs)
        return DecodeGraphs(
            self.model,
            self.kv_layers,
            self.block_size,
            max_model_len,
            capture_sizes(max_bs),
            self.device,
        )

    # ---- KV cache -----------------------------------------------------------------------------
    @property
    def piece_nbytes(self) -> int:
        """Bytes of one block in one layer (K and V)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.model_config.head_dim * itemsize

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_nbytes = self.piece_nbytes * self.model_config.num_hidden_layers
        if self.device.type == "cpu":
            return max(1, int(self.config.kv_cache_gb * (1 << 30)) // block_nbytes)
        return max(1, self._profile_free_gpu_nbytes() // block_nbytes)

    @torch.inference_mode()
    def _profile_free_gpu_nbytes(self) -> int:
        """Device bytes left for KV after weights and the activations of a full-budget forward."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(
            self.config.max_num_batched_tokens, self.model_config.max_position_embeddings
        )
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        hidden = self.model(ids, pos, None, None)
        self.model.compute_logits(hidden[-min(num_tokens, self.config.max_num_seqs) :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        allocated = torch.cuda.memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = (
            int(total * self.config.gpu_memory_utilization) - (total - free) - (peak - allocated)
        )
        if budget <= 0:
            raise ValueError(
                f"no device memory left for the KV cache: {total / 2**30:.1f} GiB total, "
                f"{(total - free) / 2**30:.1f} GiB in use, activations {(peak - allocated) / 2**30:.1f} GiB "
                f"at gpu_memory_utilization={self.config.gpu_memory_utilization}"
            )
        return budget

    def _allocate_kv_cache(self, num_blocks: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mc = self.model_config
        piece = (2, self.block_size, self.num_kv_heads, mc.head_dim)
        # zeroed on GPU so padded reads see finite values; on CPU untouched pages stay uncommitted
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        if self.config.kv_layout == "layer-major":
            kv = alloc(
                (mc.num_hidden_layers, num_blocks, *piece), dtype=self.dtype, device=self.device
            )
            layers = [kv[layer] for layer in range(mc.num_hidden_layers)]
        else:
            kv = alloc(
                (num_blocks, mc.num_hidden_layers, *piece), dtype=self.dtype, device=self.device
            )
            layers = [kv[:, layer] for layer in range(mc.num_hidden_layers)]
        return kv, layers

    def copy_blocks(
        self, src_block_ids: list[int], dst_block_ids: list[int], to_host: bool
    ) -> None:
        """Copies whole blocks (all layers) between the device KV cache and the host tier; synchronous."""
        src, dst = (
            (self.kv_cache, self.host_kv_cache) if to_host else (self.host_kv_cache, self.kv_cache)
        )
        dim = 1 if self.config.kv_layout == "layer-major" else 0
        src_idx = torch.tensor(src_block_ids, dtype=torch.long, device=src.device)
        dst_idx = torch.tensor(dst_block_ids, dtype=torch.long, device=dst.device)
        dst.index_copy_(dim, dst_idx, src.index_select(dim, src_idx).to(dst.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def kv_layout(self) -> KVLayout:
        piece = self.piece_nbytes
        num_layers = self.model_config.num_hidden_layers
        layer_major = self.config.kv_layout == "layer-major"
        return KVLayout(
            base_addr=self.kv_cache.data_ptr(),
            nbytes=self.kv_cache.numel() * self.kv_cache.element_size(),
            num_layers=num_layers,
            num_blocks=self.num_blocks,
            piece_nbytes=piece,
            layer_stride_nbytes=self.num_blocks * piece if layer_major else piece,
            block_stride_nbytes=piece if layer_major else num_layers * piece,
            device=str(self.device),
            layout=self.config.kv_layout,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.model_config.head_dim,
            dtype=str(self.dtype).removeprefix("torch."),
        )

    # ---- one step -----------------------------------------------------------------------------
    def _prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start : start + n])
            span = range(start, start + n)
            positions.extend(span)
            slot_blocks.extend(seq.block_ids[t // bs] for t in span)
            slot_offsets.extend(t % bs for t in span)
            query_start_loc.append(query_start_loc[-1] + n)
            context_lens.append(start + n)
            if batch.samples(i):
                sample_rows.append(query_start_loc[-1] - 1)
        max_blocks = max(-(-c // bs) for c in context_lens)
        tables = [
            seq.block_ids[:max_blocks] + [0] * (max_blocks - len(seq.block_ids[:max_blocks]))
            for seq in batch.seqs
        ]
        # one host->device copy for every index tensor of the step
        num_tokens, num_seqs = len(input_ids), len(batch.seqs)
        flat = input_ids + positions + slot_blocks + slot_offsets + context_lens + sample_rows
        for row in tables:
            flat.extend(row)
        packed = torch.tensor(flat, dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        sizes = [num_tokens] * 4 + [num_seqs, len(sample_rows), num_seqs * max_blocks]
        ids_t, pos_t, blocks_t, offsets_t, ctx_t, rows_t, tables_t = packed.split(sizes)
        meta = AttentionMetadata(
            slot_block_ids=blocks_t,
            slot_offsets=offsets_t,
            block_tables=tables_t.view(num_seqs, max_blocks),
            context_lens=ctx_t,
            query_start_loc=query_start_loc,
            context_lens_host=context_lens,
            block_size=bs,
            is_decode_only=all(n == 1 for n in batch.num_new_tokens),
        )
        return ids_t, pos_t, meta, rows_t

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int], None] | None = None
    ) -> list[int | None]:
        """Runs the batch; returns the sampled token of each sequence that reached its end (else None)."""
        sampling = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        graphs = self.decode_graphs
        if graphs is not None and after_layer is None and graphs.can_run(batch):
            logits = graphs.run(batch)  # decode step replayed from a CUDA graph
            if len(sampling) != len(batch.seqs):
                logits = logits[sampling]
        else:
            input_ids, positions, meta, sample_rows = self._prepare(batch)
            hidden = self.model(input_ids, positions, self.kv_layers, meta, after_layer)
            if sample_rows.numel() == 0:
                return [None] * len(batch.seqs)
            logits = self.model.compute_logits(hidden[sample_rows])
        if not sampling:
            return [None] * len(batch.seqs)
        tokens = sample(
            logits,
            [batch.seqs[i].params for i in sampling],
            [batch.seqs[i].num_output_tokens for i in sampling],
        )
        result: list[int | None] = [None] * len(batch.seqs)
        for i, token in zip(sampling, tokens, strict=True):
            result[i] = token
        return result

    @torch.inference_mode()
    def logits_for(self, batch: ScheduledBatch) -> torch.Tensor:
        """Test helper: the fp32 logits [num_sampling_seqs, vocab] the batch would sample from."""
        input_ids, positions, meta, sample_rows = self._prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_layers, meta)
        return self.model.compute_logits(hidden[sample_rows])
