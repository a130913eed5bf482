"""The instance server's one door into `pdserve.engine` (DESIGN §3), so engine API drift stays in this file.

Every function here that takes `engine` runs on the engine thread (see engine_loop.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from pdserve.kv_layout import KVLayout
from pdserve.server.cli_serve import ConfigError, ServeConfig
from pdserve.server.protocol import SamplingSpec


@dataclass
class ReserveResult:
    num_cached_tokens: int
    cached_block_ids: list[int]
    new_block_ids: list[int]


def _engine_module():
    import pdserve.engine as eng

    try:
        from pdserve.engine.engine import LLMEngine  # noqa: F401
    except ImportError:
        pass
    return eng


def _find(name: str):
    """A name from pdserve.engine or one of its modules."""
    import importlib

    eng = _engine_module()
    if hasattr(eng, name):
        return getattr(eng, name)
    for mod in (
        "engine",
        "llm_engine",
        "config",
        "sampling_params",
        "sequence",
        "block_manager",
        "tokenizer",
    ):
        try:
            m = importlib.import_module(f"pdserve.engine.{mod}")
        except ImportError:
            continue
        if hasattr(m, name):
            return getattr(m, name)
    raise ImportError(f"pdserve.engine has no {name} (engine branch not merged or API changed)")


def engine_config_kwargs(config: ServeConfig) -> dict[str, Any]:
    """EngineConfig arguments for a ServeConfig; raises ConfigError for a feature the engine lacks."""
    EngineConfig = _find("EngineConfig")
    fields = set(inspect.signature(EngineConfig).parameters)
    kw: dict[str, Any] = {
        "model": config.model,
        "load_format": config.load_format,
        "dtype": config.dtype,
        "device": config.device,
        "seed": config.seed,
        "block_size": config.block_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enable_radix_caching": config.enable_radix_caching,
        "tensor_parallel_size": config.tensor_parallel_size,
        "worker_use_ray": config.worker_use_ray,
        "custom_all_reduce": not config.disable_custom_all_reduce,
        "kv_layout": "block-major" if config.use_agg_block else "layer-major",
    }
    if config.kv_cache_gb is not None:
        kw["kv_cache_gb"] = config.kv_cache_gb
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        if getattr(config, name) is not None:
            kw[name] = getattr(config, name)
    # features an engine build may lack: refuse the flag rather than ignore it
    if config.enable_trans_to_dram:
        if "enable_host_tier" not in fields:
            raise ConfigError("--enable-trans-to-dram: this engine build has no host DRAM tier yet")
        kw["enable_host_tier"] = True
        if config.host_kv_cache_gb is not None:
            kw["host_kv_cache_gb"] = config.host_kv_cache_gb
    if config.enable_radix_evictor:
        if "enable_radix_evictor" not in fields:
            raise ConfigError("--enable-radix-evictor: this engine build has no evictor yet")
        kw["enable_radix_evictor"] = True
    if config.kv_cache_gb is None and "kv_cache_gb" in fields:
        kw["kv_cache_gb"] = 0.25  # CPU default: plenty for tiny, small enough for tests
    return {k: v for k, v in kw.items() if k in fields}


def build_engine(config: ServeConfig):
    """The engine (with its tensor-parallel workers started); raises ConfigError naming the flag when
    the engine refuses the settings (a TP size the model cannot split, Ray missing, ...)."""
    EngineConfig = _find("EngineConfig")
    LLMEngine = _find("LLMEngine")
    try:
        return LLMEngine(EngineConfig(**engine_config_kwargs(config)))
    except ValueError as exc:
        message = str(exc)
        n = config.tensor_parallel_size
        if n > 1 and "--tensor-parallel-size" not in message and "--worker-use-ray" not in message:
            if any(k in message for k in ("tensor_parallel_size", "tp_size", "tp size")):
                message = f"--tensor-parallel-size {n}: {message}"
        raise ConfigError(message) from exc


def shutdown(engine) -> None:
    """Stops the engine's tensor-parallel workers (no-op at TP 1); idempotent."""
    fn = getattr(engine, "shutdown", None)
    if fn is not None:
        fn()


def is_worker_failure(exc: BaseException) -> bool:
    """True for the engine's `WorkerFailure` (a TP worker died or failed: the engine is unusable)."""
    try:
        from pdserve.engine.distributed import WorkerFailure
    except ImportError:
        return False
    return isinstance(exc, WorkerFailure)


