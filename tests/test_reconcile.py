"""Table-driven tests of the pure reconcile function, with a fake clock (plain numbers)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import pytest

from fleet.model import (
    Backoff,
    Bootstrap,
    Deregister,
    FleetSpec,
    Health,
    Instance,
    InstanceState,
    Launch,
    Memory,
    Observed,
    Plan,
    Register,
    Terminate,
)
from fleet.reconcile import decide, record_launch_failure, request_replacement

H, U, INIT, D = Health.HEALTHY, Health.UNHEALTHY, Health.INITIAL, Health.DRAINING
RUNNING, STOPPED, PENDING = InstanceState.RUNNING, InstanceState.STOPPED, InstanceState.PENDING

BASE = FleetSpec(name="t", desired=2, min=2, max=2, grace_period_s=30, no_progress_timeout_s=10,
                 drain_timeout_s=20,
                 target_inflight=2, scale_out_window_s=5, scale_in_window_s=30,
                 scale_cooldown_s=5, launch_backoff_base_s=1, launch_backoff_max_s=60)
SCALING = replace(BASE, min=1, max=4)


def inst(iid: str, health: Health = H, *, state: InstanceState = RUNNING, at: float = 0.0,
         inflight: int | None = 0, registered: bool = True, bootstrapped: bool = True,
         progress: float | None = None) -> Instance:
    return Instance(id=iid, state=state, health=health, address=f"127.0.0.1:{len(iid)}",
                    launched_at=at, inflight=inflight, registered=registered,
                    bootstrapped=bootstrapped, last_progress_at=progress)


def summary(plan: Plan) -> set[tuple[str, str | None]]:
    return {(type(a).__name__, getattr(a, "instance_id", None)) for a in plan.actions}


@dataclass(frozen=True)
class Case:
    name: str
    instances: tuple[Instance, ...]
    now: float
    expect: set[tuple[str, str | None]]
    spec: FleetSpec = BASE
    memory: dict[str, Any] = field(default_factory=dict)
    desired: int | None = None
    events: set[str] = field(default_factory=set)


SEEN = frozenset({"a", "b", "c"})  # instances that have passed a health check before

CASES = [
    Case("empty fleet launches up to desired", (), 100,
         {("Launch", None)}),
    Case("steady fleet does nothing", (inst("a"), inst("b")), 100, set(),
         memory={"ever_healthy": SEEN}),
    Case("process died after serving: clean up and replace at once",
         (inst("a"), inst("b", state=STOPPED)), 100,
         {("Terminate", "b"), ("Launch", None)}, memory={"ever_healthy": SEEN},
         events={"instance_died"}),
    Case("hung: fails checks while its process exists, after having been healthy",
         (inst("a"), inst("b", U)), 100, {("Terminate", "b"), ("Launch", None)},
         memory={"ever_healthy": SEEN}, events={"instance_unhealthy"}),
    Case("hung within grace period but it was healthy before: still replaced",
         (inst("a"), inst("b", U, at=95)), 100, {("Terminate", "b"), ("Launch", None)},
         memory={"ever_healthy": SEEN}, events={"instance_unhealthy"}),
    # Busy is not dead (BASE.no_progress_timeout_s = 10): an instance failing its
    # checks is replaced only after 10 s without progress.
    Case("busy: fails checks but completed work 2 s ago: kept, reported once",
         (inst("a"), inst("b", U, inflight=40, progress=98)), 100, set(),
         memory={"ever_healthy": SEEN}, events={"instance_busy"}),
    Case("busy and already reported: kept quietly",
         (inst("a"), inst("b", U, inflight=40, progress=99.5)), 100, set(),
         memory={"ever_healthy": SEEN, "slow": frozenset({"b"})}),
    Case("busy, both instances: neither is killed, nothing is launched",
         (inst("a", U, inflight=60, progress=95), inst("b", U, inflight=60, progress=99)),
         100, set(), memory={"ever_healthy": SEEN}, events={"instance_busy"}),
    Case("hung: no progress for 10 s: replaced",
         (inst("a"), inst("b", U, inflight=3, progress=90)), 100,
         {("Terminate", "b"), ("Launch", None)}, memory={"ever_healthy": SEEN},
         events={"instance_unhealthy"}),
    Case("hung after having been reported busy: replaced",
         (inst("a"), inst("b", U, progress=80)), 100,
         {("Terminate", "b"), ("Launch", None)},
         memory={"ever_healthy": SEEN, "slow": frozenset({"b"})},
         events={"instance_unhealthy"}),
    Case("mix: the busy one stays, the hung one goes, the healthy one serves",
         (inst("a"), inst("b", U, inflight=30, progress=97), inst("c", U, progress=50)), 100,
         {("Terminate", "c"), ("Launch", None)}, spec=replace(BASE, desired=3, min=3, max=3),
         memory={"ever_healthy": SEEN}, events={"instance_busy", "instance_unhealthy"}),
    Case("never healthy yet progressing is still judged by the grace period",
         (inst("a"), inst("n", U, at=0, progress=99)), 100,
         {("Terminate", "n")}, memory={"ever_healthy": {"a"}},
         events={"instance_unhealthy", "launch_failed"}),
    Case("booting unhealthy within grace period is left alone",
         (inst("a"), inst("n", U, at=80)), 100, set(), memory={"ever_healthy": {"a"}}),
    Case("booting initial within grace period is left alone",
         (inst("a"), inst("n", INIT, at=99)), 100, set(), memory={"ever_healthy": {"a"}}),
    Case("never healthy after the grace period: replaced, counted as launch failure",
         (inst("a"), inst("n", U, at=60)), 100, {("Terminate", "n")},
         memory={"ever_healthy": {"a"}}, events={"instance_unhealthy", "launch_failed"}),
    Case("died while booting: launch failure, backoff holds the relaunch",
         (inst("a"), inst("n", INIT, state=STOPPED, at=99)), 100, {("Terminate", "n")},
         memory={"ever_healthy": {"a"}}, events={"instance_died", "launch_failed"}),
    Case("pending within grace is capacity", (inst("a"), inst("p", INIT, state=PENDING, at=90,
                                                              registered=False)), 100, set(),
         memory={"ever_healthy": {"a"}}),
    Case("pending past grace: boot timeout", (inst("a"), inst("p", INIT, state=PENDING, at=10,
                                                              registered=False)), 100,
         {("Terminate", "p")}, memory={"ever_healthy": {"a"}},
         events={"boot_timeout", "launch_failed"}),
    Case("running but not bootstrapped: bootstrap",
         (inst("a"), inst("x", Health.UNUSED, at=95, registered=False, bootstrapped=False)),
         100, {("Bootstrap", "x")}, memory={"ever_healthy": {"a"}}),
    Case("up and bootstrapped but unregistered: register",
         (inst("a"), inst("x", Health.UNUSED, at=95, registered=False)), 100,
         {("Register", "x")}, memory={"ever_healthy": {"a"}}),
    Case("stopping instances are not capacity",
         (inst("a"), inst("b", state=InstanceState.STOPPING)),
         100, {("Launch", None)}, memory={"ever_healthy": SEEN}),
    Case("launch backoff pending: nothing launched", (inst("a"),), 100, set(),
         memory={"ever_healthy": {"a"}, "launch": Backoff(3, 104.0)}),
    Case("launch backoff over: exactly one probe launch", (), 105, {("Launch", None)},
         memory={"launch": Backoff(3, 104.0)}),
    Case("draining with requests in flight waits",
         (inst("a"), inst("b"), inst("c", D, inflight=2)), 100, set(),
         memory={"ever_healthy": SEEN, "draining": {"c": 95.0}}),
    Case("drained: stop gracefully",
         (inst("a"), inst("b"), inst("c", D, inflight=0)), 100, {("Terminate", "c")},
         memory={"ever_healthy": SEEN, "draining": {"c": 95.0}}),
    Case("drain timeout: stop anyway",
         (inst("a"), inst("b"), inst("c", D, inflight=5)), 120, {("Terminate", "c")},
         memory={"ever_healthy": SEEN, "draining": {"c": 95.0}}, events={"drain_timeout"}),
    Case("deregister that did not take is repeated before stopping",
         (inst("a"), inst("b"), inst("c", H, inflight=0)), 100, {("Deregister", "c")},
         memory={"ever_healthy": SEEN, "draining": {"c": 95.0}}),
    Case("surplus after scale down: drain the least busy, newest first",
         (inst("a", inflight=1, at=1), inst("b", inflight=0, at=2), inst("c", inflight=0, at=3)),
         100, {("Deregister", "c")}, spec=replace(SCALING, desired=2),
         memory={"ever_healthy": SEEN}, events={"scale_in_drain"}),
    Case("surplus prefers a booting instance over a healthy one",
         (inst("a"), inst("b"), inst("n", INIT, at=95)), 100, {("Deregister", "n")},
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN}),
    Case("replacement due: launch the replacement first, keep serving",
         (inst("a"), inst("b")), 100, {("Launch", None)},
         memory={"ever_healthy": SEEN, "replacing": {"a"}}),
    Case("replacement due, replacement still booting: old one keeps serving",
         (inst("a"), inst("b"), inst("n", INIT, at=98)), 100, set(),
         memory={"ever_healthy": SEEN, "replacing": {"a"}}),
    Case("replacement healthy: now drain the old one",
         (inst("a"), inst("b"), inst("n", at=90)), 100, {("Deregister", "a")},
         memory={"ever_healthy": SEEN | {"n"}, "replacing": {"a"}}, events={"replaced"}),
    Case("max lifetime reached: replacement due", (inst("a", at=0), inst("b", at=90)), 100,
         {("Launch", None)}, spec=replace(BASE, max_lifetime_s=50),
         memory={"ever_healthy": SEEN}, events={"replacement_due"}),
    Case("high load starts the scale-out window but does not scale yet",
         (inst("a", inflight=5), inst("b", inflight=5)), 100, set(),
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN}, desired=2),
    Case("sustained high load scales out toward total/target, clamped to max",
         (inst("a", inflight=6), inst("b", inflight=6)), 105, {("Launch", None)},
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN,
                                                   "high_load_since": 100.0},
         desired=4, events={"scale_out"}),
    Case("just above target scales out by one",
         (inst("a", inflight=3), inst("b", inflight=2)), 105, {("Launch", None)},
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN,
                                                   "high_load_since": 100.0}, desired=3),
    Case("scale-out waits for the cooldown",
         (inst("a", inflight=6), inst("b", inflight=6)), 105, set(),
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN,
                                                   "high_load_since": 100.0,
                                                   "last_scale_at": 103.0}, desired=2),
    Case("no load judgement while an instance boots",
         (inst("a", inflight=6), inst("b", inflight=6), inst("n", INIT, at=99)), 105, set(),
         spec=replace(SCALING, desired=3), memory={"ever_healthy": SEEN,
                                                   "high_load_since": 100.0}, desired=3),
    Case("scaling off when min == max", (inst("a", inflight=9), inst("b", inflight=9)), 105,
         set(), memory={"ever_healthy": SEEN, "high_load_since": 0.0}, desired=2),
    Case("sustained idle scales in by draining one",
         (inst("a", at=1), inst("b", at=2), inst("c", at=3)), 130, {("Deregister", "c")},
         spec=replace(SCALING, desired=3), memory={"ever_healthy": SEEN,
                                                   "low_load_since": 100.0},
         desired=2, events={"scale_in", "scale_in_drain"}),
    Case("idle never scales below min", (inst("a"),), 500, set(),
         spec=replace(SCALING, desired=1), memory={"ever_healthy": SEEN,
                                                   "low_load_since": 0.0}, desired=1),
    Case("unknown in-flight (None) turns load scaling off",
         (inst("a", inflight=None), inst("b", inflight=None)), 500, set(),
         spec=replace(SCALING, desired=2), memory={"ever_healthy": SEEN,
                                                   "low_load_since": 0.0}, desired=2),
]


def _memory(values: dict[str, Any]) -> Memory:
    values = dict(values)
    for name in ("ever_healthy", "replacing", "counted_failures", "reported"):
        if name in values:
            values[name] = frozenset(values[name])
    if "draining" in values:
        values["draining"] = MappingProxyType(values["draining"])
    return Memory(**values)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide(case: Case) -> None:
    plan = decide(case.spec, Observed(case.instances, _memory(case.memory)), case.now)
    assert summary(plan) == case.expect
    assert {e.kind for e in plan.events} >= case.events
    if case.desired is not None:
        assert plan.desired == case.desired


def test_a_busy_instance_is_reported_once_then_kept_quietly() -> None:
    busy = (inst("a"), inst("b", U, inflight=40, progress=99))
    first = decide(BASE, Observed(busy, _memory({"ever_healthy": SEEN})), 100)
    assert [e.kind for e in first.events] == ["instance_busy"]
    second = decide(BASE, Observed(busy, first.memory), 100.5)
    assert second.actions == () and second.events == ()


def test_busy_for_a_minute_is_never_killed_then_stalled_is_killed_after_the_timeout() -> None:
    # Simulated ticks every 0.5 s: worker b fails every check for 60 s but completes a
    # request every 3 s; then it stops completing anything.
    memory = _memory({"ever_healthy": SEEN})
    last_done = 0.0
    now = 0.0
    while now < 60:
        last_done = now if now % 3 < 0.5 else last_done
        plan = decide(BASE, Observed((inst("a"), inst("b", U, inflight=50,
                                                          progress=last_done)), memory), now)
        assert not any(isinstance(a, Terminate) for a in plan.actions), now
        memory, now = plan.memory, now + 0.5
    stalled_at = last_done
    killed_at = None
    while killed_at is None:
        plan = decide(BASE, Observed((inst("a"), inst("b", U, inflight=50,
                                                          progress=stalled_at)), memory), now)
        if any(isinstance(a, Terminate) and a.instance_id == "b" for a in plan.actions):
            killed_at = now
        memory, now = plan.memory, now + 0.5
    assert 10 <= killed_at - stalled_at <= 10.5


def test_busy_instances_count_as_load_so_the_fleet_scales_out() -> None:
    # Both instances fail their checks under load yet complete work: that is the moment
    # to scale out, not to pause the decision until they pass checks again.
    busy = (inst("a", U, inflight=30, progress=99), inst("b", U, inflight=30, progress=99))
    spec = replace(SCALING, desired=2)
    plan = decide(spec, Observed(busy, _memory({"ever_healthy": SEEN,
                                                "high_load_since": 90.0})), 100)
    assert plan.desired == 4
    assert {e.kind for e in plan.events} >= {"instance_busy", "scale_out"}
    assert summary(plan) == {("Launch", None)}
    assert not any(isinstance(a, Terminate) for a in plan.actions)


def test_a_hung_instance_does_not_count_as_load() -> None:
    # Hung (no progress for 10 s): replaced, and the decision waits for a settled fleet.
    hung = (inst("a", inflight=1), inst("b", U, inflight=30, progress=80))
    plan = decide(replace(SCALING, desired=2),
                  Observed(hung, _memory({"ever_healthy": SEEN, "high_load_since": 90.0})), 100)
    assert plan.desired == 2
    assert ("Terminate", "b") in summary(plan)


def test_empty_fleet_launches_each_missing_instance_with_distinct_tokens() -> None:
    plan = decide(replace(BASE, desired=3, max=3), Observed(()), 0)
    tokens = [a.token for a in plan.actions if isinstance(a, Launch)]
    assert len(tokens) == 3 and len(set(tokens)) == 3
    again = decide(replace(BASE, desired=3, max=3), Observed((), plan.memory), 1)
    assert not {a.token for a in again.actions if isinstance(a, Launch)} & set(tokens)


def test_hung_and_dead_instances_are_killed_not_drained() -> None:
    plan = decide(BASE, Observed((inst("a", state=STOPPED), inst("b", U)),
                                 _memory({"ever_healthy": SEEN})), 100)
    terminates = [a for a in plan.actions if isinstance(a, Terminate)]
    assert {t.instance_id for t in terminates} == {"a", "b"}
    assert not any(t.graceful for t in terminates)


def test_drain_after_scale_in_is_graceful() -> None:
    plan = decide(BASE, Observed((inst("a"), inst("b"), inst("c", D, inflight=0)),
                                 _memory({"ever_healthy": SEEN, "draining": {"c": 1.0}})), 2)
    assert [a for a in plan.actions if isinstance(a, Terminate)] == [
        Terminate("c", "drained", graceful=True)]


def test_death_while_booting_is_counted_once_even_if_cleanup_is_retried() -> None:
    dead = (inst("a"), inst("n", INIT, state=STOPPED, at=99))
    first = decide(BASE, Observed(dead, _memory({"ever_healthy": {"a"}})), 100)
    second = decide(BASE, Observed(dead, first.memory), 100.5)
    assert first.memory.launch.failures == 1
    assert second.memory.launch.failures == 1
    assert [e.kind for e in second.events] == []  # nothing reported twice


def test_becoming_healthy_resets_the_launch_backoff() -> None:
    memory = _memory({"ever_healthy": {"a"}, "launch": Backoff(4, 200.0)})
    plan = decide(BASE, Observed((inst("a"), inst("n", H, at=90)), memory), 100)
    assert plan.memory.launch == Backoff()
    assert "instance_healthy" in {e.kind for e in plan.events}


def test_record_launch_failure_doubles_the_delay_up_to_the_cap() -> None:
    memory, delays = Memory(), []
    for _ in range(9):
        memory = record_launch_failure(memory, BASE, now=1000)
        delays.append(memory.launch.not_before - 1000)
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_request_replacement_marks_instance() -> None:
    assert request_replacement(Memory(), "a").replacing == frozenset({"a"})


def test_spec_rejects_desired_outside_range_and_names_it() -> None:
    with pytest.raises(ValueError, match=r"desired must be within min..max \(1..4\), got 5"):
        FleetSpec(desired=5, min=1, max=4)
    assert SCALING.clamp(9) == 4 and SCALING.clamp(0) == 1


# --- simulations over many ticks of a fake clock --------------------------------------------


class World:
    """A tiny simulated provider: applies a plan's actions to a dict of instances."""

    def __init__(self, boots_ok: bool, boot_s: float = 2.0) -> None:
        self.instances: dict[str, Instance] = {}
        self.launch_times: list[float] = []
        self.boots_ok = boots_ok
        self.boot_s = boot_s
        self.seq = 0

    def observe(self, now: float) -> tuple[Instance, ...]:
        for iid, i in list(self.instances.items()):
            if i.state is InstanceState.STOPPING:
                del self.instances[iid]
            elif i.registered and i.health is INIT and now - i.launched_at >= self.boot_s:
                self.instances[iid] = replace(i, health=H)
            elif not self.boots_ok and i.state is RUNNING and now - i.launched_at >= 0.5:
                self.instances[iid] = replace(i, state=STOPPED, detail="exit code 1")
        return tuple(self.instances.values())

    def act(self, plan: Plan, now: float) -> None:
        for action in plan.actions:
            if isinstance(action, Launch):
                self.seq += 1
                self.launch_times.append(now)
                iid = f"i{self.seq}"
                self.instances[iid] = inst(iid, Health.UNUSED, at=now, registered=False)
            elif isinstance(action, Register):
                self.instances[action.instance_id] = replace(
                    self.instances[action.instance_id], registered=True, health=INIT)
            elif isinstance(action, Deregister):
                self.instances[action.instance_id] = replace(
                    self.instances[action.instance_id], health=D)
            elif isinstance(action, Terminate):
                self.instances[action.instance_id] = replace(
                    self.instances[action.instance_id], state=InstanceState.STOPPING)
            elif isinstance(action, Bootstrap):
                pass


