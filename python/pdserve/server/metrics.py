"""Prometheus metrics of an instance or the scheduler, in a registry of their own (one per server).

Gauges are filled from a stats dict at scrape time; counters and histograms are updated as requests go.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TIER_NAMES = {0: "gpu", 1: "host"}


class ServerMetrics:
    def __init__(self, component: str):
        self.registry = CollectorRegistry()
        r = self.registry
        p = "pdserve"
        self.num_waiting = Gauge(
            f"{p}_num_requests_waiting", "requests queued in the engine", registry=r
        )
        self.num_running = Gauge(
            f"{p}_num_requests_running", "requests running in the engine", registry=r
        )
        self.num_queued_prefill_tokens = Gauge(
            f"{p}_num_queued_prefill_tokens", "prompt tokens waiting for prefill", registry=r
        )
        self.num_reserved_requests = Gauge(
            f"{p}_num_reserved_requests",
            "decode reservations whose KV is still arriving",
            registry=r,
        )
        self.blocks = Gauge(
            f"{p}_kv_blocks", "KV blocks by tier and state", ["tier", "state"], registry=r
        )
        self.cache_hit_tokens = Counter(
            f"{p}_prefix_cache_hit_tokens", "prompt tokens served from the radix cache", registry=r
        )
        self.prefill_computed_tokens = Counter(
            f"{p}_prefill_computed_tokens", "prompt tokens actually computed", registry=r
        )
        self.transfer_bytes = Counter(
            f"{p}_kv_transfer_bytes", "KV bytes moved between instances", ["direction"], registry=r
        )
        self.transfer_seconds = Counter(
            f"{p}_kv_transfer_seconds",
            "seconds spent receiving KV (expect to last byte)",
            registry=r,
        )
        self.requests = Counter(f"{p}_requests", "finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(
            f"{p}_prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.generation_tokens = Counter(f"{p}_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            f"TTFT seen by the {component}",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{p}_time_per_output_token_seconds",
            f"mean inter-token time per request seen by the {component}",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_send_wait = Histogram(
            f"{p}_kv_send_wait_seconds",
            "prefill instance: from a prefill's first token to its decode peer holding every byte "
            "(the part of the KV transfer not hidden behind the prefill)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._last_bytes = {"sent": 0, "received": 0}
        self._last_seconds = 0.0
        self._last_counts: dict[str, int] = {}

    def update_from_stats(self, stats: dict) -> None:
        """Set gauges from an instance's stats dict (see InstanceServer.stats)."""
        self.num_waiting.set(stats.get("num_waiting", 0))
        self.num_running.set(stats.get("num_running", 0))
        self.num_queued_prefill_tokens.set(stats.get("num_queued_prefill_tokens", 0))
        self.num_reserved_requests.set(stats.get("num_reservations", 0))
        for tier in stats.get("tiers", []):
            name = TIER_NAMES.get(tier.get("tier"), str(tier.get("tier")))
            for state in ("free", "cached", "in_use", "reserved", "total"):
                self.blocks.labels(tier=name, state=state).set(tier.get(f"num_{state}", 0))
        for counter, key in (
            (self.cache_hit_tokens, "num_hit_tokens"),
            (self.prefill_computed_tokens, "num_computed_prefill_tokens"),
        ):
            delta = stats.get(key, 0) - self._last_counts.get(key, 0)
            if delta > 0:
                counter.inc(delta)
                self._last_counts[key] = stats.get(key, 0)

    def sync_transfer(self, bytes_sent: int, bytes_received: int, seconds_receiving: float) -> None:
        """Counters from the transport's running totals."""
        for direction, now in (("sent", bytes_sent), ("received", bytes_received)):
            delta = now - self._last_bytes[direction]
            if delta > 0:
                self.transfer_bytes.labels(direction=direction).inc(delta)
                self._last_bytes[direction] = now
        if seconds_receiving > self._last_seconds:
            self.transfer_seconds.inc(seconds_receiving - self._last_seconds)
            self._last_seconds = seconds_receiving

    def observe_request(
        self,
        ttft: float | None,
        tpot: float | None,
        finish_reason: str | None,
        num_prompt_tokens: int,
        num_output_tokens: int,
    ) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.requests.labels(finish_reason=str(finish_reason)).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
