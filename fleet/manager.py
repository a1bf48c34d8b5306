"""The fleet manager loop: observe → decide → act → record events.

The manager owns the only mutable fleet state (the current spec, reconcile memory, the
last observation, a bounded event log and per-action backoff). The decision itself is
:func:`fleet.reconcile.decide`; the manager only feeds it and carries out its plan.

Failure handling:

- An action that raises never stops the loop: it is logged with its traceback (when it
  is not one of the provider's documented errors), recorded as an event, and the same
  action (same kind, same instance) is held back by a delay that doubles per failure and
  resets on success — no sleeping inside an action, the loop just skips it until due.
- A failed ``launch`` feeds the reconcile launch backoff instead, so launch errors and
  instances that die while booting share one backoff and never cause a launch storm.
- A failed ``observe`` skips the tick (nothing is decided on stale data).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fleet.loop import run_every
from fleet.model import (
    Action,
    Backoff,
    Bootstrap,
    Deregister,
    Event,
    FleetSpec,
    Health,
    Instance,
    Launch,
    Memory,
    Observed,
    Plan,
    Register,
    Terminate,
)
from fleet.providers.base import PermanentProviderError, Provider, TransientProviderError
from fleet.reconcile import decide, record_launch_failure, request_replacement
from server import api

if TYPE_CHECKING:
    from fleet.window import Sample, Sampler

log = logging.getLogger(__name__)

ACTION_BACKOFF_BASE_S = 0.5
ACTION_BACKOFF_MAX_S = 30.0


class AdminError(Exception):
    """A refused admin request; ``status`` and ``code`` go into the JSON error answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class FleetManager:
    def __init__(
        self,
        provider: Provider,
        spec: FleetSpec,
        *,
        clock: Callable[[], float] = time.time,
        max_events: int = 200,
        action_timeout_s: float = 60.0,
        sample_interval_s: float = 5.0,
    ) -> None:
        self.provider = provider
        self._spec = spec
        self._clock = clock
        self._memory = Memory()
        self._instances: tuple[Instance, ...] = ()
        self._events: deque[Event] = deque(maxlen=max_events)
        self._action_backoff: dict[str, Backoff] = {}
        self._action_timeout_s = action_timeout_s
        self._ticks = 0
        from fleet.metrics import ManagerMetrics  # prometheus_client: only when built
        self.metrics = ManagerMetrics(self._metric_state)
        from fleet.window import SAMPLES, Window
        # An hour of samples whatever the interval (at most 3600 of them).
        self.samples = Window(min(3600, max(SAMPLES, int(3600 / sample_interval_s))),
                              sample_interval_s)

    # --- state for the admin API ---------------------------------------------------------

    @property
    def spec(self) -> FleetSpec:
        return self._spec

    @property
    def instances(self) -> tuple[Instance, ...]:
        return self._instances

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def snapshot(self) -> dict[str, Any]:
        """``GET /fleet``, newest event last."""
        return api.FleetState(
            name=self._spec.name,
            provider=self.provider.name,
            desired=self._spec.desired,
            min=self._spec.min,
            max=self._spec.max,
            instances=tuple(i.wire() for i in self._instances),
            events=tuple(e.wire() for e in self._events),
        ).model_dump(mode="json")

    def window(self, seconds: float) -> dict[str, Any]:
        """``GET /fleet/metrics``: the rolling window's series and the events behind them
        (for the alerts' links)."""
        from fleet.alerts import alerts_json
        now = self._clock()
        body = self.samples.series(seconds, now)
        body["alerts"] = alerts_json(self.samples.samples, self._events, now)
        body["events"] = [e.to_json() for e in self._events if e.at >= now - seconds]
        return body

    def sampler(self, token: Callable[[], str | None] = lambda: None,
                on_sample: Callable[[Sample], None] | None = None) -> Sampler:
        """The task body that fills the window from the live workers' ``/metrics``;
        ``on_sample`` is told of each new sample (the AWS manager publishes it)."""
        from fleet.window import Sampler
        return Sampler(self.samples, lambda: (self._spec.desired,
                                              [i for i in self._instances if i.live]),
                       token=token, clock=self._clock, on_sample=on_sample)

    def _metric_state(self) -> dict[str, Any]:
        live = [i for i in self._instances if i.live]
        return {"desired": self._spec.desired, "min": self._spec.min, "max": self._spec.max,
                "instances": len(live),
                "healthy": sum(1 for i in live if i.health is Health.HEALTHY)}

    def scale(self, desired: object) -> dict[str, Any]:
        """``POST /fleet/scale``: set desired within min..max (validated, never clamped,
        so a caller learns that its number was not taken)."""
        spec = self._spec
        if isinstance(desired, bool) or not isinstance(desired, int):
            raise AdminError(400, "invalid_desired",
                             f"'desired' must be an integer within {spec.min}..{spec.max}, "
                             f"got {desired!r}")
        if not spec.min <= desired <= spec.max:
            raise AdminError(400, "invalid_desired",
                             f"'desired' must be within {spec.min}..{spec.max}, got {desired}")
        if desired != spec.desired:
            self.record(Event(self._clock(), "scale", None,
                              f"desired {spec.desired} -> {desired} (admin request)"))
            self._spec = replace(spec, desired=desired)
        return api.ScaleAnswer(desired=desired, min=spec.min, max=spec.max).model_dump(mode="json")

    def terminate(self, instance_id: str) -> dict[str, Any]:
        """``POST /fleet/instances/<id>/terminate``: replace the instance — a replacement
        is launched first and the instance drained once the fleet can spare it."""
        known = {i.id: i for i in self._instances}
        if instance_id not in known:
            raise AdminError(404, "unknown_instance",
                             f"no instance {instance_id!r}; known: {sorted(known) or 'none'}")
        if not known[instance_id].live:
            return api.TerminateAnswer(instance_id=instance_id,
                                       status=known[instance_id].state.value
                                       ).model_dump(mode="json")
        self._memory = request_replacement(self._memory, instance_id)
        self.record(Event(self._clock(), "terminate_requested", instance_id,
                          "admin request: replacing, then draining"))
        return api.TerminateAnswer(instance_id=instance_id,
                                   status="replacing").model_dump(mode="json")

    def record(self, event: Event) -> None:
        log.info("fleet event %s %s: %s", event.kind, event.instance_id or "-", event.message)
        self._events.append(event)

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``spec.tick_interval_s`` until ``stop`` is set."""
        await run_every(self.tick, stop, self._spec.tick_interval_s, what="fleet tick",
                        on_failure=self.record_cycle_failure)

    def record_cycle_failure(self, exc: Exception) -> None:
        """A whole tick (or an AWS service step) raised: kept in the event log."""
        self.record(Event(self._clock(), "tick_failed", None, repr(exc)))

    async def tick(self) -> Plan | None:
        try:
            observed = await asyncio.wait_for(self.provider.observe(),
                                              timeout=self._action_timeout_s)
        except (TransientProviderError, PermanentProviderError, TimeoutError) as exc:
            self.record(Event(self._clock(), "observe_failed", None, str(exc) or repr(exc)))
            return None
        now = self._clock()
        if self._ticks == 0 and observed:
            self.record(Event(now, "adopted", None,
                              f"found {len(observed)} instance(s) from an earlier run: "
                              + ", ".join(i.id for i in observed)))
        self._ticks += 1
        self._instances = observed
        plan = decide(self._spec, Observed(observed, self._memory), now)
        self._memory = plan.memory
        if plan.desired != self._spec.desired:
            self._spec = replace(self._spec, desired=plan.desired)
        for event in plan.events:
            self.record(event)
        due = [a for a in plan.actions if self._due(a, now)]
        if due:
            await asyncio.gather(*(self._act(a) for a in due))
        return plan

    def _due(self, action: Action, now: float) -> bool:
        backoff = self._action_backoff.get(action.key)
        return backoff is None or backoff.ready(now)

    async def _act(self, action: Action) -> None:
        try:
            await asyncio.wait_for(self._call(action), timeout=self._action_timeout_s)
        except Exception as exc:  # noqa: BLE001 - one action's crash must not stop the loop; _failed logs it
            self._failed(action, exc)
        else:
            self._action_backoff.pop(action.key, None)
            self.metrics.action(type(action).__name__.lower(), True,
                                getattr(action, "reason", ""))

    async def _call(self, action: Action) -> None:
        provider = self.provider
        match action:
            case Launch(token=token, reason=reason):
                instance_id = await provider.launch(token)
                self.record(Event(self._clock(), "launched", instance_id, reason))
            case Bootstrap(instance_id=iid):
                await provider.bootstrap(iid)
            case Register(instance_id=iid):
                await provider.register(iid)
            case Deregister(instance_id=iid, reason=reason):
                await provider.deregister(iid)
                self.record(Event(self._clock(), "deregistered", iid, reason))
            case Terminate(instance_id=iid, reason=reason, graceful=graceful):
                await provider.terminate(iid, graceful=graceful)
                self.record(Event(self._clock(), "terminated", iid, reason))

    def _failed(self, action: Action, exc: BaseException) -> None:
        now = self._clock()
        self.metrics.action(type(action).__name__.lower(), False)
        permanent = isinstance(exc, PermanentProviderError)
        if not isinstance(exc, TransientProviderError | PermanentProviderError | TimeoutError):
            log.error("fleet action %s raised an unexpected error", action, exc_info=exc)
        if isinstance(action, Launch):
            self._memory = record_launch_failure(self._memory, self._spec, now)
            if permanent:
                spec = self._spec
                self._memory = replace(self._memory, launch=Backoff(
                    self._memory.launch.failures, now + spec.launch_backoff_max_s))
            wait = self._memory.launch.not_before - now
            message = f"{exc or repr(exc)}; next launch in {wait:.1f}s"
            self.record(Event(now, "launch_failed", None, message))
            return
        previous = self._action_backoff.get(action.key, Backoff())
        backoff = previous.failed(now, ACTION_BACKOFF_BASE_S, ACTION_BACKOFF_MAX_S)
        if permanent:
            backoff = Backoff(backoff.failures, now + ACTION_BACKOFF_MAX_S)
        self._action_backoff[action.key] = backoff
        self.record(Event(now, "action_failed", getattr(action, "instance_id", None),
                          f"{type(action).__name__.lower()} failed "
                          f"({backoff.failures} in a row, retry in "
                          f"{backoff.not_before - now:.1f}s): {exc or repr(exc)}"))
