"""Plain-language alerts from the rolling window and the event log: pure functions of
(samples, events, now), so when to alert is table-tested with a fake clock.

Each alert says what is wrong, what to do, and which events are behind it (the Fleet
view links to them).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.model import Event, iso_time

REPLACEMENT_REASONS = frozenset({"unhealthy", "never became healthy", "boot timeout",
                                 "clean up after it went away", "replaced"})


@dataclass(frozen=True)
class Rules:
    flap_count: int = 3  # replacements (or health flips of one instance) ...
    flap_window_s: float = 600.0  # ... within this long
    shed_fraction: float = 0.20  # of requests shed ...
    error_fraction: float = 0.05  # or failing ...
    load_window_s: float = 300.0  # ... sustained this long
    min_requests: float = 20.0  # no fraction alerts on a trickle
    launch_failures: int = 2  # launches failing within flap_window_s


@dataclass(frozen=True)
class Alert:
    kind: str  # "flapping", "shedding", "errors", "launch_failures"
    severity: str  # "warning" or "critical"
    message: str  # what, in plain words, and what to do
    events: tuple[Event, ...] = ()  # the events behind it

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "severity": self.severity, "message": self.message,
                "events": [e.to_json() for e in self.events]}


def _minutes(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m} minute{'s' if m != 1 else ''}"


def flapping(events: Sequence[Event], now: float, rules: Rules) -> list[Alert]:
    recent = [e for e in events if now - rules.flap_window_s <= e.at <= now]
    replaced = [e for e in recent if e.kind == "terminated"
                and e.message in REPLACEMENT_REASONS]
    alerts = []
    if len(replaced) >= rules.flap_count:
        ids = [e.instance_id for e in replaced if e.instance_id]
        last = ids[-1] if ids else "?"
        alerts.append(Alert(
            "flapping", "critical",
            f"{len(replaced)} replacements in {_minutes(rules.flap_window_s)}: instance "
            f"{last} keeps failing its checks; read its log and the events (a bad image, "
            f"too little memory, a health check too strict)", tuple(replaced)))
    flips = Counter(e.instance_id for e in recent if e.kind == "instance_healthy")
    for iid, n in sorted(flips.items(), key=lambda kv: str(kv[0])):
        if iid and n >= rules.flap_count:
            behind = tuple(e for e in recent if e.instance_id == iid)
            alerts.append(Alert(
                "flapping", "warning",
                f"instance {iid} became healthy {n} times in "
                f"{_minutes(rules.flap_window_s)}: it keeps failing its checks; it may be "
                f"overloaded (raise max) or its checks too strict", behind))
    return alerts


def _sustained(samples: Sequence[Any], now: float, rules: Rules) -> list[Any]:
    """The samples of the last load_window_s, or [] when they do not cover most of it."""
    recent = [s for s in samples if now - rules.load_window_s < s.at <= now]
    covered = sum(s.interval_s for s in recent)
    return recent if covered >= 0.8 * rules.load_window_s else []


def load_alerts(samples: Sequence[Any], now: float, rules: Rules) -> list[Alert]:
    recent = _sustained(samples, now, rules)
    if not recent:
        return []
    served = sum(s.requests for s in recent)
    shed = sum(s.shed for s in recent)
    errors = sum(s.errors for s in recent)
    offered = served + shed
    alerts = []
    if offered >= rules.min_requests and shed / offered >= rules.shed_fraction:
        desired = recent[-1].desired
        alerts.append(Alert(
            "shedding", "critical" if shed / offered >= 0.5 else "warning",
            f"{shed / offered:.0%} of requests shed for {_minutes(rules.load_window_s)}: "
            f"the fleet is at capacity with {desired} instance(s); raise max (or the "
            f"instance size)"))
    if served >= rules.min_requests and errors / served >= rules.error_fraction:
        alerts.append(Alert(
            "errors", "critical",
            f"{errors / served:.0%} of requests failing for {_minutes(rules.load_window_s)}: "
            f"read the workers' logs (storage unavailable? out of memory?)"))
    return alerts


def launch_alerts(events: Sequence[Event], now: float, rules: Rules) -> list[Alert]:
    failed = [e for e in events if e.kind == "launch_failed"
              and now - rules.flap_window_s <= e.at <= now]
    if len(failed) < rules.launch_failures:
        return []
    why = failed[-1].message.split("; next launch")[0]
    return [Alert("launch_failures", "critical",
                  f"launches failing ({len(failed)} in {_minutes(rules.flap_window_s)}): "
                  f"{why}", tuple(failed))]


def decide_alerts(samples: Iterable[Any], events: Iterable[Event], now: float,
                  rules: Rules = Rules()) -> list[Alert]:
    """Every alert that holds at ``now`` (pure)."""
    samples, events = list(samples), list(events)
    return (flapping(events, now, rules) + launch_alerts(events, now, rules)
            + load_alerts(samples, now, rules))


def alerts_json(samples: Iterable[Any], events: Iterable[Event], now: float) -> list[dict]:
    return [a.to_json() | {"at": iso_time(now)} for a in decide_alerts(samples, events, now)]
