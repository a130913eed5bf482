"""CUDA graphs of the decode step: the whole forward (and the logits GEMM) captured once per batch size.

Why: at small batches a decode step is ~400 short kernels whose launch cost exceeds their run time
(13B at batch 1: 16.9 ms eager vs ~9 ms of weight reads). A graph replays them with no host work.

What a graph needs from the rest of the engine: every input lives in a static buffer that is refilled
before each replay (token ids, positions, slot mapping, int32 block tables, sequence lengths), and the
attention backend reads nothing from the host in decode-only steps (`TritonPagedAttention`). Batches are
padded up to the next captured size; padded rows have slot -1 (nothing stored) and length 1 (they read
one token of block 0, which is finite), and their logits are dropped. Sampling stays outside the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata, KernelInputs
from pdserve.engine.scheduler import ScheduledBatch

if TYPE_CHECKING:
    from pdserve.engine.model_runner import StepInputs

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def capture_sizes(max_batch_size: int) -> list[int]:
    """The captured batch sizes: the powers of two below max_batch_size, and max_batch_size itself."""
    sizes = [s for s in DEFAULT_BATCH_SIZES if s < max_batch_size]
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Owns the static buffers and one captured graph per batch size. Device memory of all graphs comes
    from one shared pool (captured largest first, as only one replays at a time)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_layers: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        batch_sizes: list[int],
        device: torch.device,
    ):
        self.model, self.kv_layers = model, kv_layers
        self.block_size, self.max_model_len = block_size, max_model_len
        self.batch_sizes = sorted(batch_sizes)
        self.max_batch_size = self.batch_sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        n, dev = self.max_batch_size, device
        # static device inputs; pinned host mirrors filled by `prepare` (one copy per tensor)
        self.tokens = torch.zeros((3, n), dtype=torch.long, device=dev)  # ids, positions, slots
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)  # contiguous: kernels index it
        self.tables = torch.zeros((n, self.max_blocks), dtype=torch.int32, device=dev)
        self.host_tokens = torch.zeros((3, n), dtype=torch.long).pin_memory()
        self.host_seq_lens = torch.ones(n, dtype=torch.int32).pin_memory()
        self.host_tables = torch.zeros((n, self.max_blocks), dtype=torch.int32).pin_memory()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # [bs, vocab] fp32, written by each replay
        self._capture_all()

    # ---- capture --------------------------------------------------------------------------------
    def _meta(self, bs: int) -> AttentionMetadata:
        kernel = KernelInputs(
            slot_mapping=self.tokens[2, :bs],
            block_tables=self.tables[:bs],
            seq_lens=self.seq_lens[:bs],
            max_seq_len=self.max_model_len,
        )
        return AttentionMetadata(
            slot_block_ids=None,
            slot_offsets=None,
            block_tables=self.tables[:bs],
            context_lens=self.seq_lens[:bs],
            query_start_loc=list(range(bs + 1)),
            context_lens_host=[self.max_model_len] * bs,
            block_size=self.block_size,
            is_decode_only=True,
            kernel=kernel,
        )

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(
            self.tokens[0, :bs], self.tokens[1, :bs], self.kv_layers, self._meta(bs)
        )
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._fill_padding(0)
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                for _ in range(2):  # compile Triton kernels, settle the allocator
                    self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.logits[bs] = self._forward(bs)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    def _fill_padding(self, start: int) -> None:
        """Rows from `start` on become padding: token 0 at position 0, not stored, length 1, block 0."""
        self.host_tokens[:2, start:] = 0
        self.host_tokens[2, start:] = -1
        self.host_seq_lens[start:] = 1
        self.host_tables[start:] = 0
        self.tokens.copy_(self.host_tokens)
        self.seq_lens.copy_(self.host_seq_lens)
        self.tables.copy_(self.host_tables)

    # ---- replay ---------------------------------------------------------------------------------
    def fits(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_batch_size

    def can_run(self, batch: ScheduledBatch) -> bool:
        """True for decode-only batches (one new token per sequence) of at most the largest size."""
        return self.fits(len(batch.seqs)) and all(n == 1 for n in batch.num_new_tokens)

    def prepare(self, batch: ScheduledBatch) -> int:
        """Fills the static inputs from the batch; returns the padded batch size whose graph to replay."""
        num_seqs = len(batch.seqs)
        bsz = self.block_size
        toks = self.host_tokens.numpy()
        lens = self.host_seq_lens.numpy()
        tables = self.host_tables.numpy()
        max_cols = 1
        for i, seq in enumerate(batch.seqs):
            pos = seq.num_computed_tokens
            toks[0, i] = seq.token_ids[pos]
            toks[1, i] = pos
            toks[2, i] = seq.block_ids[pos // bsz] * bsz + pos % bsz
            num_blocks = pos // bsz + 1
            lens[i] = pos + 1
            tables[i, :num_blocks] = seq.block_ids[:num_blocks]
            max_cols = max(max_cols, num_blocks)
        return self._upload(num_seqs, max_cols)

    def prepare_inputs(self, inputs: StepInputs) -> int:
        """prepare() from a decode-only step's StepInputs (what tensor-parallel ranks receive)."""
        n = inputs.num_seqs
        toks = self.host_tokens.numpy()
        toks[0, :n] = inputs.input_ids
        toks[1, :n] = inputs.positions
        toks[2, :n] = np.asarray(inputs.slot_blocks) * self.block_size + inputs.slot_offsets
        self.host_seq_lens.numpy()[:n] = inputs.context_lens
        cols = len(inputs.block_tables[0])
        self.host_tables.numpy()[:n, :cols] = inputs.block_tables
        return self._upload(n, cols)

    def _upload(self, num_seqs: int, max_cols: int) -> int:
        """Pads rows num_seqs.. of the host inputs and copies them to the static device inputs;
        returns the padded batch size."""
        bs = next(s for s in self.batch_sizes if s >= num_seqs)
        toks = self.host_tokens.numpy()
        lens = self.host_seq_lens.numpy()
        tables = self.host_tables.numpy()
        toks[:2, num_seqs:bs] = 0
        toks[2, num_seqs:bs] = -1
        lens[num_seqs:bs] = 1
        tables[num_seqs:bs, 0] = 0
        # padding rows read block 0 only; columns past each sequence's blocks are never read
        self.tokens[:, :bs].copy_(self.host_tokens[:, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(self.host_seq_lens[:bs], non_blocking=True)
        self.tables[:bs, :max_cols].copy_(self.host_tables[:bs, :max_cols], non_blocking=True)
        return bs

    def replay(self, bs: int) -> torch.Tensor:
        """Runs the graph of size bs on the current static inputs; returns its logits [bs, vocab] (a
        static buffer: read it before the next replay)."""
        self.graphs[bs].replay()
        return self.logits[bs]

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [len(batch.seqs), vocab] fp32 of a decode batch (a view into the static output)."""
        bs = self.prepare(batch)
        return self.replay(bs)[: len(batch.seqs)]
