"""Prefill-only on one engine, KV copied block by block (per layer, through layer_hook, or whole),
decode-only on another: the tokens equal a colocated run. Also reserve/NoCapacity, insert_cached (dcache)."""

from __future__ import annotations

import subprocess
import sys

import pdserve.transfer
import pytest
import torch
from pdserve import SamplingParams
from pdserve.engine import LLMEngine, NoCapacity, RequestMode
from tiny_models import make_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(
    temperature=0.8, top_k=40, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True
)
PROMPT = [256] + [(5 * i + 1) % 250 for i in range(45)]  # 46 tokens: 2 whole blocks of 16 + 14


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("disagg")), num_kv_heads=2)


def _engine(ckpt, **kw) -> LLMEngine:
    return LLMEngine(model=ckpt, device="cpu", num_kv_blocks=kw.pop("num_kv_blocks", 40), **kw)


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _colocated(ckpt, prompt, params) -> list[int]:
    engine = _engine(ckpt)
    engine.add_request("c", prompt, params)
    return _run(engine)["c"]


def _assert_clean(*engines: LLMEngine) -> None:
    for engine in engines:
        engine.check_invariants()
        stats = engine.stats()
        assert stats.num_used_blocks == 0 and stats.num_reserved_blocks == 0, stats


def _copy_layer(
    src: LLMEngine, dst: LLMEngine, layer_idx: int, src_ids: list[int], dst_ids: list[int]
) -> None:
    dst.runner.kv_layers[layer_idx][torch.tensor(dst_ids)] = src.runner.kv_layers[layer_idx][
        torch.tensor(src_ids)
    ]


