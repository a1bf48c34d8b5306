"""The rolling window published to CloudWatch (``cloudwatch_metrics``), so AWS alarms
can watch the fleet without anyone scraping the manager.

Each sample the AWS manager's sampler adds (every 5 s) becomes a few metric data points in
the namespace ``ImageFleet`` with the dimension ``Fleet=<fleet name>``
(:func:`metric_data`, pure). The :class:`CloudWatchPublisher` collects them and sends
them with ``put_metric_data`` once a minute: CloudWatch stores standard-resolution
metrics per minute anyway, and one call a minute instead of twelve keeps the API-call
bill small. The call runs in a thread (boto3 blocks), never raises into the fleet, and
after a failure (a missing permission, throttling) waits a doubling delay
(:func:`server.backoff.doubling_delay`) before the next try, so a denied call is not
repeated every minute for days.

Kept small on purpose: CloudWatch bills each custom metric (each name and dimension set)
per month, so there is no per-instance series: every replaced worker's id would be one
more billed metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.window import Sample
from server.backoff import doubling_delay

if TYPE_CHECKING:
    from fleet.aws.config import AwsFleetConfig

log = logging.getLogger(__name__)

NAMESPACE = "ImageFleet"
MAX_ENTRIES_PER_CALL = 1000  # PutMetricData's limit on MetricData items per request
FLUSH_INTERVAL_S = 60.0
BACKOFF_CAP_S = 900.0
# systemd gives a stopping service 90 s; the fleet's own shutdown needs most of the rest.
FINAL_FLUSH_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    key: str  # in Sample.to_json()
    unit: str


METRICS: tuple[Metric, ...] = (
    Metric("RequestsPerSecond", "requests_per_s", "Count/Second"),
    Metric("ErrorsPerSecond", "errors_per_s", "Count/Second"),
    Metric("ShedPerSecond", "shed_per_s", "Count/Second"),
    Metric("LatencyP50", "p50_ms", "Milliseconds"),
    Metric("LatencyP95", "p95_ms", "Milliseconds"),
    Metric("DesiredInstances", "desired", "Count"),
    Metric("HealthyInstances", "healthy", "Count"),
    Metric("Instances", "instances", "Count"),
)


def metric_data(sample: Sample, fleet: str) -> list[dict[str, Any]]:
    """The ``MetricData`` entries of one sample (pure). A latency is left out when the
    interval had no request (there is none to measure), as is any non-finite value,
    which CloudWatch refuses."""
    values = sample.to_json()  # the same per-second rates GET /fleet/metrics serves
    at = dt.datetime.fromtimestamp(sample.at, tz=dt.UTC)
    dimensions = [{"Name": "Fleet", "Value": fleet}]
    entries = []
    for metric in METRICS:
        value = values[metric.key]
        if value is None or not math.isfinite(value):
            continue
        entries.append({"MetricName": metric.name, "Dimensions": dimensions,
                        "Timestamp": at, "Value": float(value), "Unit": metric.unit})
    return entries


def batches(entries: Iterable[dict[str, Any]],
            size: int = MAX_ENTRIES_PER_CALL) -> list[list[dict[str, Any]]]:
    """``entries`` in calls of at most ``size`` each, in order."""
    items = list(entries)
    return [items[i:i + size] for i in range(0, len(items), size)]


def cloudwatch_client(config: AwsFleetConfig) -> Any:
    """A CloudWatch client for the fleet config's region, profile and endpoint, with
    short timeouts: a slow call only delays the next publication."""
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=config.profile, region_name=config.region)
    return session.client("cloudwatch", endpoint_url=config.endpoint_url, config=Config(
        retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=10))


class CloudWatchPublisher:
    """Collects samples' data points (:meth:`add`, on the event loop) and sends them
    every ``flush_interval_s`` (:meth:`run`). At most ``max_pending`` points wait (the
    oldest go first), so a long outage costs bounded memory."""

    def __init__(self, client: Any, fleet: str, *, namespace: str = NAMESPACE,
                 flush_interval_s: float = FLUSH_INTERVAL_S,
                 backoff_cap_s: float = BACKOFF_CAP_S,
                 max_pending: int = MAX_ENTRIES_PER_CALL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.fleet, self.namespace = client, fleet, namespace
        self.flush_interval_s, self.backoff_cap_s = flush_interval_s, backoff_cap_s
        self._max_pending = max_pending
        self._pending: deque[dict[str, Any]] = deque(maxlen=max_pending)
        self._clock = clock
        self.failures = 0  # in a row
        self.not_before = clock() + flush_interval_s  # a minute's points in the first call

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, sample: Sample) -> None:
        self._pending.extend(metric_data(sample, self.fleet))

    async def flush(self) -> bool:
        """Send what is pending if it is time (not during a backoff); True if sent.
        Never raises: a failure is logged and delays the next try."""
        now = self._clock()
        if not self._pending or now < self.not_before:
            return False
        sending, self._pending = self._pending, deque(maxlen=self._max_pending)
        calls = batches(sending)
        for n, batch in enumerate(calls):
            try:
                await asyncio.to_thread(self.client.put_metric_data,
                                        Namespace=self.namespace, MetricData=batch)
            except Exception as exc:  # noqa: BLE001 - publishing must never stop the fleet
                self.failures += 1
                delay = doubling_delay(self.failures, self.flush_interval_s,
                                       self.backoff_cap_s)
                self.not_before = self._clock() + delay
                # What was not sent waits for the next try, ahead of what came meanwhile.
                unsent = [e for b in calls[n:] for e in b]
                self._pending = deque([*unsent, *self._pending], maxlen=self._max_pending)
                log.warning("could not publish the fleet window to CloudWatch (%d failure(s) "
                            "in a row; next try in %.0f s): %s", self.failures, delay, exc)
                return False
        self.failures = 0
        self.not_before = self._clock() + self.flush_interval_s
        return True

    async def final_flush(self, timeout_s: float = FINAL_FLUSH_TIMEOUT_S) -> bool:
        """At shutdown: send what is pending now, not at the next minute, so a stopped
        manager loses no points; skipped while a failure's backoff lasts (the call would
        fail again), and bounded by ``timeout_s`` so it cannot hold up the stop."""
        if not self._pending or self.failures:
            return False
        self.not_before = self._clock()
        count = self.pending
        try:
            return await asyncio.wait_for(self.flush(), timeout_s)
        except TimeoutError:
            log.warning("gave up publishing the last %d CloudWatch points at shutdown "
                        "after %.0f s", count, timeout_s)
            return False

    async def run(self, stop: asyncio.Event, tick_s: float = 5.0) -> None:
        """Flush whenever due until ``stop``; checks every ``tick_s``."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick_s)
            await self.flush()
