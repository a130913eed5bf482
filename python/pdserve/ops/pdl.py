"""Programmatic dependent launch (PDL) for the decode path's Triton kernels (Hopper and newer).

Why: a batch-1 decode step is ~400 dependent kernels. Without PDL each one starts only after the one
before it has drained, so every launch costs a ramp-down, a launch and a ramp-up at a few microseconds
each. With PDL a kernel's programs are scheduled while its predecessor finishes; they first do the work
that needs nothing from earlier kernels (the GEMV pulls its first weight tiles into L2), then wait at
`gdc_wait` until the predecessor's writes are visible.

Contract for every kernel launched with `launch_kwargs()`: it takes a `USE_PDL: tl.constexpr` and,
when set, calls `tl.extra.cuda.gdc_wait()` before its first load of anything an earlier kernel wrote
and before its first store (a store must not race with an earlier kernel still reading the buffer).
Before the wait it may only read memory no kernel of the step writes (weights, tables built on the
host). Waiting on the predecessor is transitive: it waited on its own predecessor before finishing.
Kernels launched without PDL (torch, cuBLAS) wait for everything before them, as usual.

The switch is process-wide, like `ops.linear.set_small_batch_gemv`: the engine turns it on when the
GPU, the installed Triton and the driver support it (`pdl_supported` probes once per device).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None
    tl = None

log = logging.getLogger(__name__)
_state = {"enabled": False}

if triton is not None:

    @triton.jit
    def _probe_kernel(x_ptr):
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        tl.store(x_ptr, tl.load(x_ptr) + 1)


def pdl_supported(device: torch.device) -> bool:
    """True on a CUDA device of compute capability >= 9 with a Triton that can launch with PDL and a
    driver that runs such a launch (probed once per device with a one-element kernel)."""
    if triton is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_wait  # noqa: F401
    except ImportError:
        return False
    if "launch_pdl" not in getattr(CUDAOptions, "__dataclass_fields__", {}):
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return _probe(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _probe(device_index: int) -> bool:
    try:
        with torch.cuda.device(device_index):
            x = torch.zeros(1, dtype=torch.int32, device=f"cuda:{device_index}")
            for _ in range(2):
                _probe_kernel[(1,)](x, launch_pdl=True)
            ok = int(x.item()) == 2
    except Exception as exc:  # noqa: BLE001 - any failure means: launch plainly
        log.warning("programmatic dependent launch unavailable, launching plainly: %s", exc)
        return False
    if not ok:
        log.warning("programmatic dependent launch gave a wrong result; launching plainly")
    return ok


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
