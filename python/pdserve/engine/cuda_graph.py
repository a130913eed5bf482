"""CUDA graphs of the engine step: the whole forward (and for decode the logits GEMM) captured once per
number of rows.

Why: at small batches a decode step is ~400 short kernels whose launch cost exceeds their run time
(13B at batch 1: 16.9 ms eager vs ~9 ms of weight reads). A graph replays them with no host work.

A graph row is one query token with its own KV length and block table. Two families of graphs:
- decode graphs (`GraphKey(prefill=False, rows)`, up to the decode batch): one row per sequence, the
  split-K decode kernel, ending with every row's logits;
- prompt-chunk graphs (`prefill=True`): a chunk of n tokens takes n rows of its sequence, row j
  attending to the first start + j + 1 tokens (the layer's KV write for every row runs before its
  attention, so the chunk's own tokens are in the cache when read); the attention takes a chunk's rows
  in tiles (up to 16 rows at one q head per kv head: `decode_rows_per_tile`) that read the context
  once per tile, through a work list planned each step (`plan_decode_work`: a tile's context is split
  over as many programs as the step's tile count leaves room for). They end with hidden states (the
  runner computes the sampled rows' logits).
Short prefills are host-bound when eager (a 16-token 7B prefill took 28.8 ms where the decode step
takes ~5), so this is what their TTFT needs, and a conversation's next turn too (a short chunk after a
long cached prefix); long chunks stay eager (the eager prefill kernels are efficient there). Decode
steps keep graphs of their own, so the prompt-chunk machinery costs them nothing.

What a graph needs from the rest of the engine: every input lives in a static buffer that is refilled
before each replay (token ids, positions, slot mapping, int32 block tables, sequence lengths, the
work list), and the attention backend reads nothing from the host in these steps
(`TritonPagedAttention` with `is_decode_only`). Steps are padded up to the next captured size; padded
rows have slot -1 (nothing stored) and length 1 (they read one token of block 0, which is finite), and
their outputs are dropped. Sampling stays outside the graph.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from pdserve.engine.attention import AttentionMetadata, KernelInputs
from pdserve.engine.scheduler import ScheduledBatch
from pdserve.ops.paged_decode import (
    DecodeWork,
    decode_rows_per_tile,
    plan_decode_work,
    tile_n_for,
    wanted_programs,
)

if TYPE_CHECKING:
    from pdserve.engine.step_inputs import StepInputs

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A step with prompt chunks replays a graph only while its tiles read at most this many KV tokens in
# all (a tile reads its last row's length: `tile_kv_reads`), against an eager step's ~13-25 ms of host
# time. Seen at 99cb257 (llama-2-7b, H100, bench/bench_short_prefill.py --ignore-kv-reads), replayed
# vs eager: 512 new tokens after a 3,072-token prefix (107 K tile reads) 24.6 vs 21.6 ms; 256 after it
# (51 K) 14.7 vs 19.3 ms; 512 after 1,024 (41 K) 16.9 vs 24.4 ms.
MAX_PREFILL_KV_READS = 64 * 1024


class GraphKey(NamedTuple):
    """Which captured graph: a prompt-chunk one (else decode) of `rows` rows."""

    prefill: bool
    rows: int


def tile_kv_reads(start: int, num_rows: int, rows_per_tile: int) -> int:
    """KV tokens the tiles of one sequence's rows read: num_rows new tokens after `start` computed
    ones, in tiles of rows_per_tile rows, each reading up to its last row's length."""
    full, rest = divmod(num_rows, rows_per_tile)
    reads = full * start + rows_per_tile * full * (full + 1) // 2
    return reads + (start + num_rows if rest else 0)