def simulate(spec: FleetSpec, world: World, seconds: float, tick: float = 0.5,
             memory: Memory | None = None) -> tuple[list[Plan], Memory]:
    memory = memory or Memory()
    plans, now = [], 0.0
    while now <= seconds:
        plan = decide(spec, Observed(world.observe(now), memory), now)
        spec = replace(spec, desired=plan.desired)
        world.act(plan, now)
        memory = plan.memory
        plans.append(plan)
        now += tick
    return plans, memory


def test_crashing_worker_command_backs_off_instead_of_launch_storm() -> None:
    world = World(boots_ok=False)
    plans, memory = simulate(replace(BASE, desired=2), world, seconds=120)
    # Without backoff: a launch (two, even) every tick = 480 launches in 120 s.
    assert 2 <= len(world.launch_times) <= 12
    gaps = [b - a for a, b in zip(world.launch_times[2:], world.launch_times[3:], strict=False)]
    assert gaps == sorted(gaps), f"delays between probes must not shrink: {gaps}"
    assert max(gaps) >= 30
    assert memory.launch.failures >= 6
    assert sum(1 for p in plans for e in p.events if e.kind == "launch_failed") >= 6


def test_healthy_boot_fills_the_fleet_and_then_stays_quiet() -> None:
    world = World(boots_ok=True)
    plans, _ = simulate(BASE, world, seconds=30)
    assert len(world.launch_times) == 2
    assert all(i.health is H for i in world.instances.values())
    assert not plans[-1].actions


