"""Owns the device side of one engine rank: the model weights, the paged KV cache tensor (DESIGN §2),
and one forward + sample per scheduled batch.

A step is split in two so tensor parallelism can ship it: `prepare_inputs(batch)` turns the scheduled
batch into host lists (StepInputs, picklable, built once by the driver) and `execute(inputs)` runs them
on this rank; only rank 0 samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from pdserve.engine import distributed
from pdserve.engine.attention import AttentionMetadata, triton_attention_available
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.loader import init_dummy, init_dummy_sharded, load_safetensors
from pdserve.engine.model import LlamaForCausalLM
from pdserve.engine.sampler import Sampled, prompt_logprobs, sample_graph_rows, sample_rows
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.engine.step_inputs import StepInputs, build_step_inputs, penalised_outputs
from pdserve.kv_layout import KVLayout

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kv_budget_nbytes(
    total_nbytes: int,
    free_nbytes: int,
    gpu_memory_utilization: float,
    peak_nbytes: int,
    allocated_nbytes: int,
    margin_nbytes: int = 256 << 20,
) -> int:
    """Device bytes this instance may give its KV cache.

    `gpu_memory_utilization` is this instance's share of the device (as in vLLM): its weights, its
    activation peak and its KV cache together stay under `total * utilization`, whatever other processes
    hold, so two instances at 0.3 share one GPU. The budget is also capped by what is free right now
    (less the activation peak still to come and a margin). `peak_nbytes` / `allocated_nbytes`: this
    process's torch peak during a full-budget forward and its allocation after it (weights).
    Raises ValueError when nothing is left."""
    activations = max(0, peak_nbytes - allocated_nbytes)
    share = int(total_nbytes * gpu_memory_utilization) - peak_nbytes
    available = free_nbytes - activations - margin_nbytes
    budget = min(share, available)
    if budget <= 0:
        raise ValueError(
            f"no device memory left for the KV cache: {total_nbytes / 2**30:.1f} GiB total, "
            f"{free_nbytes / 2**30:.1f} GiB free, this instance's weights {allocated_nbytes / 2**30:.1f} GiB "
            f"and activations {activations / 2**30:.1f} GiB at gpu_memory_utilization="
            f"{gpu_memory_utilization}; raise --gpu-memory-utilization or free device memory"
        )
    return budget


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
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        tp_group: distributed.TPGroup | None = None,
    ):
        """tp_group: this rank's tensor-parallel group (None: one rank). With a group, the model holds
        this rank's shard and its device is the group's; build it inside distributed.use_group(tp_group)."""
        self.config = config
        self.model_config = model_config
        self.tp_group = tp_group
        self.tp_size = tp_group.world_size if tp_group is not None else 1
        self.tp_rank = tp_group.rank if tp_group is not None else 0
        self.device = tp_group.device if tp_group is not None else resolve_device(config.device)
        if self.device.type == "cuda":
            # cuDNN's SDPA builds a plan per new shape (hundreds of ms each); every prompt length is
            # a new shape here, so use the flash / memory-efficient kernels, which need no plans
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.dtype = resolve_dtype(config.dtype, self.device, model_config)
        self.block_size = config.block_size
        self.attention_backend = self._pick_attention_backend()
        fast = self.attention_backend == "triton"
        from pdserve.ops.linear import set_small_batch_gemv
        from pdserve.ops.pdl import pdl_supported, set_pdl

        # process-wide switches: the last engine built decides
        set_small_batch_gemv(fast and config.small_batch_gemv)
        set_pdl(fast and config.pdl and pdl_supported(self.device))
        with torch.device(self.device), _default_dtype(self.dtype):
            self.model = LlamaForCausalLM(
                model_config,
                self.tp_size,
                self.tp_rank,
                attention_backend=self.attention_backend,
                fused_ops=fast and config.fused_ops,
            )
        self.model.eval()
        use_dummy = config.load_format == "dummy" or model_config.model_dir is None
        if use_dummy and self.tp_size > 1:
            # the unsharded model's shapes (meta: no memory); each rank slices the same random weights
            with torch.device("meta"), _default_dtype(self.dtype):
                full_model = LlamaForCausalLM(model_config)
            init_dummy_sharded(self.model, full_model, config.seed)
        elif use_dummy:
            init_dummy(self.model, config.seed)
        else:
            load_safetensors(self.model, model_config.model_dir)
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        if tp_group is not None and self.device.type == "cuda" and config.custom_all_reduce:
            tp_group.enable_ipc(self._ipc_capacity_nbytes())  # before sizing KV: it takes memory
        self.num_blocks = self._num_kv_blocks()
        if tp_group is not None:  # every rank holds the same block ids: the smallest pool wins
            self.num_blocks = tp_group.min_int(self.num_blocks)
        self.kv_cache, self.kv_layers = self._allocate_kv_cache(self.num_blocks)
        # at TP > 1 the graphs capture the IPC collectives (NCCL collectives are never captured)
        graphs_ok = self.tp_size == 1 or tp_group.ipc is not None
        self.decode_graphs = self._capture_decode_graphs() if fast and graphs_ok else None
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

    def _ipc_capacity_nbytes(self) -> int:
        """Bytes of one IPC buffer half: what the largest decode graph all-reduces (hidden states) or
        gathers (its logits slice) in one call, at least 8 MiB; larger eager tensors go to NCCL."""
        mc = self.model_config
        max_decode_rows, max_prefill_rows = self._graph_rows()
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        # decode graphs gather their logits slices; prompt-chunk graphs all-reduce hidden states only
        decode = max_decode_rows * max(mc.hidden_size, -(-mc.vocab_size // self.tp_size))
        prefill = max_prefill_rows * mc.hidden_size
        mib = 1 << 20
        return max(8 * mib, -(-max(decode, prefill) * itemsize // mib) * mib)

    def _capture_decode_graphs(self):
        if self.config.enforce_eager:
            return None
        from pdserve.engine.cuda_graph import DecodeGraphs

        mc = self.model_config
        max_model_len = min(
            self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        max_decode_rows, max_prefill_rows = self._graph_rows()
        return DecodeGraphs(
            self.model,
            self.kv_layers,
            self.block_size,
            max_model_len,
            max_decode_rows,
            self.device,
            max_prefill_tokens=max_prefill_rows,
            num_kv_heads=max(1, mc.num_key_value_heads // self.tp_size),
            group=mc.num_attention_heads // mc.num_key_value_heads,
            head_dim=mc.head_dim,
        )

    def _graph_rows(self) -> tuple[int, int]:
        """(most rows of a decode-only step, most rows of a step with prompt chunks) that replay a
        graph: a step never holds more sequences or tokens than the scheduler's budgets."""
        c = self.config
        max_decode_rows = min(c.cuda_graph_max_batch_size, c.max_num_seqs)
        return max_decode_rows, min(c.cuda_graph_max_prefill_tokens, c.max_num_batched_tokens)

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
        return kv_budget_nbytes(
            total,
            free,
            self.config.gpu_memory_utilization,
            peak_nbytes=peak,
            allocated_nbytes=allocated,
        )

    def _new_kv_tensor(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The KV cache tensor (tensor-parallel workers override it to share it with the driver)."""
        # zeroed on GPU so padded reads see finite values; on CPU untouched pages stay uncommitted
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        return alloc(shape, dtype=self.dtype, device=self.device)

    def _allocate_kv_cache(self, num_blocks: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mc = self.model_config
        piece = (2, self.block_size, self.num_kv_heads, mc.head_dim)
        if self.config.kv_layout == "layer-major":
            kv = self._new_kv_tensor((mc.num_hidden_layers, num_blocks, *piece))
            layers = [kv[layer] for layer in range(mc.num_hidden_layers)]
        else:
            kv = self._new_kv_tensor((num_blocks, mc.num_hidden_layers, *piece))
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

    def kv_layouts(self) -> list[KVLayout]:
        """One layout per tensor-parallel rank; a single rank has one."""
        return [self.kv_layout()]

    def rank_kv_caches(self) -> list[torch.Tensor]:
        """One KV tensor per tensor-parallel rank; a single rank has one."""
        return [self.kv_cache]

    def kv_layout(self) -> KVLayout:
        """Where this rank's KV pieces live (DESIGN §2): the transfer engine's layout of `kv_cache`."""
        return KVLayout.from_tensor(self.kv_cache, self.config.kv_layout)

    # ---- one step -----------------------------------------------------------------------------
    def prepare_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """The batch as host lists (no torch): what execute() needs on every rank."""
        return build_step_inputs(batch, self.block_size)

    def _prepare(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        # one host->device copy for every index tensor of the step
        num_tokens, num_seqs = len(inputs.input_ids), inputs.num_seqs
        max_blocks = len(inputs.block_tables[0])
        flat = (
            inputs.input_ids
            + inputs.positions
            + inputs.slot_blocks
            + inputs.slot_offsets
            + inputs.context_lens
            + inputs.sample_rows
        )
        for row in inputs.block_tables:
            flat.extend(row)
        packed = torch.tensor(flat, dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        sizes = [num_tokens] * 4 + [num_seqs, len(inputs.sample_rows), num_seqs * max_blocks]
        ids_t, pos_t, blocks_t, offsets_t, ctx_t, rows_t, tables_t = packed.split(sizes)
        meta = AttentionMetadata(
            slot_block_ids=blocks_t,
            slot_offsets=offsets_t,
            block_tables=tables_t.view(num_seqs, max_blocks),
            context_lens=ctx_t,
            query_start_loc=inputs.query_start_loc,
            context_lens_host=inputs.context_lens,
            block_size=self.block_size,
            is_decode_only=inputs.is_decode_only,
        )
        return ids_t, pos_t, meta, rows_t

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, after_layer: Callable[[int | None], None] | None = None
    ) -> Sampled:
        """Runs the batch; returns the sampled token of each sequence that reached its end (else None),
        with its log-probabilities where asked.
        after_layer(layer_idx) fires once each layer's KV is written; a step replayed from a CUDA
        graph calls after_layer(None) once instead, when every layer's is (queued on this stream)."""
        graphs = self.decode_graphs
        if (
            graphs is not None
            and not any(seq.wants_prompt_logprobs for seq in batch.seqs)
            and graphs.can_run(batch)
        ):
            return self._run_graph(graphs, batch, after_layer)
        return self.execute(self.prepare_inputs(batch), after_layer)

    def _run_graph(
        self, graphs, batch: ScheduledBatch, after_layer: Callable[[int | None], None] | None
    ) -> Sampled:
        """A batch replayed from a CUDA graph on a single rank (straight from the batch: no
        StepInputs); samples on the host side as `execute` does."""
        bs = graphs.prepare(batch)
        out = graphs.replay(bs)  # even when nothing samples: the step writes its tokens' KV
        if after_layer is not None:
            after_layer(None)
        seq_indices, rows = [], []
        row = -1
        for i, n in enumerate(batch.num_new_tokens):
            row += n
            if batch.samples(i):
                seq_indices.append(i)
                rows.append(row)
        logits, rows = self._graph_logits(graphs, bs, out, rows)
        return sample_graph_rows(
            logits,
            len(batch.seqs),
            seq_indices,
            rows,
            [batch.seqs[i].params for i in seq_indices],
            [batch.seqs[i].output_position for i in seq_indices],
            penalised_outputs([batch.seqs[i] for i in seq_indices]),
        )

    def _execute_graph(
        self, inputs: StepInputs, after_layer: Callable[[int | None], None] | None
    ) -> Sampled:
        """execute() through the graphs; every tensor-parallel rank replays (the graph holds the
        collectives), rank 0 samples."""
        graphs = self.decode_graphs
        bs = graphs.prepare_inputs(inputs)
        out = graphs.replay(bs)
        if after_layer is not None:
            after_layer(None)
        # every rank: computing logits outside the graph gathers them
        logits, rows = self._graph_logits(graphs, bs, out, inputs.sample_rows)
        if self.tp_rank != 0:
            return Sampled([None] * inputs.num_seqs)
        return sample_graph_rows(
            logits,
            inputs.num_seqs,
            inputs.sample_seq_indices,
            rows,
            inputs.sampling_params,
            inputs.output_positions,
            inputs.output_token_ids,
        )

    def _graph_logits(
        self, graphs, bs: int, out: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """(logits, rows to sample in them) from a replay's output: the graph's own logits, or those
        of `rows` computed from its hidden states (sizes past the decode graphs')."""
        if graphs.ends_with_logits(bs) or not rows:
            return out, rows
        idx = torch.tensor(rows, dtype=torch.long).to(out.device, non_blocking=True)
        return self.model.compute_logits(out.index_select(0, idx)), list(range(len(rows)))

    def graph_eligible(self, inputs: StepInputs) -> bool:
        """True when a graph can run these inputs (see DecodeGraphs.fits)."""
        graphs = self.decode_graphs
        if graphs is None or inputs.prompt_logprob_rows:  # those need every row's logits
            return False
        if inputs.is_decode_only:
            return graphs.fits(inputs.num_seqs)
        qsl = inputs.query_start_loc
        starts = [inputs.positions[qsl[i]] for i in range(inputs.num_seqs)]
        counts = [qsl[i + 1] - qsl[i] for i in range(inputs.num_seqs)]
        return graphs.fits(len(inputs.input_ids), graphs.kv_reads(starts, counts))

    @torch.inference_mode()
    def execute(
        self, inputs: StepInputs, after_layer: Callable[[int | None], None] | None = None
    ) -> Sampled:
        """Runs prepared inputs on this rank (replaying a graph when inputs.use_graph; after_layer as
        in `run`). Rank 0 returns one token or None per sequence; other tensor-parallel ranks take
        part in the collectives and return all None."""
        if inputs.use_graph:
            return self._execute_graph(inputs, after_layer)
        input_ids, positions, meta, sample_idx = self._prepare(inputs)
        hidden = self.model(input_ids, positions, self.kv_layers, meta, after_layer)
        prompt_lps = prompt_logprobs(
            self.model.compute_logits,
            hidden,
            inputs.prompt_logprob_rows,
            inputs.prompt_logprob_targets,
            inputs.prompt_logprob_seq_indices,
            inputs.prompt_logprob_ks,
            self.tp_rank == 0,
        )
        if sample_idx.numel() == 0:
            return Sampled([None] * inputs.num_seqs, prompt_logprobs=prompt_lps)
        logits = self.model.compute_logits(hidden[sample_idx])  # full width on rank 0 only
        if self.tp_rank != 0:
            return Sampled([None] * inputs.num_seqs)
        sampled = sample_rows(
            logits,
            inputs.num_seqs,
            inputs.sample_seq_indices,
            inputs.sampling_params,
            inputs.output_positions,
            inputs.output_token_ids,
        )
        sampled.prompt_logprobs = prompt_lps
        return sampled

    @torch.inference_mode()
    def logits_for(self, batch: ScheduledBatch) -> torch.Tensor:
        """Test helper: the fp32 logits [num_sampling_seqs, vocab] the batch would sample from."""
        input_ids, positions, meta, sample_idx = self._prepare(self.prepare_inputs(batch))
        hidden = self.model(input_ids, positions, self.kv_layers, meta)
        return self.model.compute_logits(hidden[sample_idx])
