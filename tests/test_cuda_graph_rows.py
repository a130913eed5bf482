"""The host side of the step graphs (engine/cuda_graph.py) on the CPU: every step the engine schedules
(fresh prompts, chunks after a cached prefix, decodes, mixed) laid out as one graph row per new token,
from the batch (single rank) and from StepInputs (tensor parallelism), both against rows written out
by hand here, and the prompt-chunk graphs' attention tiles and work lists. That the rows attend
correctly is the GPU tests' part (test_engine_gpu_fast.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.cuda_graph import (
    GraphInputs,
    fill_rows_from_batch,
    fill_rows_from_inputs,
    row_tiles,
    tile_kv_reads,
)

BLOCK_SIZE = 4
MAX_ROWS, MAX_BLOCKS = 64, 16


def _host() -> GraphInputs:
    buffer = torch.zeros(GraphInputs.layout_nbytes(MAX_ROWS, MAX_BLOCKS), dtype=torch.uint8)
    return GraphInputs(buffer, MAX_ROWS, MAX_BLOCKS)


def _expected_rows(batch) -> list[tuple[int, int, int, int, list[int]]]:
    """(token, position, slot, KV length, block table) of each new token, in batch order."""
    rows = []
    for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
        for t in range(seq.num_computed_tokens, seq.num_computed_tokens + n):
            block = seq.block_ids[t // BLOCK_SIZE]
            table = seq.block_ids[: t // BLOCK_SIZE + 1]
            rows.append((seq.token_ids[t], t, block * BLOCK_SIZE + t % BLOCK_SIZE, t + 1, table))
    return rows


def _rows_of(host: GraphInputs, num_rows: int) -> list[tuple[int, int, int, int, list[int]]]:
    rows = []
    for r in range(num_rows):
        length = int(host.seq_lens_np[r])
        num_blocks = -(-length // BLOCK_SIZE)  # the columns a row's attention reads
        table = [int(b) for b in host.tables_np[r, :num_blocks]]
        token, pos, slot = (int(x) for x in host.tokens_np[:, r])
        rows.append((token, pos, slot, length, table))
    return rows


def test_every_scheduled_step_becomes_one_row_per_token():
    engine = LLMEngine(
        model="tiny",
        device="cpu",
        num_kv_blocks=64,
        block_size=BLOCK_SIZE,
        enable_radix_caching=True,
        max_num_batched_tokens=24,  # chunked prompts mixed with decodes
        max_num_seqs=8,
    )
    runner = engine.runner
    real_run = runner.run
    seen = {"steps": 0, "prefill_steps": 0, "mixed_steps": 0}

    def checked_run(batch, after_layer=None):
        expected = _expected_rows(batch)
        by_batch, by_inputs = _host(), _host()
        cols_batch = fill_rows_from_batch(by_batch, batch, BLOCK_SIZE)
        inputs = runner.prepare_inputs(batch)
        cols_inputs = fill_rows_from_inputs(by_inputs, inputs, BLOCK_SIZE)
        assert _rows_of(by_batch, len(expected)) == expected
        assert _rows_of(by_inputs, len(expected)) == expected
        widest = max(len(row[4]) for row in expected)
        assert cols_batch == widest and cols_inputs >= widest
        seen["steps"] += 1
        decode = [n == 1 for n in batch.num_new_tokens]
        seen["prefill_steps"] += not all(decode)
        seen["mixed_steps"] += any(decode) and not all(decode)
        return real_run(batch, after_layer)

    runner.run = checked_run
    shared = [256] + [(7 * i + 3) % 250 for i in range(13)]
    prompts = [shared + [(5 * i + j) % 250 for i in range(n)] for j, n in enumerate((1, 6, 19))]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    for round_idx in range(2):  # the second round hits the radix cache: chunks after a prefix
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{round_idx}-{i}", prompt, params)
        while engine.has_unfinished():
            engine.step()
    assert seen["steps"] > 10 and seen["prefill_steps"] >= 4 and seen["mixed_steps"] >= 1
    assert engine.stats().num_used_blocks == 0


def test_rows_from_inputs_pad_nothing_past_the_step():
    """Rows past the step keep what padding wrote (GraphInputs.pad) until _upload pads them again."""
    host = _host()
    host.pad(0)
    engine = LLMEngine(model="tiny", device="cpu", num_kv_blocks=16, block_size=BLOCK_SIZE)
    engine.add_request("a", list(range(1, 8)), SamplingParams(max_tokens=1))
    batch, _ = engine.scheduler.schedule()
    fill_rows_from_inputs(host, engine.runner.prepare_inputs(batch), BLOCK_SIZE)
    assert np.all(host.tokens_np[2, 7:] == -1) and np.all(host.seq_lens_np[7:] == 1)


@pytest.mark.parametrize("bad", [-1, -64])
def test_negative_prefill_graph_budget_is_refused(bad):
    with pytest.raises(ValueError, match="cuda_graph_max_prefill_tokens must be >= 0"):
        EngineConfig(model="tiny", cuda_graph_max_prefill_tokens=bad)


@pytest.mark.parametrize("rows_per_tile", [1, 4, 16])
def test_row_tiles_group_each_sequences_rows(rows_per_tile):
    counts = [1, 19, 3, 1, 16, 40]
    expected, row = [], 0
    for n in counts:
        for start in range(0, n, rows_per_tile):
            expected.append((row + start, min(rows_per_tile, n - start)))
        row += n
    tiles = row_tiles(np.array(counts), rows_per_tile)
    assert [(int(a), int(b)) for a, b in zip(*tiles, strict=True)] == expected
    # what the graphs' KV-read bound counts: each tile reads up to its last row's length
    starts = [5, 0, 70, 9, 32, 100]
    lens = [s + j + 1 for s, n in zip(starts, counts, strict=True) for j in range(n)]
    reads = sum(lens[first + n - 1] for first, n in expected)
    assert reads == sum(
        tile_kv_reads(s, n, rows_per_tile) for s, n in zip(starts, counts, strict=True)
    )


def test_work_rows_of_a_prompt_chunk_graph_cover_every_row():
    """Capture pads every row as its own one-split item; a step's plan keeps its items (pad with
    keep_work); the layout of a decode graph has no work list."""
    rows, slots = 8, 12
    buffer = torch.zeros(GraphInputs.layout_nbytes(rows, MAX_BLOCKS, slots), dtype=torch.uint8)
    host = GraphInputs(buffer, rows, MAX_BLOCKS, slots)
    host.work_np[:] = 5
    host.pad(0)
    assert host.work_np[:, :rows].tolist() == [
        list(range(rows)),
        [1] * rows,
        [0] * rows,
        [1] * rows,
    ]
    assert np.all(host.work_np[1, rows:] == 0) and np.all(host.row_splits_np == 1)
    host.work_np[:, 0] = (0, 3, 0, 2)
    host.pad(3, keep_work=True)
    assert host.work_np[:, 0].tolist() == [0, 3, 0, 2]
    plain_bytes = torch.zeros(GraphInputs.layout_nbytes(rows, MAX_BLOCKS), dtype=torch.uint8)
    plain = GraphInputs(plain_bytes, rows, MAX_BLOCKS)
    assert plain.work.numel() == 0 and plain.row_splits.numel() == 0
