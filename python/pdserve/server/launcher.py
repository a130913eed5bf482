"""Start pdserve processes on this machine and always stop them: the demo's and the cluster tests' harness.

Each child runs `python -m pdserve ...` in its own process group; `ProcessGroup.close()` (also on
Ctrl-C, on failure, and at interpreter exit) sends SIGTERM, waits, then SIGKILLs what is left, so no
process outlives the group.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(
    url: str, payload: dict | None = None, timeout: float = 60.0, headers: dict | None = None
) -> dict:
    """GET (payload None) or POST JSON; returns the JSON body; raises urllib errors on HTTP errors.
    `headers` go along (e.g. `auth.cluster_headers(token)` for an internal endpoint)."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def histogram_sum_count(
    url: str, name: str, headers: dict | None = None, timeout: float = 30.0
) -> tuple[float, float]:
    """(sum, count) of the Prometheus histogram `name` at `url`/metrics ((0, 0) when absent);
    `headers` go along (a cluster token). Raises urllib errors on HTTP errors."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(f"{url}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples}
            return values.get("sum", 0.0), values.get("count", 0.0)
    return 0.0, 0.0


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: str

    def log_tail(self, num_chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-num_chars:]
        except OSError:
            return ""


class ProcessGroup:
    """A set of pdserve processes started together and stopped together."""

    def __init__(self, log_dir: str | None = None, env: dict[str, str] | None = None):
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="pdserve-")
        self.children: list[Child] = []
        self.env = dict(os.environ)
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.env.update(env or {})
        atexit.register(self.close)

    def start(self, name: str, args: list[str]) -> Child:
        log_path = os.path.join(self.log_dir, f"{name}.log")
        log_file = open(log_path, "w")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(
            [sys.executable, "-m", "pdserve", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,  # its own process group: signals to us do not race it
        )
        log_file.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def wait_healthy(
        self, child: Child, url: str, timeout: float = 60.0, ready_key: str | None = None
    ) -> dict:
        """Polls url/health until it answers 200 (and `ready_key` is true, if given)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for other in self.children:  # any process of the group dying ends the wait
                if other.proc.poll() is not None:
                    raise RuntimeError(
                        f"{other.name} exited with code {other.proc.returncode}; its log:\n{other.log_tail()}"
                    )
            try:
                health = http_json(f"{url}/health", timeout=5)
                if ready_key is None or health.get(ready_key):
                    return health
                last = json.dumps(health)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(
            f"{child.name} at {url} not healthy after {timeout}s ({last}); log:\n{child.log_tail()}"
        )

    def stop(self, child: Child, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stops one process (SIGKILL after `timeout`) and drops it from the group; returns its exit code."""
        if child.proc.poll() is None:
            try:
                os.killpg(child.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        self.children = [c for c in self.children if c is not child]
        return child.proc.returncode

    def close(self, timeout: float = 10.0) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait()
        self.children = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
