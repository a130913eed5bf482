"""pdserve: LLM serving with prefill/decode disaggregation and radix context caching.

`from pdserve import LLM, SamplingParams` is the offline API; the heavy modules (torch, the engine)
load on first use so that `import pdserve` and the CLI's help stay fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "pdserve.engine.llm",
    "SamplingParams": "pdserve.engine.sampling_params",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'pdserve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


__all__ = ["LLM", "SamplingParams", "__version__"]
