"""CUDA graphs of the decode step: the whole forward (and the logits GEMM) captured once per batch size.

Why: at small batches a decode step is ~400 short kernels whose launch cost exceeds their run time
(13B at batch 1: 16.9 ms eager vs ~9 ms of weight reads). A graph replays them with no host work.

A graph row is one query token with its own KV length and block table, so a step with short prompt
chunks replays the same graphs: a chunk of n tokens takes n rows of its sequence, row j attending to
the first start + j + 1 tokens (the layer's KV write for every row runs before its attention, so the
chunk's own tokens are in the cache when read). The attention takes a chunk's rows in tiles (up to 16
rows at one q head per kv head: `decode_rows_per_tile`) that read the context once per tile. Short
prefills are host-bound when eager (a 16-token 7B prefill took 28.8 ms where the decode step takes
~5), so this is what their TTFT needs, and prompt chunks after a long cached prefix (a conversation's
next turn) too; long chunks stay eager (the eager prefill kernels are efficient there).

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
from pdserve.ops.paged_decode import decode_rows_per_tile

if TYPE_CHECKING:
    from pdserve.engine.model_runner import StepInputs

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A step with prompt chunks replays a graph only while its tiles read at most this many KV tokens in
# all (a tile reads its last row's length: `tile_kv_reads`), at ~70-120 ns per token read (llama-2-7b,
# H100, bench/bench_short_prefill.py), against an eager step's ~16-25 ms of host time. Seen there at
# 0110793 with one row per tile, replayed vs eager: 256 fresh tokens (33 K reads) 11.5 vs 24.4 ms; 32
# after a 3,072-token prefix (99 K) 17.8 vs 20.8 ms; 64 after it (199 K) 25.3 vs 21.6 ms; 512 fresh
# (131 K) 23.8 vs 25.0 ms.
MAX_PREFILL_KV_READS = 128 * 1024


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


def graph_sizes(max_decode_rows: int, max_prefill_rows: int) -> list[int]:
    """Every captured size: capture_sizes(max_decode_rows) (graphs that end with the logits of every
    row), then the powers of two up to max_prefill_rows and max_prefill_rows itself above it (graphs
    for prompt chunks only, which end with hidden states: the runner computes the sampled rows'
    logits, a [rows, vocab] buffer per size being large)."""
    sizes = capture_sizes(max_decode_rows)
    if max_prefill_rows > max_decode_rows:
        sizes += [s for s in capture_sizes(max_prefill_rows) if s > max_decode_rows]
    return sizes


class DecodeGraphs:
    """Owns the static buffers and one captured graph per batch size. Device memory of all graphs comes
    from one shared pool (captured largest first, as only one replays at a time)."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_layers: list[torch.Tensor],
        block_size: int,
        max_model_len: int,
        max_decode_rows: int,
        device: torch.device,
        max_prefill_tokens: int = 0,
        group: int = 1,
    ):
        """Decode-only steps of up to max_decode_rows sequences replay a graph. max_prefill_tokens: a
        step with a prompt chunk (more than one new token for a sequence) replays one when it has at
        most this many tokens in all and its tiles read at most max_prefill_kv_reads KV tokens (0:
        such steps stay eager). group: q heads per kv head (sets the rows per attention tile)."""
        self.model, self.kv_layers = model, kv_layers
        self.rows_per_tile = decode_rows_per_tile(group)
        self.max_prefill_tokens = max_prefill_tokens
        self.max_prefill_kv_reads = MAX_PREFILL_KV_READS
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_batch_size = max_decode_rows  # the largest size that ends with logits
        self.batch_sizes = sizes = graph_sizes(max_decode_rows, max_prefill_tokens)
        self.max_rows = sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        # every input of the graph of size bs lives in one byte range: ids, positions, slots (int64
        # [3, bs]), lengths (int32 [bs]), block tables (int32 [bs, max_blocks]); `prepare` fills the
        # pinned host mirror and copies the range in one transfer (with one strided copy per tensor,
        # prepare took ~270 µs of host time a step at batch 1; now ~90-130 µs:
        # bench/profile_decode.py --host)
        nbytes = GraphInputs.layout_nbytes(self.max_rows, self.max_blocks)
        self._device_bytes = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_bytes = torch.zeros(nbytes, dtype=torch.uint8).pin_memory()
        self._device_inputs = {
            bs: GraphInputs(self._device_bytes, bs, self.max_blocks) for bs in sizes
        }
        self._host_inputs = {bs: GraphInputs(self._host_bytes, bs, self.max_blocks) for bs in sizes}
        # one pinned host buffer: `prepare` may rewrite it only once the previous upload ran. Rank 0
        # waits for the end of every graph step (model_runner._sample_graph_rows), and its
        # step's end waits (all-reduce) for every other rank's step, so its copy ran too. (A CUDA
        # event guarding the buffer cost ~50 µs a step.)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # written by each replay: logits [bs, vocab] fp32 up to max_batch_size rows, else the final
        # hidden states [bs, hidden]
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    # ---- capture --------------------------------------------------------------------------------
    def _meta(self, bs: int) -> AttentionMetadata:
        inputs = self._device_inputs[bs]
        kernel = KernelInputs(
            slot_mapping=inputs.tokens[2],
            block_tables=inputs.tables,
            seq_lens=inputs.seq_lens,
            max_seq_len=self.max_model_len,
            tiles=inputs.tiles,
        )
        return AttentionMetadata(
            slot_block_ids=None,
            slot_offsets=None,
            block_tables=inputs.tables,
            context_lens=inputs.seq_lens,
            query_start_loc=list(range(bs + 1)),
            context_lens_host=[self.max_model_len] * bs,
            block_size=self.block_size,
            is_decode_only=True,
            kernel=kernel,
        )

    def ends_with_logits(self, bs: int) -> bool:
        """True when the graph of size bs outputs logits, False when hidden states."""
        return bs <= self.max_batch_size

    def _forward(self, bs: int) -> torch.Tensor:
        tokens = self._device_inputs[bs].tokens
        hidden = self.model(tokens[0], tokens[1], self.kv_layers, self._meta(bs))
        return self.model.compute_logits(hidden) if self.ends_with_logits(bs) else hidden

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.batch_sizes):
                # every row padding (the sizes' layouts share one buffer: fill this one now), so
                # the warm-up runs read and write finite values
                host = self._host_inputs[bs]
                host.pad(0)
                self._device_inputs[bs].copy_from(host, host.nbytes, non_blocking=False)
                for _ in range(2):  # compile Triton kernels, settle the allocator
                    self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bs] = self._forward(bs)
                pool = graph.pool() if pool is None else pool
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()

    # ---- replay ---------------------------------------------------------------------------------
    def fits(self, num_rows: int, num_kv_reads: int | None = None) -> bool:
        """True when a step of num_rows new tokens replays a graph. A decode-only step (num_kv_reads
        None) needs at most max_batch_size rows (the graphs that end with logits); a step with a
        prompt chunk at most max_prefill_tokens, and its tiles must read at most
        max_prefill_kv_reads KV tokens (`kv_reads`)."""
        if num_kv_reads is None:
            return num_rows <= self.max_batch_size
        return (
            num_rows <= min(self.max_prefill_tokens, self.max_rows)
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

    def prepare(self, batch: ScheduledBatch) -> int:
        """Fills the static inputs from the batch, one row per new token in batch order; returns the
        padded batch size whose graph to replay."""
        num_rows = batch.num_tokens
        bs = self._size_for(num_rows)
        host = self._host_inputs[bs]
        max_cols, num_tiles = fill_rows_from_batch(host, batch, self.block_size, self.rows_per_tile)
        return self._upload(bs, num_rows, num_tiles, max_cols)

    def prepare_inputs(self, inputs: StepInputs) -> int:
        """prepare() from a step's StepInputs (what tensor-parallel ranks receive)."""
        num_rows = len(inputs.input_ids)
        bs = self._size_for(num_rows)
        host = self._host_inputs[bs]
        cols, num_tiles = fill_rows_from_inputs(host, inputs, self.block_size, self.rows_per_tile)
        return self._upload(bs, num_rows, num_tiles, cols)

    def _size_for(self, num_seqs: int) -> int:
        return next(s for s in self.batch_sizes if s >= num_seqs)

    def _upload(self, bs: int, num_rows: int, num_tiles: int, max_cols: int) -> int:
        """Pads rows num_rows.. (and tile slots num_tiles..) of graph bs's host inputs and copies them
        to its static device inputs in one transfer, up to the last table row's first max_cols
        entries (columns past a row's blocks are never read); returns bs."""
        host = self._host_inputs[bs]
        host.pad(num_rows, num_tiles)
        self._device_inputs[bs].copy_from(host, host.prefix_nbytes(max_cols), non_blocking=True)
        return bs

    def replay(self, bs: int) -> torch.Tensor:
        """Runs the graph of size bs on the current static inputs; returns its output (logits
        [bs, vocab] fp32, or hidden states [bs, hidden] past max_batch_size: see ends_with_logits),
        a static buffer: read it before the next replay."""
        self.graphs[bs].replay()
        return self.outputs[bs]

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [batch.num_tokens, vocab] fp32, one row per new token in batch order (a view into
        the static output; computed outside the graph for the prompt-chunk-only sizes)."""
        bs = self.prepare(batch)
        out = self.replay(bs)[: batch.num_tokens]
        return out if self.ends_with_logits(bs) else self.model.compute_logits(out)


def fill_rows_from_batch(
    host: GraphInputs, batch: ScheduledBatch, block_size: int, rows_per_tile: int = 1
) -> tuple[int, int]:
    """Writes one row per new token of the batch (in batch order) into host's arrays: token id,
    position, cache slot, KV length (position + 1) and the sequence's block table, and the tiles
    (`fill_tiles`); returns (the widest table written, the number of tiles). Columns past a row's
    last block keep stale values: never read."""
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
    return max_cols, fill_tiles(host, batch.num_new_tokens, rows_per_tile)


def fill_rows_from_inputs(
    host: GraphInputs, inputs: StepInputs, block_size: int, rows_per_tile: int = 1
) -> tuple[int, int]:
    """fill_rows_from_batch from StepInputs (one row per token, each row its sequence's table);
    returns (the table width written, the number of tiles)."""
    n = len(inputs.input_ids)
    host.tokens_np[0, :n] = inputs.input_ids
    host.tokens_np[1, :n] = inputs.positions
    host.tokens_np[2, :n] = np.asarray(inputs.slot_blocks) * block_size
    host.tokens_np[2, :n] += inputs.slot_offsets
    host.seq_lens_np[:n] = inputs.positions
    host.seq_lens_np[:n] += 1
    tables = np.asarray(inputs.block_tables)
    counts = np.diff(inputs.query_start_loc) if n != inputs.num_seqs else None
    if counts is not None:  # a prompt chunk: its rows share its table
        tables = np.repeat(tables, counts, axis=0)
    cols = tables.shape[1]
    host.tables_np[:n, :cols] = tables
    return cols, fill_tiles(host, n if counts is None else counts, rows_per_tile)


def fill_tiles(
    host: GraphInputs, num_rows: int | list[int] | np.ndarray, rows_per_tile: int
) -> int:
    """Writes the attention tiles of rows laid out by sequence: num_rows[i] consecutive rows of
    sequence i (an int: that many one-row sequences) in tiles of at most rows_per_tile rows, from
    tile slot 0 on; returns the number of tiles."""
    tiles = host.tiles_np
    if isinstance(num_rows, int) or rows_per_tile == 1 or max(num_rows) == 1:  # a tile per row
        n = num_rows if isinstance(num_rows, int) else int(np.sum(num_rows))
        tiles[0, :n] = np.arange(n)
        tiles[1, :n] = 1
        return n
    counts = np.asarray(num_rows, dtype=np.int64)
    per_seq = -(-counts // rows_per_tile)
    num_tiles = int(per_seq.sum())
    first_tile = np.cumsum(per_seq) - per_seq
    in_seq = np.arange(num_tiles) - np.repeat(first_tile, per_seq)  # tile's index in its sequence
    first_row = np.repeat(np.cumsum(counts) - counts, per_seq) + in_seq * rows_per_tile
    tiles[0, :num_tiles] = first_row
    tiles[1, :num_tiles] = np.minimum(
        rows_per_tile, np.repeat(counts, per_seq) - in_seq * rows_per_tile
    )
    return num_tiles


class GraphInputs:
    """The static inputs of the graph of size bs as views of one byte buffer (device or pinned host):
    tokens int64 [3, bs] (ids, positions, slots), tiles int32 [2, bs] (first row and number of rows
    of each attention tile; 0 rows: an unused slot), seq_lens int32 [bs], tables int32 [bs,
    max_blocks]."""

    @staticmethod
    def layout_nbytes(bs: int, max_blocks: int) -> int:
        return bs * (3 * 8 + 2 * 4 + 4 + 4 * max_blocks)

    def __init__(self, buffer: torch.Tensor, bs: int, max_blocks: int):
        tokens_end = 3 * 8 * bs
        tiles_end = tokens_end + 2 * 4 * bs
        self._lens_end = lens_end = tiles_end + 4 * bs
        self._bs, self._max_blocks = bs, max_blocks
        self.nbytes = self.layout_nbytes(bs, max_blocks)
        self.buffer = buffer
        self.tokens = buffer[:tokens_end].view(torch.int64).view(3, bs)
        self.tiles = buffer[tokens_end:tiles_end].view(torch.int32).view(2, bs)
        self.seq_lens = buffer[tiles_end:lens_end].view(torch.int32)
        self.tables = buffer[lens_end : self.nbytes].view(torch.int32).view(bs, max_blocks)
        if buffer.device.type == "cpu":  # numpy views share the pinned memory
            self.tokens_np = self.tokens.numpy()
            self.tiles_np = self.tiles.numpy()
            self.seq_lens_np = self.seq_lens.numpy()
            self.tables_np = self.tables.numpy()

    def pad(self, start: int, start_tile: int | None = None) -> None:
        """Rows from `start` on become padding: token 0 at position 0, not stored (slot -1), length
        1, block 0, each its own tile from slot start_tile on (default: `start`, the rows before
        being one tile each); the slots after them are unused (host buffers only)."""
        start_tile = start if start_tile is None else start_tile
        self.tokens_np[:2, start:] = 0
        self.tokens_np[2, start:] = -1
        self.seq_lens_np[start:] = 1
        self.tables_np[start:, 0] = 0
        end_tile = start_tile + self._bs - start
        self.tiles_np[0, start_tile:end_tile] = np.arange(start, self._bs)
        self.tiles_np[1, start_tile:end_tile] = 1
        self.tiles_np[:, end_tile:] = 0

    def prefix_nbytes(self, max_cols: int) -> int:
        """Bytes from the start through the first max_cols entries of the last table row."""
        return self._lens_end + 4 * ((self._bs - 1) * self._max_blocks + max_cols)

    def copy_from(self, host: GraphInputs, nbytes: int, non_blocking: bool) -> None:
        """The first nbytes of this layout's range from host's (the same layout in pinned memory)."""
        self.buffer[:nbytes].copy_(host.buffer[:nbytes], non_blocking=non_blocking)
