"""The fleet's rolling window: one fixed-size sample every few seconds in a bounded ring
buffer (``deque(maxlen=...)``: 720 samples of 5 s = the last hour), served as JSON series
at ``GET /fleet/metrics`` and drawn by the app's Fleet view.

Each sample holds what happened in its interval (requests, errors, shed, p50/p95 latency
from the workers' histogram buckets), so a replaced worker whose counters start again
from zero never shows as a negative rate. :func:`interval_sample` is pure; the
:class:`Sampler` only fetches each worker's ``/metrics`` and feeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 5.0
SAMPLES = 720  # one hour at 5 s
MAX_INSTANCES_PER_SAMPLE = 32  # per-instance load kept for this many: a fixed size


@dataclass(frozen=True, slots=True)
class Counters:
    """One worker's cumulative counters, read from its ``/metrics``."""

    ok: float = 0.0
    errors: float = 0.0  # status >= 500 other than 503 overloaded
    shed: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count) of stage=total


@dataclass(frozen=True, slots=True)
class Sample:
    at: float
    interval_s: float
    requests: float
    errors: float
    shed: float
    p50_ms: float | None
    p95_ms: float | None
    desired: int
    healthy: int
    instances: int
    load: tuple[tuple[str, int], ...]  # (instance id, in flight), at most 32

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "requests_per_s": self.requests / self.interval_s,
                "errors_per_s": self.errors / self.interval_s,
                "shed_per_s": self.shed / self.interval_s,
                "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "desired": self.desired,
                "healthy": self.healthy, "instances": self.instances,
                "load": dict(self.load)}


def parse_counters(text: str) -> Counters:
    """The counters a sample needs from a worker's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    ok = errors = 0.0
    buckets: list[tuple[float, float]] = []
    shed = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "imagefleet_worker_requests_total":
                status = s.labels.get("status", "")
                if status.startswith("5") and status != "503":
                    errors += s.value
                elif status.startswith(("2", "3")):
                    ok += s.value
            elif s.name == "imagefleet_worker_shed_total":
                shed = s.value
            elif s.name == "imagefleet_worker_stage_seconds_bucket" \
                    and s.labels.get("stage") == "total":
                buckets.append((float(s.labels["le"]), s.value))
    return Counters(ok, errors, shed, tuple(sorted(buckets)))


def _delta(now: float, before: float) -> float:
    return now - before if now >= before else now  # a restart counts from zero


def quantile(buckets: Iterable[tuple[float, float]], q: float) -> float | None:
    """The q-quantile (seconds) of a histogram's per-bucket cumulative counts, linearly
    interpolated inside the bucket as Prometheus' histogram_quantile does."""
    items = sorted(buckets)
    if not items or items[-1][1] <= 0:
        return None
    rank = q * items[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in items:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return items[-1][0]


def interval_sample(at: float, interval_s: float, before: Mapping[str, Counters],
                    now: Mapping[str, Counters], *, desired: int, healthy: int,
                    load: Mapping[str, int]) -> Sample:
    """What the fleet did between two readings (pure). Workers absent from ``before``
    count from zero; workers gone from ``now`` count nothing."""
    requests = errors = shed = 0.0
    merged: dict[float, float] = {}
    for iid, c in now.items():
        b = before.get(iid, Counters())
        restarted = c.ok < b.ok or c.errors < b.errors
        if restarted:
            b = Counters()
        requests += _delta(c.ok, b.ok) + _delta(c.errors, b.errors)
        errors += _delta(c.errors, b.errors)
        shed += _delta(c.shed, b.shed)
        old = dict(b.buckets)
        for le, count in c.buckets:
            merged[le] = merged.get(le, 0.0) + _delta(count, old.get(le, 0.0))
    p50, p95 = quantile(merged.items(), 0.5), quantile(merged.items(), 0.95)
    kept = tuple(sorted(load.items())[:MAX_INSTANCES_PER_SAMPLE])
    return Sample(at, interval_s, requests, errors, shed,
                  None if p50 is None else p50 * 1000, None if p95 is None else p95 * 1000,
                  desired, healthy, len(load), kept)


class Window:
    """The ring buffer: memory bounded by ``maxlen`` samples of fixed size."""

    def __init__(self, maxlen: int = SAMPLES, interval_s: float = SAMPLE_INTERVAL_S):
        self.samples: deque[Sample] = deque(maxlen=maxlen)
        self.interval_s = interval_s

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)

    def series(self, seconds: float, now: float) -> dict[str, Any]:
        """``GET /fleet/metrics``: the samples of the last ``seconds``, oldest first."""
        recent = [s.to_json() for s in self.samples if s.at > now - seconds]
        return {"interval_s": self.interval_s, "now": now, "seconds": seconds,
                "capacity_s": self.samples.maxlen * self.interval_s, "samples": recent}


class Sampler:
    """Reads every live worker's ``/metrics`` each interval and adds one sample."""

    def __init__(self, window: Window, state: Callable[[], tuple[int, Iterable[Any]]], *,
                 token: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.time,
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        """``state`` returns (desired, live instances with id, address, health, inflight).
        ``on_sample`` is told of each sample added (the AWS manager's CloudWatch
        publisher); it must not block: it runs on the event loop."""
        self.window, self._state, self._token, self._clock = window, state, token, clock
        self._on_sample = on_sample
        self._last: dict[str, Counters] = {}
        self._last_at: float | None = None

    async def _read(self, session: Any, address: str) -> Counters | None:
        import aiohttp

        token = self._token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with session.get(f"http://{address}/metrics", headers=headers) as resp:
                if resp.status != 200:
                    return None
                return parse_counters(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("cannot read metrics of %s: %s", address, exc)
            return None

    async def sample_once(self, session: Any) -> Sample | None:
        from fleet.model import Health

        desired, instances = self._state()
        live = [i for i in instances if i.address]
        read = await asyncio.gather(*(self._read(session, i.address) for i in live))
        now_counters = {i.id: c for i, c in zip(live, read, strict=True) if c is not None}
        at = self._clock()
        sample = None
        if self._last_at is not None:
            sample = interval_sample(
                at, max(at - self._last_at, 1e-3), self._last, now_counters, desired=desired,
                healthy=sum(1 for i in live if i.health is Health.HEALTHY),
                load={i.id: i.inflight or 0 for i in live})
            self.window.add(sample)
            if self._on_sample is not None:
                try:
                    self._on_sample(sample)
                except Exception:  # a listener's bug must not cost the window its readings
                    log.exception("fleet sample listener failed")
        # A worker that did not answer keeps its last reading (no false restart).
        self._last = {**{k: v for k, v in self._last.items()
                         if k in {i.id for i in live}}, **now_counters}
        self._last_at = at
        return sample

    async def run(self, stop: asyncio.Event) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=2.0, sock_connect=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                try:
                    await self.sample_once(session)
                except Exception:  # the window must never stop the fleet
                    log.exception("fleet sample failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.window.interval_s)
