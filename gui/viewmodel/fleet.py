"""The Fleet view's rows, totals and event lines, from the fleet admin's state."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

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


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def as_datetime(value: Any) -> datetime | None:
    """A timestamp from the API (datetime, ISO 8601 text or epoch seconds), as aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


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


def fleet_rows(instances: Iterable[Any], now: datetime) -> list[FleetRow]:
    rows = []
    for inst in instances:
        launched = as_datetime(_field(inst, "launched_at"))
        rows.append(FleetRow(
            id=str(_field(inst, "id", "?")),
            state=str(_field(inst, "state", "?")),
            health=str(_field(inst, "health", "?")),
            address=str(_field(inst, "address", "") or "—"),
            inflight=int(_field(inst, "inflight", 0) or 0),
            uptime=format_duration((now - launched).total_seconds()) if launched else "—",
        ))
    return sorted(rows, key=lambda r: r.id)


def fleet_totals(state: Any) -> FleetTotals:
    instances = list(_field(state, "instances", []) or [])
    return FleetTotals(
        healthy=sum(1 for i in instances if _field(i, "health") == "healthy"),
        desired=int(_field(state, "desired", 0) or 0),
        minimum=int(_field(state, "min", _field(state, "minimum", 0)) or 0),
        maximum=int(_field(state, "max", _field(state, "maximum", 0)) or 0),
    )


def event_lines(events: Iterable[Any], limit: int = 200) -> list[str]:
    """Newest first, one line each: time, kind, instance, message."""
    lines = []
    for event in events:
        at = as_datetime(_field(event, "at"))
        when = at.astimezone().strftime("%H:%M:%S") if at else "--:--:--"
        instance = _field(event, "instance_id") or "-"
        lines.append((at or datetime.min.replace(tzinfo=UTC),
                      f"{when}  {_field(event, 'kind', ''):<18} {instance:<14} "
                      f"{_field(event, 'message', '')}"))
    lines.sort(key=lambda pair: pair[0], reverse=True)
    return [text for _, text in lines[:limit]]


def parse_desired(text: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"desired count must be a whole number from {minimum} to {maximum}, "
                         f"got {text!r}") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"desired count must be from {minimum} to {maximum}, got {value}")
    return value