def test_capacity_never_drops_below_desired_during_a_requested_replacement() -> None:
    world = World(boots_ok=True)
    _, memory = simulate(BASE, world, seconds=10)
    old = sorted(world.instances)[0]
    memory = request_replacement(memory, old)
    now, spec, healthy_counts = 10.0, BASE, []
    while now < 40:
        observed = world.observe(now)
        healthy_counts.append(sum(1 for i in observed if i.health is H and i.live))
        plan = decide(spec, Observed(observed, memory), now)
        world.act(plan, now)
        memory = plan.memory
        now += 0.5
    assert old not in world.instances
    assert len(world.instances) == 2
    assert min(healthy_counts) >= 2


def test_load_scales_out_then_idle_scales_in_within_bounds() -> None:
    spec = replace(SCALING, desired=1, scale_in_window_s=10)
    world = World(boots_ok=True)
    _, memory = simulate(spec, world, seconds=5)
    now, desired_seen = 5.0, []
    for phase_load, until in ((9, 40.0), (0, 120.0)):
        while now < until:
            for iid, i in world.instances.items():
                if i.health is H:
                    world.instances[iid] = replace(i, inflight=phase_load)
            plan = decide(spec, Observed(world.observe(now), memory), now)
            spec = replace(spec, desired=plan.desired)
            world.act(plan, now)
            memory = plan.memory
            desired_seen.append(plan.desired)
            now += 0.5
    assert max(desired_seen) == 4
    assert desired_seen[-1] == 1
    assert all(1 <= d <= 4 for d in desired_seen)
    assert len([i for i in world.instances.values() if i.live]) == 1