def load_tokenizer(model: str):
    """The engine's tokenizer for a model name or directory (no weights loaded)."""
    ModelConfig = _find("ModelConfig")
    Tokenizer = _find("Tokenizer")
    mc = ModelConfig.load(model)
    if mc.model_dir is None:
        return Tokenizer.byte_level()
    return Tokenizer.from_dir(mc.model_dir, mc.eos_token_ids, mc.bos_token_id)


def engine_tokenizer(engine):
    tok = getattr(engine, "tokenizer", None)
    if tok is None:
        raise RuntimeError("engine exposes no tokenizer")
    return tok


def sampling_params(spec: SamplingSpec):
    SamplingParams = _find("SamplingParams")
    fields = set(inspect.signature(SamplingParams).parameters)
    return SamplingParams(**{k: v for k, v in spec.to_dict().items() if k in fields})


def _mode(name: str):
    RequestMode = _find("RequestMode")
    return getattr(RequestMode, name)


def add_colocated(engine, request_id: str, token_ids: list[int], spec: SamplingSpec) -> None:
    engine.add_request(request_id, list(token_ids), sampling_params(spec))


def add_prefill_only(
    engine, request_id: str, token_ids: list[int], spec: SamplingSpec, num_peer_cached_tokens: int
):
    engine.add_request(
        request_id,
        list(token_ids),
        sampling_params(spec),
        mode=_mode("PREFILL_ONLY"),
        num_peer_cached_tokens=num_peer_cached_tokens,
    )


def add_decode_only(
    engine, request_id: str, token_ids: list[int], spec: SamplingSpec, first_token_id: int
):
    engine.add_request(
        request_id,
        list(token_ids),
        sampling_params(spec),
        mode=_mode("DECODE_ONLY"),
        first_token_id=first_token_id,
    )


def reserve(
    engine, request_id: str, token_ids: list[int], count_hits: bool = True
) -> ReserveResult:
    """Reserves (see LLMEngine.reserve); count_hits False for dcache's locks and back-transfers."""
    r = engine.reserve(request_id, list(token_ids), count_hits=count_hits)
    return ReserveResult(
        int(r.num_cached_tokens),
        [int(b) for b in r.cached_block_ids],
        [int(b) for b in r.new_block_ids],
    )


def is_no_capacity(exc: BaseException) -> bool:
    try:
        return isinstance(exc, _find("NoCapacity"))
    except ImportError:
        return False


def release(engine, request_id: str) -> None:
    engine.release_request(request_id)


def abort(engine, request_id: str) -> None:
    engine.abort_request(request_id)


def insert_cached(engine, token_ids: list[int], block_ids: list[int]) -> int:
    return int(engine.insert_cached(list(token_ids), list(block_ids)) or 0)


def cache_reservation(engine, request_id: str) -> int:
    return int(engine.cache_reservation(request_id) or 0)


def set_layer_hook(engine, hook) -> None:
    if hasattr(engine, "set_layer_hook"):
        engine.set_layer_hook(hook)
    else:
        engine.layer_hook = hook


def has_work(engine) -> bool:
    for name in ("has_unfinished", "has_unfinished_requests", "has_work"):
        fn = getattr(engine, name, None)
        if fn is not None:
            return bool(fn())
    return not engine.is_finished()


def kv_tensors(engine) -> list:
    """Each tensor-parallel rank's KV tensor (index = rank; [L, B, ...] or [B, L, ...]), all addressable
    in this process; the engine owns the memory."""
    fn = getattr(engine, "kv_caches", None)
    return list(fn()) if fn is not None else [engine.runner.kv_cache]


def record_kv_ready(engine) -> Any:
    """A CUDA event recorded on the engine's stream after the KV work enqueued so far (so it completes
    once those blocks are written); None when the KV is not on a GPU. Engine thread; keep it alive until
    the send that names it (`event.cuda_event`, the handle) was queued."""
    kv = kv_tensors(engine)[0]
    if not kv.is_cuda:
        return None
    import torch

    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(kv.device))
    return event


def kv_dtype(engine) -> str:
    """The KV cache's element type as torch names it without the prefix (e.g. "bfloat16")."""
    return str(kv_tensors(engine)[0].dtype).removeprefix("torch.")


def kv_layouts(engine) -> list[KVLayout]:
    """Each rank's KVLayout (index = rank; rank i's pieces go to the peer's rank i), the class the
    transfer engine takes as it is."""
    fn = getattr(engine, "kv_layouts", None)
    return list(fn()) if fn is not None else [engine.kv_layout()]


