"""Programmatic dependent launch (PDL) for the decode path's Triton kernels (Hopper and newer).

Why: a batch-1 decode step is ~400 dependent kernels. Without PDL each one starts only after the one
before it has drained, so every launch costs a ramp-down, a launch and a ramp-up at a few microseconds
each. With PDL a kernel's programs are scheduled while its predecessor finishes; they first do the work
that needs nothing from earlier kernels (the GEMV loads its first weight tile), then wait at
`gdc_wait` until the predecessor's writes are visible.

Contract for every kernel launched with `launch_kwargs()`: it takes a `USE_PDL: tl.constexpr` and,
when set, calls `tl.extra.cuda.gdc_wait()` before its first load of anything an earlier kernel wrote
and before its first store (a store must not race with an earlier kernel still reading the buffer).
Before the wait it may only read memory no kernel of the step writes (weights, tables built on the
host). Waiting on the predecessor is transitive: it waited on its own predecessor before finishing.
Kernels launched without PDL (torch, cuBLAS) wait for everything before them, as usual.

The switch is process-wide, like `ops.linear.set_small_batch_gemv`: the engine turns it on when the
GPU and the installed Triton support it.
"""

from __future__ import annotations

import os

import torch

_state = {"enabled": False}


def pdl_supported(device: torch.device) -> bool:
    """True on a CUDA device of compute capability >= 9 with a Triton that can launch with PDL."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def set_pdl(enabled: bool) -> None:
    """Launch the decode path's Triton kernels with PDL (True) or plainly (False)."""
    _state["enabled"] = bool(enabled)


def pdl_enabled() -> bool:
    return _state["enabled"]


def launch_kwargs(x: torch.Tensor) -> dict:
    """Extra launch arguments of a PDL-capable kernel whose main input is `x`: USE_PDL and, when on,
    launch_pdl. Off for CPU tensors (Triton's interpreter)."""
    if _state["enabled"] and x.is_cuda:
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
