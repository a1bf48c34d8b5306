"""The rolling window (pure parts) and the alert decisions, with a fake clock."""

from __future__ import annotations

import sys

import pytest

from fleet.alerts import Rules, decide_alerts
from fleet.model import Event
from fleet.window import Counters, Sample, Window, interval_sample, parse_counters, quantile


def sample(at: float, requests: float = 0, shed: float = 0, errors: float = 0,
           interval: float = 5.0) -> Sample:
    return Sample(at, interval, requests, errors, shed, 10.0, 20.0, 2, 2, 2,
                  (("w1", 1), ("w2", 0)))


def test_interval_deltas_survive_a_restarted_worker() -> None:
    before = {"w1": Counters(ok=100, shed=4), "w2": Counters(ok=50)}
    now = {"w1": Counters(ok=110, shed=6), "w2": Counters(ok=3), "w3": Counters(ok=2)}
    s = interval_sample(10.0, 5.0, before, now, desired=3, healthy=3,
                        load={"w1": 2, "w2": 0, "w3": 1})
    assert (s.requests, s.shed) == (10 + 3 + 2, 2)
    assert s.to_json()["requests_per_s"] == 3.0 and s.instances == 3


def test_quantiles_interpolate_like_prometheus() -> None:
    buckets = [(0.01, 0), (0.1, 50), (1.0, 100), (float("inf"), 100)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.95) == pytest.approx(0.91)
    assert quantile([], 0.5) is None and quantile([(1.0, 0)], 0.5) is None


def test_parse_counters_reads_a_worker_exposition() -> None:
    from server.metrics import WorkerMetrics
    m = WorkerMetrics(lambda: {"busy": 0, "slots": 2, "queued": 0, "shed": 7}, lambda: 0)
    for status in (200, 200, 500, 400):
        m.observe("grayscale", status, {"total": 30.0}, False, 10, 10)
    c = parse_counters(m.render().decode())
    assert (c.ok, c.errors, c.shed) == (2, 1, 7)
    assert dict(c.buckets)[0.05] == 4


def test_ring_buffer_memory_is_bounded() -> None:
    window = Window(maxlen=720)
    for i in range(5000):
        window.add(sample(float(i), requests=i))
    assert len(window.samples) == 720
    one = sample(0.0)
    per_sample = sys.getsizeof(one) + sys.getsizeof(one.load) + sum(
        sys.getsizeof(x) for x in one.load)
    total = sys.getsizeof(window.samples) + 720 * per_sample
    assert total < 300_000, total  # about 0.2 MB for an hour
    assert window.series(60, 4999.0)["samples"][0]["at"] == 4940.0


def ev(at: float, kind: str, iid: str | None = None, message: str = "") -> Event:
    return Event(at, kind, iid, message)


FLAP = [ev(100, "terminated", "w2", "unhealthy"), ev(300, "terminated", "w3", "unhealthy"),
        ev(500, "terminated", "w4", "never became healthy")]
SHEDDING = [sample(t, requests=8, shed=2) for t in range(705, 1001, 5)]  # 20 % for 5 min
LAUNCH = [ev(100, "launch_failed", None, "InsufficientInstanceCapacity: no t3.small in "
                                           "eu-west-1a; next launch in 4.0s"),
          ev(200, "launch_failed", None, "InsufficientInstanceCapacity: no t3.small in "
                                           "eu-west-1a; next launch in 8.0s")]


@pytest.mark.parametrize(("samples", "events", "now", "kinds", "words"), [
    ([], [], 1000.0, [], ""),
    ([], FLAP, 600.0, ["flapping"], "3 replacements in 10 minutes: instance w4"),
    ([], FLAP, 701.0, [], ""),  # the first one is over 10 minutes old
    ([], FLAP[:2], 600.0, [], ""),
    ([], [ev(t, "instance_healthy", "w4") for t in (10, 50, 90)], 100.0, ["flapping"],
     "instance w4 became healthy 3 times"),
    ([], [ev(60, "terminated", "w1", "surplus")] * 3, 100.0, [], ""),  # scale-in is fine
    (SHEDDING, [], 1000.0, ["shedding"], "20% of requests shed for 5 minutes: "),
    (SHEDDING[-30:], [], 1000.0, [], ""),  # only 2.5 minutes of it
    ([sample(t, requests=8, shed=1) for t in range(705, 1001, 5)], [], 1000.0, [], ""),
    ([sample(t, requests=0.1, shed=0.1) for t in range(705, 1001, 5)], [], 1000.0, [], ""),
    ([sample(t, requests=10, errors=1) for t in range(705, 1001, 5)], [], 1000.0, ["errors"],
     "10% of requests failing"),
    ([], LAUNCH, 300.0, ["launch_failures"], "no t3.small in eu-west-1a"),
    ([], LAUNCH[:1], 300.0, [], ""),
    ([], LAUNCH, 900.0, [], ""),
])
def test_when_to_alert(samples, events, now, kinds, words) -> None:
    alerts = decide_alerts(samples, events, now, Rules())
    assert [a.kind for a in alerts] == kinds
    if words:
        assert words in alerts[0].message
        assert alerts[0].kind in {"shedding", "errors"} or alerts[0].events