def output_logprobs(out) -> list[dict] | None:
    """The output's new tokens' log-probabilities as JSON, one {"logprob", "top": [[id, logprob],
    ...]} per token; None when the request did not ask for them."""
    entries = getattr(out, "new_logprobs", None)
    return None if entries is None else [_logprobs_json(e) for e in entries]


def output_prompt_logprobs(out) -> list[dict | None] | None:
    """The output's prompt log-probabilities as JSON (None for the first token, then entries as in
    `output_logprobs`); None when the output carries none."""
    entries = getattr(out, "prompt_logprobs", None)
    return None if entries is None else [None if e is None else _logprobs_json(e) for e in entries]


def _logprobs_json(entry) -> dict:
    """A TokenLogprobs as {"logprob", "top": [[id, logprob], ...]} (what TokenDelta carries)."""
    return {"logprob": float(entry.logprob), "top": [[int(t), float(lp)] for t, lp in entry.top]}


def output_fields(out) -> tuple[str, list[int], str | None, int | None]:
    """(request_id, new token ids, finish reason or None, cached prompt tokens if known)."""
    finish = getattr(out, "finish_reason", None)
    if not getattr(out, "finished", finish is not None):
        finish = None
    return (
        str(out.request_id),
        [int(t) for t in out.new_token_ids],
        finish,
        getattr(out, "num_cached_tokens", None),
    )


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(getattr(value, k)) for k in value.__dataclass_fields__}
    if hasattr(value, "value") and hasattr(value, "name"):  # enum
        return value.value
    return value


def stats(engine) -> dict:
    """Engine stats as plain JSON data, plus the names the scheduler and /metrics read:
    `num_queued_prefill_tokens` (prompt tokens not computed yet) and `tiers` (per-tier block counts)."""
    raw = _plain(engine.stats())
    if hasattr(raw, "as_dict"):
        raw = raw.as_dict()
    if not isinstance(raw, dict):
        raw = {"raw": raw}
    sched = getattr(engine, "scheduler", None)
    queued = 0
    for seq in list(getattr(sched, "waiting", [])) + list(getattr(sched, "running", [])):
        n_prompt = getattr(seq, "num_prompt_tokens", 0)
        queued += max(0, n_prompt - min(n_prompt, getattr(seq, "num_computed_tokens", 0)))
    raw.setdefault("num_queued_prefill_tokens", queued)
    if "tiers" not in raw:
        raw["tiers"] = [
            {
                "tier": 0,
                "num_total": raw.get("num_total_blocks", 0),
                "num_free": raw.get("num_free_blocks", 0),
                "num_cached": raw.get("num_cached_blocks", 0),
                "num_in_use": raw.get("num_used_blocks", 0),
                "num_reserved": raw.get("num_reserved_blocks", 0),
            }
        ]
        host_total = raw.get("num_host_total_blocks", 0)
        if host_total:
            free, cached = raw.get("num_host_free_blocks", 0), raw.get("num_host_cached_blocks", 0)
            raw["tiers"].append(
                {
                    "tier": 1,
                    "num_total": host_total,
                    "num_free": free,
                    "num_cached": cached,
                    "num_in_use": host_total - free - cached,
                    "num_reserved": 0,
                }
            )
    return raw


def check_invariants(engine) -> str | None:
    """None if the block invariant holds, else the error message."""
    fn = getattr(engine, "check_invariants", None)
    if fn is None:
        bm = getattr(engine, "block_manager", None) or getattr(
            getattr(engine, "scheduler", None), "block_manager", None
        )
        fn = getattr(bm, "check_invariants", None)
    if fn is None:
        return None
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return str(exc)
    return None


_warned_event_shape = False


def drain_cache_events(engine) -> list[dict]:
    """Cache events as wire dicts. Events of another shape (the engine's interim Python cache emits
    tuples without block hashes) cannot feed an exact mirror: they are dropped, with one warning."""
    global _warned_event_shape
    from pdserve.server.prefix_index import CacheEvent

    fn = getattr(engine, "drain_cache_events", None)
    if fn is None:
        return []
    events = []
    for e in fn():
        try:
            events.append(CacheEvent.from_any(e).to_dict())
        except (AttributeError, TypeError, ValueError) as exc:
            if not _warned_event_shape:
                import logging

                logging.getLogger("pdserve.instance").warning(
                    "cache events without block hashes (%r: %s); the prefix policy sees no cache here",
                    e,
                    exc,
                )
                _warned_event_shape = True
    return events
