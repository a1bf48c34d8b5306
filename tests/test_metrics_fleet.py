"""A real local fleet: the gateway's /metrics (its own and the manager's) parse with
prometheus-client's parser and move with real requests; /fleet/metrics series match a
known load (N requests in T seconds)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from helpers_fleet import IMAGES
from prometheus_client.parser import text_string_to_metric_families
from waiting import wait_until

from fleet.local.runtime import LocalFleet

pytestmark = pytest.mark.slow

QUICK = {"health_check_interval_s": 0.5, "health_check_timeout_s": 0.5,
         "tick_interval_s": 0.25, "grace_period_s": 60}
PNG = (IMAGES / "astronaut.png").read_bytes()
STARTUP = 90.0


def values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_and_window_follow_a_known_load(tmp_path: Path) -> None:
    fleet = LocalFleet(workers=2, storage_dir=tmp_path / "storage", spec_overrides=QUICK,
                       sample_interval_s=0.5)
    with fleet.start(STARTUP):
        wait_until(lambda: fleet.healthy_count() == 2, STARTUP, what="2 healthy workers")
        # At least two samples before the load, so the load's first interval is counted.
        wait_until(lambda: len(requests.get(fleet.endpoint + "/fleet/metrics",
                                            timeout=5).json()["samples"]) >= 2, 20)
        n, started = 30, time.monotonic()
        for i in range(n):
            r = requests.post(fleet.endpoint + "/process",
                              files={"image": ("a.png", PNG, "image/png")},
                              data={"operation": "rotate", "params": f'{{"angle": {i}}}'},
                              timeout=60)
            assert r.status_code == 200, r.text
        took = time.monotonic() - started

        text = requests.get(fleet.endpoint + "/metrics", timeout=5).text
        got = values(text)
        assert got[("imagefleet_gateway_requests_total", (("status", "200"),))] == n
        assert got[("imagefleet_gateway_upstream_seconds_count", ())] == n
        assert got[("imagefleet_gateway_healthy_targets", ())] == 2
        assert got[("imagefleet_manager_desired", ())] == 2
        assert got[("imagefleet_manager_healthy", ())] == 2
        assert got[("imagefleet_manager_actions_total",
                    (("kind", "launch"), ("outcome", "ok")))] >= 2

        def counted() -> float:
            body = requests.get(fleet.endpoint + "/fleet/metrics?seconds=600", timeout=5).json()
            total = sum(s["requests_per_s"] * body["interval_s"] for s in body["samples"])
            return body if abs(total - n) <= 0.15 * n else None
        body = wait_until(counted, 20, what=f"{n} requests in the window")
        busy = [s for s in body["samples"] if s["requests_per_s"] > 0]
        rate = sum(s["requests_per_s"] for s in busy) / len(busy)
        assert rate == pytest.approx(n / took, rel=0.5)
        assert all(s["p50_ms"] is None or 0 < s["p50_ms"] <= s["p95_ms"] for s in busy)
        assert busy[-1]["desired"] == 2 and busy[-1]["healthy"] == 2
        assert set(busy[-1]["load"]) == {i["id"] for i in fleet.snapshot()["instances"]}
        assert body["alerts"] == []


def test_gateway_metrics_need_the_admin_token_through_a_proxy(tmp_path: Path) -> None:
    with LocalFleet(workers=1, storage_dir=tmp_path / "storage",
                    spec_overrides=QUICK).start(STARTUP) as fleet:
        assert requests.get(fleet.endpoint + "/metrics", timeout=5).status_code == 200
        # a rebinding web page's Host is refused, as for GET /fleet
        r = requests.get(fleet.endpoint + "/metrics", headers={"Host": "evil.example"},
                         timeout=5)
        assert r.status_code == 421
        assert requests.get(fleet.endpoint + "/fleet/metrics?seconds=0",
                            timeout=5).status_code == 400