# --- properties over arbitrary observed states ------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

instances_st = st.lists(
    st.builds(
        lambda n, state, health, at, inflight, registered, bootstrapped: inst(
            f"i{n}", health, state=state, at=at, inflight=inflight, registered=registered,
            bootstrapped=bootstrapped),
        st.integers(0, 9), st.sampled_from(InstanceState), st.sampled_from(Health),
        st.floats(0, 200), st.one_of(st.none(), st.integers(0, 20)), st.booleans(),
        st.booleans()),
    max_size=8, unique_by=lambda i: i.id)


@settings(max_examples=300, deadline=None)
@given(instances=instances_st, desired=st.integers(1, 4), now=st.floats(0, 300),
       seen=st.sets(st.sampled_from([f"i{n}" for n in range(10)])),
       draining=st.sets(st.sampled_from([f"i{n}" for n in range(10)])),
       backoff_until=st.floats(0, 400), failures=st.integers(0, 5))
def test_decide_invariants(instances, desired, now, seen, draining, backoff_until,
                           failures) -> None:
    spec = replace(SCALING, desired=desired)
    memory = _memory({"ever_healthy": seen, "draining": {d: 0.0 for d in draining},
                      "launch": Backoff(failures, backoff_until)})
    plan = decide(spec, Observed(tuple(instances), memory), now)
    by_id = {i.id: i for i in instances}

    assert spec.min <= plan.desired <= spec.max
    targeted = [a.instance_id for a in plan.actions if not isinstance(a, Launch)]
    assert len(targeted) == len(set(targeted)), "one action per instance per tick"
    assert set(targeted) <= set(by_id)
    assert sum(isinstance(a, Launch) for a in plan.actions) <= plan.desired
    newly_healthy = any(i.live and i.health is H and i.id not in seen for i in instances)
    if now < backoff_until and not newly_healthy:
        assert not any(isinstance(a, Launch) for a in plan.actions), "launched during backoff"
    for action in plan.actions:
        if not isinstance(action, Terminate | Deregister):
            continue
        target = by_id[action.instance_id]
        if isinstance(action, Terminate) and not action.graceful:
            # Killing outright is only for the dead, the hung and failed boots.
            assert not (target.live and target.registered and target.health is H
                        and target.bootstrapped and target.state is RUNNING)
        booting_in_grace = (target.live and target.id not in seen
                            and now - target.launched_at < spec.grace_period_s
                            and target.id not in draining and target.health is not D)
        if booting_in_grace and isinstance(action, Terminate) and not action.graceful:
            raise AssertionError(f"killed a booting instance within its grace period: {target}")
