"""Manager loop tests against the in-memory provider, with a fake clock."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace

import pytest
from waiting import FakeClock

from fleet.manager import ACTION_BACKOFF_BASE_S, AdminError, FleetManager
from fleet.model import FleetSpec, Health, Instance, InstanceState
from fleet.providers.base import PermanentProviderError, Provider, TransientProviderError
from fleet.providers.memory import InMemoryProvider

SPEC = FleetSpec(name="test", desired=2, min=1, max=4, grace_period_s=30,
                 launch_backoff_base_s=1, launch_backoff_max_s=60, scale_in_window_s=1000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def provider(clock: FakeClock) -> InMemoryProvider:
    return InMemoryProvider(clock)


@pytest.fixture
def manager(provider: InMemoryProvider, clock: FakeClock) -> FleetManager:
    return FleetManager(provider, SPEC, clock=clock)


def run(coroutine):
    return asyncio.run(coroutine)


def calls(provider: InMemoryProvider, method: str) -> list[str]:
    return [arg for name, arg in provider.calls if name == method]


def kinds(manager: FleetManager) -> list[str]:
    return [e.kind for e in manager.events]


async def settle(manager: FleetManager, provider: InMemoryProvider, clock: FakeClock) -> None:
    """Launch and register the desired instances, then report them healthy."""
    for _ in range(3):
        await manager.tick()
        clock.advance(0.5)
    for iid in provider.live_ids():
        provider.set_health(iid, Health.HEALTHY)
    await manager.tick()


def test_in_memory_provider_satisfies_the_protocol(provider: InMemoryProvider) -> None:
    assert isinstance(provider, Provider)


def test_fills_fleet_registers_and_records_events(manager, provider, clock) -> None:
    run(settle(manager, provider, clock))
    assert len(calls(provider, "launch")) == 2
    assert sorted(calls(provider, "register")) == sorted(provider.live_ids())
    assert kinds(manager).count("launched") == 2
    assert kinds(manager).count("instance_healthy") == 2


def test_crash_in_one_action_does_not_stop_the_others_or_the_loop(manager, provider,
                                                                   clock) -> None:
    async def scenario() -> None:
        await manager.tick()  # launches m1, m2
        provider.fail_next("register", RuntimeError("bug in register"))
        await manager.tick()  # register m1 raises, m2 still registered
        assert provider.instances["m2"].registered
        assert not provider.instances["m1"].registered
        assert "action_failed" in kinds(manager)
        await manager.tick()  # same tick time: m1's register is held back
        assert calls(provider, "register").count("m1") == 1
        clock.advance(ACTION_BACKOFF_BASE_S)
        await manager.tick()  # due again: retried and succeeds
        assert calls(provider, "register").count("m1") == 2
        assert provider.instances["m1"].registered
        assert manager._action_backoff == {}  # success reset it

    run(scenario())


def test_action_backoff_doubles_per_failure_and_resets_on_success(provider, clock) -> None:
    manager = FleetManager(provider, replace(SPEC, desired=1), clock=clock)

    async def scenario() -> list[float]:
        await manager.tick()
        provider.fail_next("register", TransientProviderError("throttled"), times=3)
        retry_times = []
        for _ in range(40):
            before = len(calls(provider, "register"))
            await manager.tick()
            if len(calls(provider, "register")) > before:
                retry_times.append(clock.now)
            if provider.instances["m1"].registered:
                break
            clock.advance(0.25)
        return retry_times

    times = run(scenario())
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(times)]
    assert gaps == [0.5, 1.0, 2.0], gaps
    assert manager._action_backoff == {}


def test_launch_errors_back_off_without_a_storm(manager, provider, clock) -> None:
    provider.fail_next("launch", TransientProviderError("InsufficientInstanceCapacity"),
                       times=100)

    async def scenario() -> None:
        for _ in range(120):  # 60 s of ticks
            await manager.tick()
            clock.advance(0.5)

    run(scenario())
    attempts = len(calls(provider, "launch"))
    # Without backoff: two launches per tick = 240 attempts.
    assert 3 <= attempts <= 10, attempts
    assert "launch_failed" in kinds(manager)
    assert manager._memory.launch.failures >= 4


def test_permanent_launch_error_waits_the_maximum_delay(manager, provider, clock) -> None:
    provider.fail_next("launch", PermanentProviderError("AMI not found"), times=10)

    async def scenario() -> None:
        for _ in range(100):  # 50 s < launch_backoff_max_s
            await manager.tick()
            clock.advance(0.5)

    run(scenario())
    assert len(calls(provider, "launch")) == 2  # the first tick's two, then nothing
    assert any("AMI not found" in e.message for e in manager.events)


def test_observe_failure_skips_the_tick(manager, provider) -> None:
    provider.fail_next("observe", TransientProviderError("network down"))
    assert run(manager.tick()) is None
    assert calls(provider, "launch") == []
    assert "observe_failed" in kinds(manager)
    assert run(manager.tick()) is not None
    assert len(calls(provider, "launch")) == 2


def test_run_loop_survives_unexpected_errors_and_stops_on_request(provider) -> None:
    manager = FleetManager(provider, replace(SPEC, tick_interval_s=0.01))
    provider.fail_next("observe", RuntimeError("bug"), times=3)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(manager.run(stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(provider.live_ids()) < 2:
            assert loop.time() < deadline, "manager did not recover"
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    run(scenario())
    assert kinds(manager).count("tick_failed") == 3


def test_event_log_is_bounded_and_newest_last(provider, clock) -> None:
    manager = FleetManager(provider, SPEC, clock=clock, max_events=5)
    for desired in (1, 2, 3, 4, 1, 2, 3):
        manager.scale(desired)
        clock.advance(1)
    assert len(manager.events) == 5
    assert manager.events[-1].message.startswith("desired 2 -> 3")


@pytest.mark.parametrize("bad", ["3", 2.5, True, None, 0, 5, -1])
def test_scale_rejects_bad_values_with_the_allowed_range(manager, bad) -> None:
    with pytest.raises(AdminError) as info:
        manager.scale(bad)
    assert info.value.status == 400
    assert "1..4" in info.value.message
    assert manager.spec.desired == 2


def test_scale_up_launches(manager, provider, clock) -> None:
    run(settle(manager, provider, clock))
    assert manager.scale(4) == {"desired": 4, "min": 1, "max": 4}
    run(manager.tick())
    assert len(calls(provider, "launch")) == 4


def test_terminate_unknown_instance_is_404(manager) -> None:
    with pytest.raises(AdminError) as info:
        manager.terminate("nope")
    assert info.value.status == 404


def test_terminate_replaces_before_draining(manager, provider, clock) -> None:
    async def scenario() -> None:
        await settle(manager, provider, clock)
        assert manager.terminate("m1")["status"] == "replacing"
        await manager.tick()  # launches m3, m1 keeps serving
        assert provider.instances["m1"].health is Health.HEALTHY
        for _ in range(2):
            clock.advance(0.5)
            await manager.tick()  # register m3
        provider.set_health("m3", Health.HEALTHY)
        clock.advance(0.5)
        await manager.tick()  # replacement healthy: m1 drains now
        assert provider.instances["m1"].health is Health.DRAINING
        clock.advance(0.5)
        await manager.tick()  # drained (0 in flight): terminated
        clock.advance(0.5)
        await manager.tick()

    run(scenario())
    assert "m1" not in provider.instances
    assert sorted(provider.live_ids()) == ["m2", "m3"]


def test_restart_adopts_instances_left_by_an_earlier_run(provider, clock) -> None:
    for iid in ("old1", "old2"):
        provider.instances[iid] = Instance(iid, InstanceState.RUNNING, Health.HEALTHY,
                                           "10.0.0.9:80", launched_at=clock.now - 600,
                                           registered=True)
    manager = FleetManager(provider, SPEC, clock=clock)
    run(manager.tick())
    assert calls(provider, "launch") == []
    assert kinds(manager)[0] == "adopted"
    assert {i["id"] for i in manager.snapshot()["instances"]} == {"old1", "old2"}


def test_dead_instance_is_replaced(manager, provider, clock) -> None:
    run(settle(manager, provider, clock))
    provider.kill("m1")
    clock.advance(0.5)
    run(manager.tick())
    assert "m1" in calls(provider, "terminate")
    assert len(calls(provider, "launch")) == 3
    assert "instance_died" in kinds(manager)


def test_snapshot_has_the_design_shape(manager, provider, clock) -> None:
    run(settle(manager, provider, clock))
    state = manager.snapshot()
    assert set(state) == {"name", "provider", "desired", "min", "max", "instances", "events"}
    assert set(state["instances"][0]) == {"id", "state", "health", "address", "inflight",
                                          "launched_at"}
    assert set(state["events"][0]) == {"at", "kind", "instance_id", "message"}
    assert state["events"][0]["at"].endswith("Z")
