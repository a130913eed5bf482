"""Checks shared by the cluster tests: after a test, every instance must settle into a clean state."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from http.client import HTTPResponse

import pytest
from pdserve.server.auth import cluster_headers
from pdserve.server.launcher import http_json

# what every CPU cluster test's instances share: the tiny model, a KV pool of a few hundred blocks
TINY_CPU = ["--model", "tiny", "--device", "cpu", "--kv-cache-gb", "0.02"]


def post_error(url: str, body: dict | None, headers: dict | None = None) -> tuple[int, str]:
    """POSTs body (GET when None), which must fail: returns the HTTP status and the error message."""
    with pytest.raises(urllib.error.HTTPError) as info:
        http_json(url, body, headers=headers)
    return info.value.code, json.loads(info.value.read())["error"]["message"]


def open_stream(
    url: str, body: dict, headers: dict | None = None, timeout: float = 60
) -> HTTPResponse:
    """POSTs body as JSON and returns the open response (SSE or NDJSON lines; close it, or use `with`)."""
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    return urllib.request.urlopen(req, timeout=timeout)


def settle_and_check(
    urls: list[str], timeout: float = 10.0, cluster_token: str | None = None
) -> None:
    """Block invariant on every instance; nothing reserved, pinned or in flight (after background work).
    `cluster_token`: the instances' --cluster-token (their stats are internal)."""
    deadline = time.monotonic() + timeout
    while True:
        problems = []
        for url in urls:
            s = http_json(f"{url}/internal/v1/stats", headers=cluster_headers(cluster_token))
            if s["invariant_error"]:
                problems.append(f"{url}: invariant: {s['invariant_error']}")
            if s["num_free_staging_slots"] != s["num_staging_slots"]:
                problems.append(
                    f"{url}: staging slots held: {s['num_staging_slots'] - s['num_free_staging_slots']}"
                )
            for key in (
                "num_reservations",
                "num_pinned_prefills",
                "num_dcache_reservations",
                "num_pending_transfers",
                "num_open_streams",
                "num_staged",
                "num_reserved_blocks",
                "num_pinned",
                "num_reserved_requests",
                "num_running",
                "num_waiting",
                "num_used_blocks",
            ):
                if s.get(key, 0):
                    problems.append(f"{url}: {key}={s[key]}")
        if not problems:
            return
        if time.monotonic() > deadline:
            raise AssertionError("; ".join(problems))
        time.sleep(0.2)
