"""The inference engine: Llama-family model, paged KV cache, batch scheduler, sampler, model runner.

Entry points (DESIGN §3): `LLMEngine`, `EngineConfig`, `SamplingParams`, `RequestMode`, `Reservation`,
`NoCapacity`, `RequestOutput` (with `TokenLogprobs`), `KVLayout`, `WorkerFailure` (a tensor-parallel worker died); the offline API is `LLM`. Imported lazily by callers that
need torch; this module itself stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLMEngine": "pdserve.engine.llm_engine",
    "EngineStats": "pdserve.engine.llm_engine",
    "EngineConfig": "pdserve.engine.config",
    "ModelConfig": "pdserve.engine.config",
    "SamplingParams": "pdserve.engine.sampling_params",
    "RequestMode": "pdserve.engine.sequence",
    "RequestOutput": "pdserve.engine.sequence",
    "TokenLogprobs": "pdserve.engine.sequence",
    "Reservation": "pdserve.engine.block_manager",
    "NoCapacity": "pdserve.engine.block_manager",
    "KVLayout": "pdserve.kv_layout",
    "LLM": "pdserve.engine.llm",
    "Tokenizer": "pdserve.engine.tokenizer",
    "WorkerFailure": "pdserve.engine.distributed",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pdserve.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


__all__ = sorted(_LAZY)
