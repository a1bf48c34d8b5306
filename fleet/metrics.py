"""Prometheus metrics of the fleet manager and of the local gateway, each in a registry
it owns (tests run several fleets in one process; no module-level registry).

The gateway answers ``GET /metrics`` itself with its own registry and the manager's;
the AWS manager serves its own on its admin address (fleet/admin.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fleet.alerts import REPLACEMENT_REASONS  # terminations that replace a failed instance

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0)


class _Gauges:
    """Gauges computed at scrape time from a callable: nothing to keep in step."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, float]]]):
        self._read = read

    def collect(self):
        for name, doc, value in self._read():
            if name.endswith("_total"):
                yield CounterMetricFamily(name[:-6], doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


class ManagerMetrics:
    def __init__(self, state: Callable[[], dict[str, Any]]):
        """``state`` returns ``{"desired", "min", "max", "instances", "healthy"}``."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.actions = Counter("imagefleet_manager_actions", "actions carried out, by kind "
                               "and outcome", ["kind", "outcome"], registry=r)
        self.launch_failures = Counter("imagefleet_manager_launch_failures",
                                       "launches the provider refused or that failed",
                                       registry=r)
        self.replacements = Counter("imagefleet_manager_replacements",
                                    "instances terminated because they failed or were "
                                    "replaced (not scale-in)", registry=r)

        def gauges():
            s = state()
            yield "imagefleet_manager_desired", "desired instance count", s["desired"]
            yield "imagefleet_manager_min", "minimum instance count", s["min"]
            yield "imagefleet_manager_max", "maximum instance count", s["max"]
            yield "imagefleet_manager_instances", "live instances", s["instances"]
            yield "imagefleet_manager_healthy", "healthy instances", s["healthy"]

        r.register(_Gauges(gauges))

    def action(self, kind: str, ok: bool, reason: str = "") -> None:
        self.actions.labels(kind, "ok" if ok else "failed").inc()
        if kind == "launch" and not ok:
            self.launch_failures.inc()
        if kind == "terminate" and ok and reason in REPLACEMENT_REASONS:
            self.replacements.inc()


class GatewayMetrics:
    def __init__(self, state: Callable[[], dict[str, float]]):
        """``state`` returns ``{"healthy", "targets", "open_connections", "shed"}``."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("imagefleet_gateway_requests", "requests answered, by status",
                                ["status"], registry=r)
        self.upstream_seconds = Histogram("imagefleet_gateway_upstream_seconds",
                                          "time from forwarding to the end of the worker's "
                                          "answer", buckets=UPSTREAM_BUCKETS, registry=r)

        def gauges():
            s = state()
            yield "imagefleet_gateway_healthy_targets", "targets in rotation", s["healthy"]
            yield "imagefleet_gateway_targets", "registered targets", s["targets"]
            yield ("imagefleet_gateway_open_connections", "client connections open",
                   s["open_connections"])
            yield ("imagefleet_gateway_shed_total", "requests refused because every target "
                   "was full", s["shed"])

        r.register(_Gauges(gauges))


def render(*registries: CollectorRegistry) -> bytes:
    return b"".join(generate_latest(r) for r in registries)
