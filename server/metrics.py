"""Prometheus metrics of one processing server, in a registry owned by its app.

No module-level registry: tests run several apps in one process, and each must count
only its own requests. prometheus_client is imported here only, so ``import server``
stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("read", "decode", "process", "encode", "store", "total")
# Seconds: from a cached thumbnail (~1 ms) to a large tiled pipeline (~30 s).
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _LoadCollector:
    """Gauges and counters read at scrape time from the admission snapshot, so the
    hot path keeps no second copy of them."""

    def __init__(self, load: Callable[[], dict[str, Any]], inflight: Callable[[], int]):
        self._load, self._inflight = load, inflight

    def collect(self):
        snap = self._load()
        yield GaugeMetricFamily("imagefleet_worker_inflight",
                                "requests in flight (any route but /health)",
                                value=self._inflight())
        yield GaugeMetricFamily("imagefleet_worker_busy_slots",
                                "processing slots busy", value=snap["busy"])
        yield GaugeMetricFamily("imagefleet_worker_slots",
                                "processing slots", value=snap["slots"])
        yield GaugeMetricFamily("imagefleet_worker_queued",
                                "admitted requests waiting for a slot", value=snap["queued"])
        yield CounterMetricFamily("imagefleet_worker_shed",
                                  "requests refused with 503 overloaded", value=snap["shed"])


class WorkerMetrics:
    def __init__(self, load: Callable[[], dict[str, Any]], inflight: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imagefleet_worker_requests", "requests by operation and status",
                                ["operation", "status"], registry=r)
        self.stage_seconds = Histogram("imagefleet_worker_stage_seconds",
                                       "time per stage of a /process request", ["stage"],
                                       buckets=BUCKETS, registry=r)
        self.cache_hits = Counter("imagefleet_worker_cache_hits",
                                  "requests answered from a stored result", registry=r)
        self.bytes_in = Counter("imagefleet_worker_bytes_in", "request body bytes", registry=r)
        self.bytes_out = Counter("imagefleet_worker_bytes_out", "result bytes produced",
                                 registry=r)
        r.register(_LoadCollector(load, inflight))

    def observe(self, operation: str, status: int, timings_ms: dict[str, float],
                cached: bool, bytes_in: int, bytes_out: int) -> None:
        self.requests.labels(operation or "none", str(status)).inc()
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(stage).observe(ms / 1000)
        if cached:
            self.cache_hits.inc()
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
