"""Shared pytest set-up: the `gpu` marker skips unless a CUDA device is present; no auth secrets leak in."""

from __future__ import annotations

import os

import pytest

# The cluster tests start open clusters (the children inherit this environment): a key or token set
# by the caller would lock them. tests/test_cluster_auth.py gives its processes their own.
for _name in ("PDSERVE_API_KEY", "PDSERVE_CLUSTER_TOKEN"):
    os.environ.pop(_name, None)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
