"""The Fleet view's rows, totals and event lines, from the fleet admin's state
(``GET /fleet`` as the client validated it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

from server.api import FleetEvent, FleetInstance, FleetState

HEALTH_COLOURS: Mapping[str, tuple[str, str]] = MappingProxyType({
    # (light mode, dark mode)
    "healthy": ("#1b7f3b", "#5fd38d"),
    "initial": ("#8a6d00", "#f2c94c"),
    "draining": ("#8a6d00", "#f2c94c"),
    "unhealthy": ("#b3261e", "#ff6b6b"),
    "unused": ("#5f6368", "#9aa0a6"),
})


@dataclass(frozen=True)
class FleetRow:
    id: str
    state: str
    health: str
    address: str
    inflight: int
    uptime: str


@dataclass(frozen=True)
class FleetTotals:
    healthy: int
    desired: int
    minimum: int
    maximum: int

    @property
    def text(self) -> str:
        return (f"{self.healthy} healthy / {self.desired} desired · "
                f"min {self.minimum} · max {self.maximum}")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def fleet_rows(instances: Iterable[FleetInstance], now: datetime) -> list[FleetRow]:
    rows = [FleetRow(
        id=inst.id,
        state=inst.state,
        health=inst.health,
        address=inst.address or "—",
        inflight=inst.inflight or 0,
        uptime=(format_duration((now - inst.launched_at).total_seconds())
                if inst.launched_at else "—"),
    ) for inst in instances]
    return sorted(rows, key=lambda r: r.id)


def fleet_totals(state: FleetState) -> FleetTotals:
    return FleetTotals(
        healthy=sum(1 for i in state.instances if i.health == "healthy"),
        desired=state.desired,
        minimum=state.min,
        maximum=state.max,
    )


def event_lines(events: Iterable[FleetEvent], limit: int = 200) -> list[str]:
    """Newest first, one line each: time, kind, instance, message."""
    lines = []
    for event in events:
        when = event.at.astimezone().strftime("%H:%M:%S") if event.at else "--:--:--"
        instance = event.instance_id or "-"
        lines.append((event.at or datetime.min.replace(tzinfo=UTC),
                      f"{when}  {event.kind:<18} {instance:<14} {event.message}"))
    lines.sort(key=lambda pair: pair[0], reverse=True)
    return [text for _, text in lines[:limit]]


def marked_lines(log: Sequence[str], wanted: Iterable[str]) -> list[int]:
    """The 1-based numbers of the log's lines that are among ``wanted`` (an alert's events,
    formatted as :func:`event_lines` does), each wanted line matched once."""
    left = Counter(wanted)
    found = []
    for number, line in enumerate(log, start=1):
        if left[line] > 0:
            left[line] -= 1
            found.append(number)
    return found


def parse_desired(text: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"desired count must be a whole number from {minimum} to {maximum}, "
                         f"got {text!r}") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"desired count must be from {minimum} to {maximum}, got {value}")
    return value