def _disaggregated(
    p: LLMEngine, d: LLMEngine, rid: str, prompt, params, layerwise: bool
) -> tuple[list[int], list]:
    reservation = d.reserve(rid, prompt)
    k = reservation.num_cached_tokens
    sent: list[tuple[int, list[int]]] = []

    def hook(layer_idx: int, items: list[tuple[str, list[int]]]) -> None:
        for request_id, block_ids in items:
            assert request_id == rid
            p_all = p.get_block_ids(rid)
            idx = [p_all.index(b) - k // p.config.block_size for b in block_ids]
            _copy_layer(p, d, layer_idx, block_ids, [reservation.new_block_ids[i] for i in idx])
            sent.append((layer_idx, list(block_ids)))

    p.layer_hook = hook if layerwise else None
    p.add_request(rid, prompt, params, mode=RequestMode.PREFILL_ONLY, num_peer_cached_tokens=k)
    outs = []
    while p.has_unfinished():
        outs += [o for o in p.step() if o.request_id == rid]
    assert outs[-1].finished and outs[-1].finish_reason == "prefill_done"
    first = outs[-1].new_token_ids
    assert len(first) == 1
    if not layerwise:
        src = p.get_block_ids(rid)[k // p.config.block_size :]
        for layer_idx in range(p.model_config.num_hidden_layers):
            _copy_layer(p, d, layer_idx, src, reservation.new_block_ids)
    assert p.stats().num_pinned == 1
    p.release_request(rid)
    d.add_request(rid, prompt, params, mode=RequestMode.DECODE_ONLY, first_token_id=first[0])
    return first + _run(d)[rid], sent


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_prefill_then_decode_equals_colocated(ckpt, layerwise, params):
    expected = _colocated(ckpt, PROMPT, params)
    p = _engine(ckpt, max_num_batched_tokens=20)  # chunked: the hook fires over three steps
    d = _engine(ckpt, kv_layout="block-major")
    tokens, sent = _disaggregated(p, d, "r1", PROMPT, params, layerwise)
    assert tokens == expected
    if layerwise:
        per_layer = [b for layer, ids in sent if layer == 0 for b in ids]
        assert (
            len(per_layer) == 3 and len(set(per_layer)) == 3
        )  # every block exactly once per layer
    _assert_clean(p, d)


def test_cached_prefixes_on_both_sides(ckpt):
    expected = _colocated(ckpt, PROMPT, GREEDY)
    p = _engine(ckpt, enable_radix_caching=True)
    d = _engine(ckpt, enable_radix_caching=True)
    # D holds the first 32 tokens (2 blocks) from an earlier request; P holds the first block only
    d.add_request("warm-d", PROMPT[:33], GREEDY)
    p.add_request("warm-p", PROMPT[:17], GREEDY)
    _run(d), _run(p)
    reservation = d.reserve("probe", PROMPT)
    assert reservation.num_cached_tokens == 32 and len(reservation.new_block_ids) == 1
    d.release_request("probe")
    tokens, sent = _disaggregated(p, d, "r2", PROMPT, GREEDY, layerwise=True)
    assert tokens == expected
    assert [len(ids) for layer, ids in sent if layer == 0] == [1]  # only block 2 travels
    assert p.stats().num_hit_tokens >= 16
    _assert_clean(p, d)


def test_dcache_back_transfer_makes_next_turn_hit(ckpt):
    p = _engine(ckpt, enable_radix_caching=True)
    d = _engine(ckpt, enable_radix_caching=True)
    reservation = d.reserve("t1", PROMPT)
    p.add_request("t1", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY)
    first = [o for o in _run_outputs(p) if o.finished][0].new_token_ids[0]
    src = p.get_block_ids("t1")
    for layer_idx in range(p.model_config.num_hidden_layers):
        _copy_layer(p, d, layer_idx, src, reservation.new_block_ids)
    p.release_request("t1")
    d.add_request(
        "t1", PROMPT, GREEDY, mode=RequestMode.DECODE_ONLY, first_token_id=first, pin_on_finish=True
    )
    _run(d)
    tokens, num_computed = d.get_token_ids("t1")
    d_blocks = d.get_block_ids("t1")
    # back to P: reserve the conversation so far, fill the blocks P lacks, insert them into P's tree
    whole = num_computed // 16 * 16
    back = p.reserve("t1-back", tokens[:whole])
    assert back.num_cached_tokens == 32  # P cached the prompt's whole blocks on release
    start = back.num_cached_tokens // 16
    for layer_idx in range(p.model_config.num_hidden_layers):
        _copy_layer(d, p, layer_idx, d_blocks[start : whole // 16], back.new_block_ids)
    assert p.insert_cached(tokens[:whole], back.block_ids) == len(back.new_block_ids)
    p.release_request("t1-back")
    d.release_request("t1")
    # the next turn on P computes only what follows the back-transferred blocks
    next_turn = tokens + [10, 11, 12]
    p.add_request("t2", next_turn, GREEDY)
    _run(p)
    assert p.stats().num_hit_tokens >= whole
    _assert_clean(p, d)


def _run_outputs(engine: LLMEngine):
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_cache_reservation_keeps_received_kv_for_the_next_request(ckpt):
    """A request that ends at P's first token never decodes on D; the KV D received still goes into its
    tree (its whole prompt blocks), and a later decode from them equals a colocated run."""
    expected = _colocated(ckpt, PROMPT, GREEDY)
    p = _engine(ckpt)
    d = _engine(ckpt, enable_radix_caching=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    reservation = d.reserve("first", PROMPT)
    p.add_request("first", PROMPT, one, mode=RequestMode.PREFILL_ONLY)
    _run(p)
    src = p.get_block_ids("first")
    for layer_idx in range(p.model_config.num_hidden_layers):
        _copy_layer(p, d, layer_idx, src, reservation.new_block_ids)
    p.release_request("first")
    assert d.cache_reservation("first") == 2  # 46 tokens: two whole blocks
    d.release_request("first")
    _assert_clean(d)
    with pytest.raises(KeyError, match="first"):
        d.cache_reservation("first")
    tokens, sent = _disaggregated(p, d, "second", PROMPT, GREEDY, layerwise=True)
    assert tokens == expected
    assert [len(ids) for layer, ids in sent if layer == 0] == [1]  # only the partial block travels
    _assert_clean(p, d)
    # without caching nothing is adopted, and the reservation is released all the same
    plain = _engine(ckpt)
    plain.reserve("x", PROMPT)
    assert plain.cache_reservation("x") == 0
    plain.release_request("x")
    _assert_clean(plain)


def test_reserve_no_capacity_takes_nothing(ckpt):
    d = _engine(ckpt, num_kv_blocks=5)
    r = d.reserve("a", PROMPT)  # 3 blocks
    with pytest.raises(NoCapacity):
        d.reserve("b", PROMPT)
    assert d.stats().num_reserved_blocks == 3
    with pytest.raises(ValueError, match="already"):
        d.reserve("a", PROMPT)
    assert d.release_request("a") == 3 and r.num_cached_tokens == 0
    assert d.release_request("a") == 0  # idempotent
    _assert_clean(d)


def test_decode_only_errors_and_abort_paths(ckpt):
    d = _engine(ckpt)
    with pytest.raises(ValueError, match="reserve"):
        d.add_request("x", PROMPT, GREEDY, mode=RequestMode.DECODE_ONLY, first_token_id=5)
    d.reserve("x", PROMPT)
    with pytest.raises(ValueError, match="first_token_id"):
        d.add_request("x", PROMPT, GREEDY, mode=RequestMode.DECODE_ONLY)
    with pytest.raises(ValueError, match="differs"):
        d.add_request("x", PROMPT[:-1], GREEDY, mode=RequestMode.DECODE_ONLY, first_token_id=5)
    d.add_request("x", PROMPT, GREEDY, mode=RequestMode.DECODE_ONLY, first_token_id=5)
    d.step()
    assert d.abort_request("x") and not d.abort_request("x")
    # a first token that already ends the request finishes it with no new tokens
    d.reserve("y", PROMPT)
    d.add_request(
        "y", PROMPT, SamplingParams(max_tokens=1), mode=RequestMode.DECODE_ONLY, first_token_id=5
    )
    outs = d.step()
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [("y", [], "length")]
    # prefill-only aborted mid-prefill, and pinned then aborted
    p = _engine(ckpt, max_num_batched_tokens=16)
    p.add_request("z", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY)
    p.step()
    assert p.abort_request("z")
    p.add_request("w", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY)
    _run(p)
    assert p.stats().num_pinned == 1 and p.abort_request("w")
    with pytest.raises(ValueError, match="multiple of block_size"):
        p.add_request("v", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY, num_peer_cached_tokens=5)
    _assert_clean(d, p)


def test_kv_layout_addresses_match_tensor(ckpt):
    for layout in ("layer-major", "block-major"):
        engine = _engine(ckpt, kv_layout=layout)
        kv = engine.kv_layout()
        # the transfer engine's own class: it registers and sends from this as it is
        assert type(kv) is pdserve.transfer.KVLayout
        assert pdserve.transfer.KVLayout.from_dict(kv.to_dict()) == kv
        layer, block = 1, 7
        piece = engine.runner.kv_layers[layer][block]
        assert piece.is_contiguous()
        assert (
            piece.data_ptr()
            == kv.base_addr + layer * kv.layer_stride_nbytes + block * kv.block_stride_nbytes
        )
        assert piece.numel() * piece.element_size() == kv.piece_nbytes
        assert kv.nbytes == kv.num_layers * kv.num_blocks * kv.piece_nbytes


def test_engine_import_leaves_the_transfer_extension_out():
    """The engine builds its KVLayout from pdserve.kv_layout: importing it loads neither
    pdserve.transfer nor the native _transfer extension."""
    code = (
        "import sys, pdserve.engine.llm_engine, pdserve.engine.tp_worker; "
        "print(sorted(m for m in sys.modules if m.startswith(('pdserve.transfer', 'pdserve._transfer'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prefill_only_preempted_mid_prompt_sends_each_block_once(ckpt):
    """A prefill-only request preempted after sending some blocks goes on from where it was: the
    peer's blocks stay valid (recomputed KV is identical), so nothing is sent twice."""
    expected = _colocated(ckpt, PROMPT, GREEDY)
    p = _engine(ckpt, num_kv_blocks=9, block_size=8, max_num_batched_tokens=16)
    d = _engine(ckpt, block_size=8)
    reservation = d.reserve("pf", PROMPT)
    sent_per_layer = [0] * p.model_config.num_hidden_layers

    def hook(layer_idx, items):
        for request_id, block_ids in items:
            if request_id != "pf":
                continue
            start = sent_per_layer[layer_idx]
            _copy_layer(
                p,
                d,
                layer_idx,
                block_ids,
                reservation.new_block_ids[start : start + len(block_ids)],
            )
            sent_per_layer[layer_idx] += len(block_ids)

    p.layer_hook = hook
    p.add_request("hog", [256] + list(range(1, 30)), SamplingParams(max_tokens=40, ignore_eos=True))
    p.add_request("pf", PROMPT, GREEDY, mode=RequestMode.PREFILL_ONLY)
    first = None
    while p.has_unfinished():
        for out in p.step():
            if out.request_id == "pf" and out.finished:
                first = out.new_token_ids[0]
    assert p.stats().num_preemptions >= 1
    assert sent_per_layer == [len(reservation.new_block_ids)] * p.model_config.num_hidden_layers
    p.release_request("pf")
    d.add_request("pf", PROMPT, GREEDY, mode=RequestMode.DECODE_ONLY, first_token_id=first)
    assert [first] + _run(d)["pf"] == expected
    _assert_clean(p, d)