def capture_sizes(max_batch_size: int) -> list[int]:
    """The captured batch sizes: the powers of two below max_batch_size, and max_batch_size itself."""
    sizes = [s for s in DEFAULT_BATCH_SIZES if s < max_batch_size]
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Owns the static buffers and the captured graphs (decode and prompt-chunk). Device memory of all
    graphs comes from one shared pool (captured largest first, as only one replays at a time)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_layers: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        max_decode_rows: int,
        device: torch.device,
        max_prefill_tokens: int = 0,
        num_kv_heads: int = 1,
        group: int = 1,
        head_dim: int = 128,
    ):
        """Decode-only steps of up to max_decode_rows sequences replay a decode graph.
        max_prefill_tokens: a step with a prompt chunk (more than one new token for a sequence)
        replays a prompt-chunk graph when it has at most this many tokens in all and its tiles read
        at most max_prefill_kv_reads KV tokens (0 or 1: such steps stay eager). num_kv_heads (this
        rank's), group (q heads per kv head) and head_dim shape the attention's work lists."""
        self.model, self.kv_layers = model, kv_layers
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_kv_reads = MAX_PREFILL_KV_READS
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_batch_size = max_decode_rows  # the largest decode graph
        self.rows_per_tile = decode_rows_per_tile(group)
        self.tile_n = tile_n_for(head_dim, block_size)
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        self.programs_per_kv_head = max(1, wanted_programs(sms) // num_kv_heads)
        self.batch_sizes = capture_sizes(max_decode_rows)
        self.prefill_sizes = (
            [s for s in capture_sizes(max_prefill_tokens) if s > 1]
            if max_prefill_tokens > 1
            else []
        )
        self.max_rows = max(self.batch_sizes + self.prefill_sizes)
        self.max_blocks = -(-max_model_len // block_size)
        keys = [GraphKey(False, s) for s in self.batch_sizes]
        keys += [GraphKey(True, s) for s in self.prefill_sizes]
        # a prompt-chunk graph of s rows serves steps of more rows than the next smaller one: with
        # at least min_tiles tiles, a tile never needs more splits than max_splits
        self.max_splits: dict[GraphKey, int] = {}
        prev = 0
        for s in self.prefill_sizes:
            min_tiles = -(-(prev + 1) // self.rows_per_tile)
            self.max_splits[GraphKey(True, s)] = max(
                1, min(128, self.programs_per_kv_head // min_tiles)
            )
            prev = s
        # every input of one graph lives in one byte range: ids, positions, slots (int64 [3, rows]),
        # work items (int32 [4, slots], prompt-chunk graphs), row splits, lengths (int32 [rows]),
        # block tables (int32 [rows, max_blocks]); `prepare` fills the pinned host mirror and copies
        # the range in one transfer (with one strided copy per tensor, prepare took ~270 µs of host
        # time a step at batch 1; now ~90-130 µs: bench/profile_decode.py --host)
        self._work_slots = {
            k: (k.rows + self.programs_per_kv_head if k.prefill else 0) for k in keys
        }
        nbytes = max(
            GraphInputs.layout_nbytes(k.rows, self.max_blocks, self._work_slots[k]) for k in keys
        )
        self._device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_bytes = torch.zeros(nbytes, dtype=torch.uint8).pin_memory()
        self._device_inputs = {k: self._inputs(self._device_bytes, k) for k in keys}
        self._host_inputs = {k: self._inputs(self._host_bytes, k) for k in keys}
        # one pinned host buffer: `prepare` may rewrite it only once the previous upload ran. Rank 0
        # waits for the end of every graph step (sampler.sample_graph_rows), and its
        # step's end waits (all-reduce) for every other rank's step, so its copy ran too. (A CUDA
        # event guarding the buffer cost ~50 µs a step.)
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        # written by each replay: logits [rows, vocab] fp32 (decode graphs), else the final hidden
        # states [rows, hidden]
        self.outputs: dict[GraphKey, torch.Tensor] = {}
        self._capture_all(keys)

    def _inputs(self, buffer: torch.Tensor, key: GraphKey) -> GraphInputs:
        return GraphInputs(buffer, key.rows, self.max_blocks, self._work_slots[key])

    # ---- capture --------------------------------------------------------------------------------
    def _meta(self, key: GraphKey) -> AttentionMetadata:
        inputs = self._device_inputs[key]
        work = None
        if key.prefill:
            work = DecodeWork(inputs.work, inputs.row_splits, self.max_splits[key])
        kernel = KernelInputs(
            slot_mapping=inputs.tokens[2],
            block_tables=inputs.tables,
            seq_lens=inputs.seq_lens,
            max_seq_len=self.max_model_len,
            work=work,
        )
        return AttentionMetadata(
            slot_block_ids=None,
            slot_offsets=None,
            block_tables=inputs.tables,
            context_lens=inputs.seq_lens,
            query_start_loc=list(range(key.rows + 1)),
            context_lens_host=[self.max_model_len] * key.rows,
            block_size=self.block_size,
            is_decode_only=True,  # the decode kernel, on rows (and with a work list, on tiles)
            kernel=kernel,
        )

    def ends_with_logits(self, key: GraphKey) -> bool:
        """True when the graph outputs logits, False when hidden states."""
        return not key.prefill

    def _forward(self, key: GraphKey) -> torch.Tensor:
        tokens = self._device_inputs[key].tokens
        hidden = self.model(tokens[0], tokens[1], self.kv_layers, self._meta(key))
        return self.model.compute_logits(hidden) if self.ends_with_logits(key) else hidden

    @torch.inference_mode()
    def _capture_all(self, keys: list[GraphKey]) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for key in sorted(keys, key=lambda k: (k.rows, k.prefill), reverse=True):
                # every row padding (the graphs' layouts share one buffer: fill this one now), so
                # the warm-up runs read and write finite values
                host = self._host_inputs[key]
                host.pad(0)
                self._device_inputs[key].copy_from(host, host.nbytes, non_blocking=False)
                for _ in range(2):  # compile Triton kernels, settle the allocator
                    self._forward(key)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[key] = self._forward(key)
                pool = graph.pool() if pool is None else pool
                self.graphs[key] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    # ---- replay ---------------------------------------------------------------------------------
    def fits(self, num_rows: int, num_kv_reads: int | None = None) -> bool:
        """True when a step of num_rows new tokens replays a graph. A decode-only step (num_kv_reads
        None) needs at most max_batch_size rows; a step with a prompt chunk at most
        max_prefill_tokens (and a captured size), and its tiles must read at most
        max_prefill_kv_reads KV tokens (`kv_reads`)."""
        if num_kv_reads is None:
            return num_rows <= self.max_batch_size
        return (
            bool(self.prefill_sizes)
            and num_rows <= min(self.max_prefill_tokens, self.prefill_sizes[-1])
            and num_kv_reads <= self.max_prefill_kv_reads
        )

    def can_run(self, batch: ScheduledBatch) -> bool:
        """True when the batch replays a graph (one row per new token; see `fits`)."""
        if all(n == 1 for n in batch.num_new_tokens):
            return self.fits(len(batch.seqs))
        starts = [seq.num_computed_tokens for seq in batch.seqs]
        return self.fits(batch.num_tokens, self.kv_reads(starts, batch.num_new_tokens))

    def kv_reads(self, starts: list[int], num_rows: list[int]) -> int:
        """KV tokens a step's attention tiles read: sequence i has num_rows[i] new tokens after
        starts[i] computed ones."""
        p = self.rows_per_tile
        return sum(tile_kv_reads(s, n, p) for s, n in zip(starts, num_rows, strict=True))

    def prepare(self, batch: ScheduledBatch) -> GraphKey:
        """Fills the static inputs from the batch, one row per new token in batch order; returns the
        key of the graph to replay."""
        num_rows = batch.num_tokens
        key = self._key_for(num_rows, decode_only=num_rows == len(batch.seqs))
        host = self._host_inputs[key]
        max_cols = fill_rows_from_batch(host, batch, self.block_size)
        if key.prefill:
            self._plan(key, batch.num_new_tokens)
        return self._upload(key, num_rows, max_cols)

    def prepare_inputs(self, inputs: StepInputs) -> GraphKey:
        """prepare() from a step's StepInputs (what tensor-parallel ranks receive)."""
        num_rows = len(inputs.input_ids)
        key = self._key_for(num_rows, decode_only=num_rows == inputs.num_seqs)
        cols = fill_rows_from_inputs(self._host_inputs[key], inputs, self.block_size)
        if key.prefill:
            self._plan(key, np.diff(inputs.query_start_loc))
        return self._upload(key, num_rows, cols)

    def _key_for(self, num_rows: int, decode_only: bool) -> GraphKey:
        sizes = self.batch_sizes if decode_only else self.prefill_sizes
        return GraphKey(not decode_only, next(s for s in sizes if s >= num_rows))

    def _plan(self, key: GraphKey, num_new_tokens) -> None:
        """The work list of a prompt-chunk graph's rows (already filled), padding rows one-row tiles
        of one split each after the step's own items."""
        host = self._host_inputs[key]
        counts = np.asarray(num_new_tokens, dtype=np.int64)
        tiles = row_tiles(counts, self.rows_per_tile)
        tile_lens = host.seq_lens_np[tiles[0] + tiles[1] - 1]
        num_items = plan_decode_work(
            host.work_np,
            host.row_splits_np,
            tiles,
            tile_lens,
            self.max_splits[key],
            self.programs_per_kv_head,
            self.tile_n,
        )
        num_rows = int(counts.sum())
        pad = np.arange(num_rows, key.rows)
        end = num_items + len(pad)
        host.work_np[0, num_items:end] = pad
        host.work_np[1, num_items:end] = 1
        host.work_np[2, num_items:end] = 0
        host.work_np[3, num_items:end] = 1
        host.row_splits_np[num_rows:] = 1

    def _upload(self, key: GraphKey, num_rows: int, max_cols: int) -> GraphKey:
        """Pads rows num_rows.. of the graph's host inputs and copies them to its static device
        inputs in one transfer, up to the last table row's first max_cols entries (columns past a
        row's blocks are never read); returns key."""
        host = self._host_inputs[key]
        host.pad(num_rows, keep_work=key.prefill)
        self._device_inputs[key].copy_from(host, host.prefix_nbytes(max_cols), non_blocking=True)
        return key

    def replay(self, key: GraphKey) -> torch.Tensor:
        """Runs the graph on the current static inputs; returns its output (logits [rows, vocab]
        fp32, or hidden states [rows, hidden] for a prompt-chunk graph: see ends_with_logits), a
        static buffer: read it before the next replay."""
        self.graphs[key].replay()
        return self.outputs[key]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [batch.num_tokens, vocab] fp32, one row per new token in batch order (a view into
        the static output; computed outside the graph for the prompt-chunk graphs)."""
        key = self.prepare(batch)
        out = self.replay(key)[: batch.num_tokens]
        return out if self.ends_with_logits(key) else self.model.compute_logits(out)


def row_tiles(num_rows: np.ndarray, rows_per_tile: int) -> np.ndarray:
    """Tiles ([2, num_tiles] int64: first row, number of rows) of rows laid out by sequence:
    num_rows[i] consecutive rows of sequence i, in tiles of at most rows_per_tile rows."""
    counts = np.asarray(num_rows, dtype=np.int64)
    per_seq = -(-counts // rows_per_tile)
    num_tiles = int(per_seq.sum())
    first_tile = np.cumsum(per_seq) - per_seq
    in_seq = np.arange(num_tiles) - np.repeat(first_tile, per_seq)  # a tile's index in its sequence
    first_row = np.repeat(np.cumsum(counts) - counts, per_seq) + in_seq * rows_per_tile
    size = np.minimum(rows_per_tile, np.repeat(counts, per_seq) - in_seq * rows_per_tile)
    return np.stack([first_row, size])


def fill_rows_from_batch(host: GraphInputs, batch: ScheduledBatch, block_size: int) -> int:
    """Writes one row per new token of the batch (in batch order) into host's arrays: token id,
    position, cache slot, KV length (position + 1) and the sequence's block table; returns the
    widest table written (columns past a row's last block keep stale values: never read)."""
    toks, lens, tables = host.tokens_np, host.seq_lens_np, host.tables_np
    max_cols = 1
    row = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        if n == 1:  # decode: the hot path, plain scalar writes
            toks[0, row] = seq.token_ids[start]
            toks[1, row] = start
            toks[2, row] = seq.block_ids[start // block_size] * block_size + start % block_size
            num_blocks = start // block_size + 1
            lens[row] = start + 1
            tables[row, :num_blocks] = seq.block_ids[:num_blocks]
        else:
            end = start + n
            span = np.arange(start, end)
            num_blocks = -(-end // block_size)
            blocks = np.asarray(seq.block_ids[:num_blocks])
            toks[0, row : row + n] = seq.token_ids[start:end]
            toks[1, row : row + n] = span
            toks[2, row : row + n] = blocks[span // block_size] * block_size + span % block_size
            lens[row : row + n] = span + 1
            tables[row : row + n, :num_blocks] = blocks
        max_cols = max(max_cols, num_blocks)
        row += n
    return max_cols


def fill_rows_from_inputs(host: GraphInputs, inputs: StepInputs, block_size: int) -> int:
    """fill_rows_from_batch from StepInputs (one row per token, each row its sequence's table);
    returns the table width written."""
    n = len(inputs.input_ids)
    host.tokens_np[0, :n] = inputs.input_ids
    host.tokens_np[1, :n] = inputs.positions
    host.tokens_np[2, :n] = np.asarray(inputs.slot_blocks) * block_size
    host.tokens_np[2, :n] += inputs.slot_offsets
    host.seq_lens_np[:n] = inputs.positions
    host.seq_lens_np[:n] += 1
    tables = np.asarray(inputs.block_tables)
    if n != inputs.num_seqs:  # a prompt chunk: its rows share its table
        tables = np.repeat(tables, np.diff(inputs.query_start_loc), axis=0)
    cols = tables.shape[1]
    host.tables_np[:n, :cols] = tables
    return cols


class GraphInputs:
    """The static inputs of one graph of `rows` rows as views of one byte buffer (device or pinned
    host): tokens int64 [3, rows] (ids, positions, slots); with work_slots > 0 (prompt-chunk graphs)
    the attention's work list, work int32 [4, work_slots] and row_splits int32 [rows] (see
    DecodeWork); seq_lens int32 [rows]; tables int32 [rows, max_blocks]."""

    @staticmethod
    def layout_nbytes(rows: int, max_blocks: int, work_slots: int = 0) -> int:
        row_splits = rows if work_slots else 0
        return rows * 3 * 8 + 4 * (4 * work_slots + row_splits + rows + rows * max_blocks)

    def __init__(self, buffer: torch.Tensor, rows: int, max_blocks: int, work_slots: int = 0):
        tokens_end = 3 * 8 * rows
        work_end = tokens_end + 4 * 4 * work_slots
        splits_end = work_end + (4 * rows if work_slots else 0)
        self._lens_end = lens_end = splits_end + 4 * rows
        self._rows, self._max_blocks = rows, max_blocks
        self.nbytes = self.layout_nbytes(rows, max_blocks, work_slots)
        self.buffer = buffer
        self.tokens = buffer[:tokens_end].view(torch.int64).view(3, rows)
        self.work = buffer[tokens_end:work_end].view(torch.int32).view(4, work_slots)
        self.row_splits = buffer[work_end:splits_end].view(torch.int32)
        self.seq_lens = buffer[splits_end:lens_end].view(torch.int32)
        self.tables = buffer[lens_end : self.nbytes].view(torch.int32).view(rows, max_blocks)
        if buffer.device.type == "cpu":  # numpy views share the pinned memory
            self.tokens_np = self.tokens.numpy()
            self.work_np = self.work.numpy()
            self.row_splits_np = self.row_splits.numpy()
            self.seq_lens_np = self.seq_lens.numpy()
            self.tables_np = self.tables.numpy()

    def pad(self, start: int, keep_work: bool = False) -> None:
        """Rows from `start` on become padding: token 0 at position 0, not stored (slot -1), length
        1, block 0 (host buffers only). Unless keep_work (a step's plan is in place), the work list
        becomes one item per row: each row its own tile of one split."""
        self.tokens_np[:2, start:] = 0
        self.tokens_np[2, start:] = -1
        self.seq_lens_np[start:] = 1
        self.tables_np[start:, 0] = 0
        if self.work_np.shape[1] and not keep_work:
            self.work_np[:] = 0
            self.work_np[0, : self._rows] = np.arange(self._rows)
            self.work_np[1, : self._rows] = 1
            self.work_np[3, : self._rows] = 1
            self.row_splits_np[:] = 1

    def prefix_nbytes(self, max_cols: int) -> int:
        """Bytes from the start through the first max_cols entries of the last table row."""
        return self._lens_end + 4 * ((self._rows - 1) * self._max_blocks + max_cols)

    def copy_from(self, host: GraphInputs, nbytes: int, non_blocking: bool) -> None:
        """The first nbytes of this layout's range from host's (the same layout in pinned memory)."""
        self.buffer[:nbytes].copy_(host.buffer[:nbytes], non_blocking=non_blocking)
