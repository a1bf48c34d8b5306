"""Alerts fire from the manager's own window and event log, as GET /fleet/metrics serves
them: flapping and launch failures simulated with the in-memory provider and a fake clock,
shedding from a real worker process that refuses real requests (its /metrics read by the
manager's real sampler). The pure rules are table-tested in test_metrics_window.py."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from typing import Any

import aiohttp
import cv2
import pytest
import requests
from waiting import FakeClock, wait_until

from fleet.manager import FleetManager
from fleet.model import FleetSpec, Health
from fleet.providers.base import TransientProviderError
from fleet.providers.memory import InMemoryProvider

SPEC = FleetSpec(name="alerts", desired=2, min=1, max=4, grace_period_s=30,
                 no_progress_timeout_s=10, launch_backoff_base_s=1, launch_backoff_max_s=8,
                 scale_in_window_s=10_000)


async def ticks(manager: FleetManager, clock: FakeClock, seconds: float, step: float = 0.5) -> None:
    for _ in range(int(seconds / step)):
        await manager.tick()
        clock.advance(step)


def healthy_all(provider: InMemoryProvider) -> None:
    for iid in provider.live_ids():
        if provider.instances[iid].registered:
            provider.set_health(iid, Health.HEALTHY)


def alerts(manager: FleetManager, seconds: float = 3600) -> list[dict[str, Any]]:
    return manager.window(seconds)["alerts"]


def test_instances_failing_their_checks_again_and_again_raise_a_flapping_alert() -> None:
    clock = FakeClock(10_000.0)
    provider = InMemoryProvider(clock)
    manager = FleetManager(provider, SPEC, clock=clock)

    async def scenario() -> list[str]:
        await ticks(manager, clock, 2)
        healthy_all(provider)
        await ticks(manager, clock, 1)
        failed = []
        for _ in range(3):  # one instance after another stops answering its checks
            victim = sorted(provider.live_ids())[-1]
            provider.set_health(victim, Health.UNHEALTHY)
            failed.append(victim)
            await ticks(manager, clock, 20)  # past no_progress_timeout_s: replaced
            healthy_all(provider)
            await ticks(manager, clock, 2)
        return failed

    assert alerts(manager) == []
    failed = asyncio.run(scenario())
    found = [a for a in alerts(manager) if a["kind"] == "flapping"]
    assert len(found) == 1, alerts(manager)
    assert found[0]["message"].startswith(
        f"3 replacements in 10 minutes: instance {failed[-1]} keeps failing its checks")
    # the alert links to the events behind it: the three terminations, by instance
    behind = found[0]["events"]
    assert [(e["kind"], e["instance_id"]) for e in behind] == [
        ("terminated", iid) for iid in failed]
    # ... which are in the window's own event list, for the Fleet view to show
    listed = {(e["at"], e["kind"], e["instance_id"]) for e in manager.window(3600)["events"]}
    assert {(e["at"], e["kind"], e["instance_id"]) for e in behind} <= listed
    clock.advance(11 * 60)  # ten quiet minutes later it is over
    assert [a for a in alerts(manager) if a["kind"] == "flapping"] == []


def test_launches_failing_for_lack_of_capacity_raise_an_alert_with_the_reason() -> None:
    clock = FakeClock(10_000.0)
    provider = InMemoryProvider(clock)
    manager = FleetManager(provider, SPEC, clock=clock)
    reason = "InsufficientInstanceCapacity: no t3.small capacity in eu-west-1a"
    provider.fail_next("launch", TransientProviderError(reason), times=1000)

    asyncio.run(ticks(manager, clock, 1))  # the first tick's launches fail
    assert [a["kind"] for a in alerts(manager)] == ["launch_failures"]  # two already
    asyncio.run(ticks(manager, clock, 30))
    found = alerts(manager)
    assert [a["kind"] for a in found] == ["launch_failures"]
    assert found[0]["severity"] == "critical"
    assert reason in found[0]["message"]
    assert found[0]["message"].startswith("launches failing (")
    assert found[0]["events"] and all(e["kind"] == "launch_failed" for e in found[0]["events"])
    # Capacity comes back: launches succeed, and once the failures are ten minutes old
    # the alert is gone.
    provider.clear_failures("launch")
    asyncio.run(ticks(manager, clock, 10))
    healthy_all(provider)
    clock.advance(11 * 60)
    asyncio.run(ticks(manager, clock, 1))
    assert alerts(manager) == []


@pytest.fixture
def photo(images_dir) -> bytes:
    image = cv2.resize(cv2.imread(str(images_dir / "astronaut.png")), (1500, 1500))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def test_a_worker_shedding_real_requests_raises_a_shedding_alert(server_process,
                                                                 photo: bytes) -> None:
    # One slot and no queue: while a request runs, every other one is refused at once.
    server = server_process("--process-slots", "1", "--queue-limit", "0")
    clock = FakeClock(10_000.0)
    provider = InMemoryProvider(clock, start_healthy=True)
    spec = replace(SPEC, desired=1, min=1, max=1)
    manager = FleetManager(provider, spec, clock=clock)

    def post(sigma: int) -> requests.Response:
        # A distinct parameter for every request, so none is answered from a stored result.
        steps = [{"op": "bilateral", "diameter": 11, "sigma_color": sigma}] * 2
        return server.post("/process", files={"image": ("p.jpg", photo)},
                           data={"steps": json.dumps(steps), "format": "jpeg"}, timeout=120)

    def busy() -> bool:
        return server.get("/health", timeout=5).json()["load"]["busy"] == 1

    async def scenario() -> list[int]:
        await ticks(manager, clock, 2)
        (iid,) = provider.live_ids()
        # The simulated instance's address is the real worker's.
        provider.instances[iid] = replace(provider.instances[iid],
                                          address=server.url.removeprefix("http://"))
        await ticks(manager, clock, 1)
        sampler = manager.sampler()
        statuses: list[int] = []
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await sampler.sample_once(session)
            # Ten 30-second intervals of the fake clock cover the 5-minute rule; each
            # holds one admitted request and two refused while it runs.
            for n in range(10):
                answers: list[requests.Response] = []
                holder = threading.Thread(
                    target=lambda n=n, answers=answers: answers.append(post(40 + n)))
                holder.start()
                await asyncio.to_thread(wait_until, lambda answers=answers: busy() or answers,
                                        60, what="the slot taken")
                for extra in range(2):
                    statuses.append((await asyncio.to_thread(post, 100 + 2 * n + extra)
                                     ).status_code)
                await asyncio.to_thread(holder.join, 120)
                assert answers[0].status_code == 200, answers[0].text
                statuses.append(answers[0].status_code)
                clock.advance(30)
                assert await sampler.sample_once(session) is not None
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses.count(503) >= 10, statuses  # most of the extra requests were shed
    samples = manager.window(3600)["samples"]
    assert len(samples) == 10
    assert sum(s["shed_per_s"] * 30 for s in samples) == pytest.approx(statuses.count(503))
    found = alerts(manager)
    assert [a["kind"] for a in found] == ["shedding"], found
    share = round(100 * statuses.count(503) / len(statuses))
    assert found[0]["message"].startswith(f"{share}% of requests shed for 5 minutes")
    assert "raise max" in found[0]["message"]
