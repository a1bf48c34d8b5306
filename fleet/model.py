"""The fleet's vocabulary: instances as observed, the spec, actions, events, plans.

Everything here is a frozen dataclass or an enum so that :func:`fleet.reconcile.decide`
can be a pure function of its inputs. Times are plain ``float`` seconds since the epoch
(``time.time()``); tests pass any numbers they like as the clock. Values from outside (a
caller's overrides, a file) come in through :func:`spec_from_mapping`, which checks their
types with pydantic before the spec checks its own ranges.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from server import api
from server.backoff import doubling_delay
from server.settings import one_line


class InstanceState(enum.StrEnum):
    """Life-cycle of the machine or process behind an instance (EC2's names)."""

    PENDING = "pending"  # asked for, not up yet (EC2 pending; local: process spawned)
    BOOTSTRAPPING = "bootstrapping"  # up, software being installed (SSH bootstrap)
    RUNNING = "running"  # up and able to serve once healthy
    STOPPING = "stopping"  # we asked it to go away; on its way out
    STOPPED = "stopped"  # gone without being asked (process exited, instance stopped)
    TERMINATED = "terminated"  # gone for good; kept only until the provider forgets it


class Health(enum.StrEnum):
    """Target health, exactly the states an AWS ALB target group reports."""

    INITIAL = "initial"  # registered, not enough checks yet
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    UNUSED = "unused"  # not registered with the load balancer
    DRAINING = "draining"  # deregistered; in-flight requests may still finish


LIVE_STATES = frozenset({InstanceState.PENDING, InstanceState.BOOTSTRAPPING,
                         InstanceState.RUNNING})


@dataclass(frozen=True)
class Instance:
    """One worker as a provider observed it.

    ``inflight`` is the number of outstanding requests the load balancer has open to the
    instance, or ``None`` when the provider cannot know it (then load-based scaling is
    off). ``bootstrapped`` is False while a provider still has set-up work to do after the
    machine is up (the AWS provider's SSH bootstrap); the local provider's workers start
    bootstrapped.
    """

    id: str
    state: InstanceState
    health: Health
    address: str | None  # "host:port" the load balancer forwards to
    launched_at: float
    inflight: int | None = 0
    registered: bool = False  # in the load balancer's target set (incl. draining)
    bootstrapped: bool = True
    detail: str = ""  # provider's free-text reason (exit code, EC2 state reason)
    # Clock time of the last evidence that the instance makes progress (a passed health
    # check, a completed request, its completed-work counter moving), or None when the
    # provider cannot know. Busy is not dead: an instance failing its checks while it
    # keeps completing work is taken out of rotation by the load balancer, never killed.
    last_progress_at: float | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def to_json(self) -> dict[str, Any]:
        """The shape of one entry of ``GET /fleet`` ``instances``."""
        return self.wire().model_dump(mode="json")

    def wire(self) -> api.FleetInstance:
        return api.FleetInstance(id=self.id, state=self.state.value, health=self.health.value,
                                 address=self.address, inflight=self.inflight,
                                 launched_at=self.launched_at)


@dataclass(frozen=True)
class FleetSpec:
    """What the fleet should look like and how patiently to judge it.

    Health-check fields mirror an ALB target group's (interval, timeout, healthy and
    unhealthy thresholds); the local gateway applies them, the AWS provider configures
    the target group with them. Scaling is on only when ``min < max``.
    """

    name: str = "imagefleet"
    desired: int = 2
    min: int = 2
    max: int = 2
    health_check_interval_s: float = 1.0
    health_check_timeout_s: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    # A new instance is never replaced for not being healthy *yet* within this time.
    grace_period_s: float = 30.0
    # An instance that was healthy and now fails its checks is replaced only once it has
    # shown no progress (see Instance.last_progress_at) for this long: hung, not busy.
    no_progress_timeout_s: float = 10.0
    # How long a deregistered instance may keep finishing requests before it is stopped.
    drain_timeout_s: float = 30.0
    # Scale out when the mean in-flight requests per healthy instance stays above this.
    target_inflight: float = 2.0
    scale_out_window_s: float = 5.0
    # Scale in when, with one instance fewer, the mean would stay at or below
    # target_inflight * scale_in_ratio for this long.
    scale_in_ratio: float = 0.5
    scale_in_window_s: float = 30.0
    scale_cooldown_s: float = 5.0
    # Launch failures (launch errors, instances dying before their first healthy check)
    # delay the next launch by base * 2**(failures-1), capped.
    launch_backoff_base_s: float = 1.0
    launch_backoff_max_s: float = 60.0
    # Replace instances older than this (rolling refresh); None: never.
    max_lifetime_s: float | None = None
    # How often the manager observes and decides.
    tick_interval_s: float = 0.5
    # For spec_from_mapping: an unknown key is a typo, never silently dropped.
    __pydantic_config__ = ConfigDict(extra="forbid")

    def __post_init__(self) -> None:
        problems = spec_problems(self)
        if problems:
            raise ValueError("invalid fleet spec: " + "; ".join(problems))

    @property
    def scaling_enabled(self) -> bool:
        return self.min < self.max

    def clamp(self, desired: int) -> int:
        return max(self.min, min(self.max, desired))


def spec_from_mapping(values: Mapping[str, Any], base: FleetSpec | None = None) -> FleetSpec:
    """A spec from untrusted values, the fields not given taken from ``base`` (default:
    the defaults). ValueError with one line naming each wrong field: an unknown key, a
    value of the wrong type, or a range ``spec_problems`` refuses."""
    start = asdict(base) if base is not None else {}
    try:
        return TypeAdapter(FleetSpec).validate_python({**start, **values})
    except ValidationError as exc:
        raise ValueError(one_line(exc)) from None


def spec_problems(spec: FleetSpec) -> list[str]:
    problems = []
    if spec.min < 0:
        problems.append(f"min must be >= 0, got {spec.min}")
    if spec.max < max(spec.min, 1):
        problems.append(f"max must be >= max(min, 1), got min={spec.min} max={spec.max}")
    if not spec.min <= spec.desired <= spec.max:
        problems.append(f"desired must be within min..max ({spec.min}..{spec.max}), "
                        f"got {spec.desired}")
    for name in ("health_check_interval_s", "health_check_timeout_s", "tick_interval_s",
                 "launch_backoff_base_s", "target_inflight"):
        if not getattr(spec, name) > 0:
            problems.append(f"{name} must be > 0, got {getattr(spec, name)}")
    for name in ("healthy_threshold", "unhealthy_threshold"):
        if getattr(spec, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(spec, name)}")
    for name in ("grace_period_s", "no_progress_timeout_s", "drain_timeout_s",
                 "scale_out_window_s",
                 "scale_in_window_s", "scale_cooldown_s"):
        if getattr(spec, name) < 0:
            problems.append(f"{name} must be >= 0, got {getattr(spec, name)}")
    if not 0 <= spec.scale_in_ratio < 1:
        problems.append(f"scale_in_ratio must be in [0, 1), got {spec.scale_in_ratio}")
    if spec.launch_backoff_max_s < spec.launch_backoff_base_s:
        problems.append("launch_backoff_max_s must be >= launch_backoff_base_s")
    return problems


# --- actions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """Start one new instance. ``token`` is unique per launch decision and stable if the
    same decision is retried, so a provider can pass it as an idempotency token
    (EC2 ``ClientToken``)."""

    token: str
    reason: str

    @property
    def key(self) -> str:
        return "launch"


@dataclass(frozen=True)
class Bootstrap:
    """Run the provider's set-up on an instance that is up but not bootstrapped."""

    instance_id: str

    @property
    def key(self) -> str:
        return f"bootstrap:{self.instance_id}"


@dataclass(frozen=True)
class Register:
    """Add the instance to the load balancer's targets (health starts ``initial``)."""

    instance_id: str

    @property
    def key(self) -> str:
        return f"register:{self.instance_id}"


@dataclass(frozen=True)
class Deregister:
    """Stop sending new requests to the instance; in-flight ones finish (draining)."""

    instance_id: str
    reason: str

    @property
    def key(self) -> str:
        return f"deregister:{self.instance_id}"


@dataclass(frozen=True)
class Terminate:
    """Make the instance go away (also deregisters it if needed). ``graceful``: ask it to
    finish in-flight work first (SIGTERM / normal termination); otherwise kill it now —
    for dead or hung instances, where waiting helps no one."""

    instance_id: str
    reason: str
    graceful: bool = True

    @property
    def key(self) -> str:
        return f"terminate:{self.instance_id}"


Action = Launch | Bootstrap | Register | Deregister | Terminate


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """Something worth telling a person, shown in ``GET /fleet`` ``events``."""

    at: float
    kind: str
    instance_id: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return self.wire().model_dump(mode="json")

    def wire(self) -> api.FleetEvent:
        return api.FleetEvent(at=self.at, kind=self.kind, instance_id=self.instance_id,
                              message=self.message)


# --- reconcile memory and plan -----------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """A delay sequence: each failure doubles the wait (capped); success resets it."""

    failures: int = 0
    not_before: float = 0.0

    def ready(self, now: float) -> bool:
        return now >= self.not_before

    def failed(self, now: float, base: float, cap: float) -> Backoff:
        failures = self.failures + 1
        return Backoff(failures=failures, not_before=now + doubling_delay(failures, base, cap))

    def hold(self, now: float, base: float, cap: float) -> Backoff:
        """Wait the current delay again without counting a new failure (pacing probes)."""
        return Backoff(self.failures, now + doubling_delay(max(self.failures, 1), base, cap))


def _frozen_map(items: Mapping[str, float] | None = None) -> Mapping[str, float]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class Memory:
    """What :func:`decide` remembers between ticks; it returns the next one in the Plan.

    The manager treats it as opaque except through the helper functions in
    :mod:`fleet.reconcile` (``request_replacement``, ``record_launch_failure``...).
    """

    launch: Backoff = Backoff()
    launch_seq: int = 0
    ever_healthy: frozenset[str] = frozenset()
    counted_failures: frozenset[str] = frozenset()  # died-at-boot ids already counted
    replacing: frozenset[str] = frozenset()  # replacement due; still serving until replaced
    draining: Mapping[str, float] = field(default_factory=_frozen_map)  # id -> since
    reported: frozenset[str] = frozenset()  # ids whose death/hang was already reported
    slow: frozenset[str] = frozenset()  # failing checks but progressing: kept, reported once
    high_load_since: float | None = None
    low_load_since: float | None = None
    last_scale_at: float | None = None


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    desired: int
    memory: Memory
    events: tuple[Event, ...] = ()


def iso_time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


@dataclass(frozen=True)
class Observed:
    """Input of :func:`fleet.reconcile.decide`: what the provider reported this tick, plus
    the memory the previous plan handed back."""

    instances: tuple[Instance, ...]
    memory: Memory = Memory()
