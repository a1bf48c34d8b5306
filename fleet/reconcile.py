"""Decide what to do: a pure function from observed state, spec and clock to a Plan.

``decide`` never performs I/O and never reads the clock; the manager observes, calls it,
and carries the returned :class:`~fleet.model.Memory` into the next call. Rules, in the
order they are applied to each instance:

1. ``stopping`` / ``terminated``: on its way out, ignored.
2. ``stopped`` (went away unasked — process died, instance stopped): clean it up
   (terminate, not graceful). If it never passed a health check it counts as a launch
   failure, which grows the launch backoff.
3. Draining (we deregistered it): terminate once in-flight reaches 0, the load balancer
   reports ``unused``, or ``drain_timeout_s`` passes.
4. ``pending`` / ``bootstrapping`` / not bootstrapped: booting. Left alone within
   ``grace_period_s`` of launch; after that replaced as a launch failure.
5. Running, unregistered: register it.
6. Registered, not healthy. After having been healthy: if it still makes progress
   (``last_progress_at`` within ``no_progress_timeout_s``: it completes requests, or its
   checks pass now and then) it is busy, not dead — the load balancer routes around it
   and it is kept; once it has made no progress for that long it is hung: kill and
   replace. (A provider that cannot see progress reports None: replaced at once, as
   before.) Never healthy and past the grace period: failed to boot, replaced. Within
   the grace period a never-healthy instance is never replaced for not being healthy
   yet.
7. Replacement due (asked through the admin API, or older than ``max_lifetime_s``): launch
   the replacement first; drain the old one only once the other healthy instances
   cover ``desired`` — capacity never drops for a planned replacement.

Then, with what is left as capacity: scale ``desired`` on sustained load (when
``min < max``; judged once nothing is booting, busy instances counting as serving),
drain the surplus (least useful first), and launch what is missing — all at once
normally, one at a time and only when the backoff allows after failures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from fleet.model import (
    Action,
    Backoff,
    Bootstrap,
    Deregister,
    Event,
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

__all__ = ["decide", "record_launch_failure", "request_replacement"]


def request_replacement(memory: Memory, instance_id: str) -> Memory:
    """Mark an instance as due for replacement (replace-before-terminate)."""
    return replace(memory, replacing=memory.replacing | {instance_id})


def record_launch_failure(memory: Memory, spec: FleetSpec, now: float) -> Memory:
    """A ``launch`` call failed: grow the launch backoff exactly as a boot failure does."""
    return replace(memory, launch=memory.launch.failed(
        now, spec.launch_backoff_base_s, spec.launch_backoff_max_s))


@dataclass
class _Tick:
    """Scratch state while deciding one tick (never escapes ``decide``)."""

    spec: FleetSpec
    now: float
    memory: Memory
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    launch: Backoff = field(default_factory=Backoff)
    counted: set[str] = field(default_factory=set)
    reported: set[str] = field(default_factory=set)
    slow: set[str] = field(default_factory=set)
    draining: dict[str, float] = field(default_factory=dict)
    replacing: set[str] = field(default_factory=set)
    capacity: list[Instance] = field(default_factory=list)  # serving or booting

    def event(self, kind: str, instance_id: str | None, message: str) -> None:
        self.events.append(Event(self.now, kind, instance_id, message))

    def report_once(self, kind: str, instance: Instance, message: str) -> None:
        if instance.id not in self.reported:
            self.reported.add(instance.id)
            self.event(kind, instance.id, message)

    def launch_failed(self, instance: Instance, why: str) -> None:
        if instance.id in self.counted:
            return
        self.counted.add(instance.id)
        self.launch = self.launch.failed(
            self.now, self.spec.launch_backoff_base_s, self.spec.launch_backoff_max_s)
        wait = self.launch.not_before - self.now
        self.event("launch_failed", instance.id,
                   f"{why}; {self.launch.failures} launch failure(s) in a row, "
                   f"next launch in {wait:.1f}s")


def decide(spec: FleetSpec, observed: Observed, now: float) -> Plan:
    memory = observed.memory
    instances = sorted(observed.instances, key=lambda i: (i.launched_at, i.id))
    ids = {i.id for i in instances}
    tick = _Tick(
        spec=spec, now=now, memory=memory, launch=memory.launch,
        counted=set(memory.counted_failures & ids), reported=set(memory.reported & ids),
        slow=set(memory.slow & ids),
        draining={k: v for k, v in memory.draining.items() if k in ids},
        replacing={i.id for i in instances if i.id in memory.replacing and i.live},
    )
    ever_healthy = set(memory.ever_healthy & ids)
    for instance in instances:
        if instance.live and instance.health is Health.HEALTHY \
                and instance.id not in ever_healthy:
            ever_healthy.add(instance.id)
            tick.event("instance_healthy", instance.id,
                       f"passed health checks {now - instance.launched_at:.1f}s after launch")
            tick.launch = Backoff()  # a boot succeeded: launching works again

    for instance in instances:
        _judge(tick, instance, booted=instance.id in ever_healthy)

    desired = spec.clamp(spec.desired)
    keep = [i for i in tick.capacity if i.id not in tick.replacing]
    desired, memory_load = _autoscale(tick, keep, desired)
    _drain_replaced(tick, keep, desired)
    keep = _drain_surplus(tick, keep, desired)
    seq = _launch_missing(tick, len(keep), desired)

    next_memory = Memory(
        launch=tick.launch,
        launch_seq=seq,
        ever_healthy=frozenset(ever_healthy),
        counted_failures=frozenset(tick.counted),
        replacing=frozenset(tick.replacing & {i.id for i in tick.capacity}),
        draining=MappingProxyType(dict(tick.draining)),
        reported=frozenset(tick.reported),
        slow=frozenset(tick.slow),
        **memory_load,
    )
    return Plan(actions=tuple(tick.actions), desired=desired, memory=next_memory,
                events=tuple(tick.events))


def _judge(tick: _Tick, instance: Instance, *, booted: bool) -> None:
    """Apply rules 1–7 to one instance; what still serves or boots goes to capacity."""
    spec, now = tick.spec, tick.now
    age = now - instance.launched_at
    in_grace = age < spec.grace_period_s
    iid = instance.id

    if instance.state in (InstanceState.STOPPING, InstanceState.TERMINATED):
        return
    if instance.state is InstanceState.STOPPED:
        detail = f" ({instance.detail})" if instance.detail else ""
        tick.report_once("instance_died", instance, f"went away unasked{detail}")
        if not booted:
            tick.launch_failed(instance, f"died before passing a health check{detail}")
        tick.actions.append(Terminate(iid, "clean up after it went away", graceful=False))
        return

    if iid in tick.draining or (instance.registered and instance.health is Health.DRAINING):
        since = tick.draining.setdefault(iid, now)
        if instance.registered and instance.health not in (Health.DRAINING, Health.UNUSED):
            # our earlier deregister did not take effect; ask again before stopping it
            tick.actions.append(Deregister(iid, "deregister again: still receiving"))
            return
        drained = (not instance.registered or instance.health is Health.UNUSED
                   or instance.inflight == 0)
        if drained:
            tick.actions.append(Terminate(iid, "drained", graceful=True))
        elif now - since >= spec.drain_timeout_s:
            tick.event("drain_timeout", iid,
                       f"still {instance.inflight} in flight after {spec.drain_timeout_s:.0f}s")
            tick.actions.append(Terminate(iid, "drain timeout", graceful=True))
        return

    booting = (instance.state in (InstanceState.PENDING, InstanceState.BOOTSTRAPPING)
               or not instance.bootstrapped)
    if booting:
        if not in_grace:
            tick.report_once("boot_timeout", instance,
                             f"still {instance.state.value} after {spec.grace_period_s:.0f}s")
            tick.launch_failed(instance, "did not finish booting within the grace period")
            tick.actions.append(Terminate(iid, "boot timeout", graceful=False))
            return
        if instance.state is InstanceState.RUNNING:
            tick.actions.append(Bootstrap(iid))
        tick.capacity.append(instance)
        return

    if not instance.registered:
        tick.actions.append(Register(iid))
        tick.capacity.append(instance)
        return

    if instance.health is Health.HEALTHY:
        tick.slow.discard(iid)
        if (spec.max_lifetime_s is not None and age >= spec.max_lifetime_s
                and iid not in tick.replacing):
            tick.replacing.add(iid)
            tick.event("replacement_due", iid, f"older than {spec.max_lifetime_s:.0f}s")
        tick.capacity.append(instance)
        return

    # registered, not healthy: initial / unhealthy / unused
    if booted and _still_progressing(instance, spec, now):
        if iid not in tick.slow:
            tick.slow.add(iid)
            tick.event("instance_busy", iid,
                       f"failing health checks ({instance.health.value}) but still "
                       "completing work: out of rotation, kept; replaced only after "
                       f"{spec.no_progress_timeout_s:.0f}s without progress")
        tick.capacity.append(instance)
        return
    if booted:
        tick.slow.discard(iid)
        progress = ("" if instance.last_progress_at is None else
                    f", no progress for {now - instance.last_progress_at:.0f}s")
        tick.report_once("instance_unhealthy", instance,
                         f"failed health checks after having been healthy "
                         f"({instance.health.value}{progress}); replacing")
        tick.actions.append(Terminate(iid, "unhealthy", graceful=False))
        return
    if not in_grace:
        tick.report_once("instance_unhealthy", instance,
                         f"not healthy {spec.grace_period_s:.0f}s after launch "
                         f"({instance.health.value}); replacing")
        tick.launch_failed(instance, "never passed a health check within the grace period")
        tick.actions.append(Terminate(iid, "never became healthy", graceful=False))
        return
    tick.capacity.append(instance)  # booting: give it its grace period


def _still_progressing(instance: Instance, spec: FleetSpec, now: float) -> bool:
    return (instance.last_progress_at is not None
            and now - instance.last_progress_at < spec.no_progress_timeout_s)


def _autoscale(tick: _Tick, keep: list[Instance], desired: int) -> tuple[int, dict]:
    spec, now, memory = tick.spec, tick.now, tick.memory
    quiet = {"high_load_since": None, "low_load_since": None,
             "last_scale_at": memory.last_scale_at}
    # Serving: healthy, or busy (failing checks while still completing work: rule 6).
    # A busy instance is the clearest sign of load, so it counts rather than pausing
    # the decision the moment scaling out is most needed.
    serving = [i for i in keep if i.health is Health.HEALTHY or i.id in tick.slow]
    if (not spec.scaling_enabled or not serving or len(serving) != len(keep)
            or any(i.inflight is None for i in serving)):
        # Only judge load on a settled fleet: while instances boot, the mean per serving
        # instance overstates load and would scale out twice for one surge.
        return desired, quiet
    total = sum(i.inflight or 0 for i in serving)
    mean = total / len(serving)
    cooled = (memory.last_scale_at is None
              or now - memory.last_scale_at >= spec.scale_cooldown_s)
    if mean > spec.target_inflight:
        since = memory.high_load_since if memory.high_load_since is not None else now
        if now - since >= spec.scale_out_window_s and cooled and desired < spec.max:
            new = spec.clamp(max(desired + 1, math.ceil(total / spec.target_inflight)))
            tick.event("scale_out", None,
                       f"mean in-flight {mean:.1f} > {spec.target_inflight:g} per instance "
                       f"for {now - since:.0f}s: desired {desired} -> {new}")
            return new, {**quiet, "last_scale_at": now}
        return desired, {**quiet, "high_load_since": since}
    fewer = len(serving) - 1
    low = total == 0 if fewer == 0 else total / fewer <= spec.target_inflight * spec.scale_in_ratio
    if low and desired > spec.min:
        since = memory.low_load_since if memory.low_load_since is not None else now
        if now - since >= spec.scale_in_window_s and cooled:
            new = desired - 1
            tick.event("scale_in", None,
                       f"mean in-flight {mean:.1f} low for {now - since:.0f}s: "
                       f"desired {desired} -> {new}")
            return new, {**quiet, "last_scale_at": now}
        return desired, {**quiet, "low_load_since": since}
    return desired, quiet


def _drain(tick: _Tick, instance: Instance, reason: str) -> None:
    # Draining supersedes whatever this tick had planned for it (register, bootstrap).
    tick.actions = [a for a in tick.actions if getattr(a, "instance_id", None) != instance.id]
    tick.draining[instance.id] = tick.now
    tick.replacing.discard(instance.id)
    if instance.registered:
        tick.actions.append(Deregister(instance.id, reason))
    else:
        tick.actions.append(Terminate(instance.id, reason, graceful=True))


def _drain_replaced(tick: _Tick, keep: list[Instance], desired: int) -> None:
    """Replace before terminate: drain an instance due for replacement only when the
    instances staying are healthy enough to carry ``desired`` without it."""
    healthy_staying = sum(1 for i in keep if i.health is Health.HEALTHY)
    for instance in [i for i in tick.capacity if i.id in tick.replacing]:
        if instance.health is not Health.HEALTHY or healthy_staying >= desired:
            tick.event("replaced", instance.id, "replacement ready; draining")
            _drain(tick, instance, "replaced")


def _drain_surplus(tick: _Tick, keep: list[Instance], desired: int) -> list[Instance]:
    surplus = len(keep) - desired
    if surplus <= 0:
        return keep
    # Least useful first: not yet healthy, then least busy, then newest.
    ranked = sorted(keep, key=lambda i: (i.health is Health.HEALTHY, i.inflight or 0,
                                         -i.launched_at, i.id))
    victims = ranked[:surplus]
    for instance in victims:
        tick.event("scale_in_drain", instance.id,
                   f"{len(keep)} instances for desired {desired}: draining")
        _drain(tick, instance, "surplus")
    return [i for i in keep if i not in victims]


def _launch_missing(tick: _Tick, have: int, desired: int) -> int:
    seq = tick.memory.launch_seq
    missing = desired - have
    if missing <= 0:
        return seq
    if not tick.launch.ready(tick.now):
        return seq
    count = missing
    if tick.launch.failures:
        # After failures, probe with one launch per backoff delay instead of a storm;
        # the probe becoming healthy resets the backoff.
        count = 1
        tick.launch = tick.launch.hold(tick.now, tick.spec.launch_backoff_base_s,
                                       tick.spec.launch_backoff_max_s)
    for _ in range(count):
        seq += 1
        tick.actions.append(Launch(token=f"{tick.spec.name}-{seq}",
                                   reason=f"{have} of {desired} instances"))
    return seq
