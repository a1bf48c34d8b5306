"""JSON answers parsed into the client's models; a missing or mistyped field raises
:class:`~gui.client.errors.InvalidResponse` naming it."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gui.client.errors import InvalidResponse
from gui.client.models import (
    FleetEvent,
    FleetInstance,
    FleetState,
    Health,
    Load,
    OperationSpec,
    ParamSpec,
    ProcessResult,
)


class _Fields:
    """Typed access to a JSON object; every problem raises InvalidResponse naming the field."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise InvalidResponse(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self.obj = obj
        self.where = where

    def _get(self, name: str, kinds: tuple[type, ...], kind_name: str, nullable: bool) -> Any:
        if name not in self.obj:
            raise InvalidResponse(f"{self.where}: missing field {name!r}")
        value = self.obj[name]
        if value is None and nullable:
            return None
        # bool is an int subclass; a JSON true is never a valid number here.
        if isinstance(value, bool) and bool not in kinds:
            value_ok = False
        else:
            value_ok = isinstance(value, kinds)
        if not value_ok:
            raise InvalidResponse(
                f"{self.where}: field {name!r} should be {kind_name}, got {value!r}"
            )
        return value

    def str(self, name: str) -> str:
        return self._get(name, (str,), "a string", False)

    def opt_str(self, name: str) -> str | None:
        return self._get(name, (str,), "a string or null", True)

    def int(self, name: str) -> int:
        return self._get(name, (int,), "an integer", False)

    def float(self, name: str) -> float:
        return float(self._get(name, (int, float), "a number", False))

    def opt_float(self, name: str) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return None
        return self.float(name)

    def bool(self, name: str) -> bool:
        return self._get(name, (bool,), "true or false", False)

    def list(self, name: str) -> list[Any]:
        return self._get(name, (list,), "a list", False)

    def dict(self, name: str) -> dict[str, Any]:
        return self._get(name, (dict,), "an object", False)

    def time(self, name: str, nullable: bool = False) -> datetime | None:
        value = self._get(name, (str, int, float), "an ISO 8601 time", nullable)
        if value is None:
            return None
        try:
            return _parse_time(value)
        except (ValueError, OverflowError, OSError) as exc:
            raise InvalidResponse(
                f"{self.where}: field {name!r} is not a valid time: {value!r}"
            ) from exc


def _parse_time(value: str | float) -> datetime:
    """ISO 8601 text or Unix seconds → aware datetime (naive text is taken as UTC)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_operations(body: Mapping[str, Any]) -> list[OperationSpec]:
    """Validate a ``GET /operations`` answer."""
    top = _Fields(body, "GET /operations")
    operations = []
    for i, raw in enumerate(top.list("operations")):
        op = _Fields(raw, f"GET /operations: operations[{i}]")
        name = op.str("name")
        params = []
        for j, raw_param in enumerate(op.list("params")):
            p = _Fields(raw_param, f"GET /operations: operation {name!r} params[{j}]")
            if "default" not in p.obj:
                raise InvalidResponse(f"{p.where}: missing field 'default'")
            choices = p.obj.get("choices")
            if choices is not None and not isinstance(choices, list):
                raise InvalidResponse(f"{p.where}: field 'choices' should be a list or null")
            params.append(
                ParamSpec(
                    name=p.str("name"),
                    type=p.str("type"),
                    default=p.obj["default"],
                    min=p.opt_float("min"),
                    max=p.opt_float("max"),
                    choices=tuple(choices) if choices is not None else None,
                    odd=p.obj.get("odd") is True,
                    description=str(p.obj.get("description") or ""),
                )
            )
        operations.append(
            OperationSpec(
                name=name,
                title=op.str("title"),
                description=op.str("description"),
                params=tuple(params),
                tileable=op.bool("tileable"),
            )
        )
    return operations


def parse_process_result(
    body: Mapping[str, Any], *, base_url: str, elapsed_s: float, attempts: int
) -> ProcessResult:
    """Validate a ``POST /process`` JSON answer. A relative ``url`` is joined to ``base_url``."""
    f = _Fields(body, "POST /process answer")
    timings = {}
    for name, value in f.dict("timings_ms").items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidResponse(f"{f.where}: timings_ms[{name!r}] should be a number")
        timings[str(name)] = float(value)
    url = f.str("url")
    if url.startswith("/"):
        url = base_url + url
    expires_at = f.time("expires_at")
    assert expires_at is not None  # not nullable
    return ProcessResult(
        key=f.str("key"),
        url=url,
        expires_at=expires_at,
        instance_id=f.str("instance_id"),
        width=f.int("width"),
        height=f.int("height"),
        format=f.str("format"),
        bytes=f.int("bytes"),
        cached=f.bool("cached"),
        tiles=f.int("tiles"),
        timings_ms=timings,
        elapsed_s=elapsed_s,
        attempts=attempts,
    )


def parse_health(body: Mapping[str, Any]) -> Health:
    """Validate a ``GET /health`` answer."""
    f = _Fields(body, "GET /health")
    load = None
    if f.obj.get("load") is not None:
        raw = _Fields(f.dict("load"), "GET /health: load")
        load = Load(
            busy=raw.int("busy"),
            slots=raw.int("slots"),
            queued=raw.int("queued"),
            queue_limit=raw.int("queue_limit"),
            completed=raw.int("completed"),
        )
    return Health(
        status=f.str("status"),
        instance_id=f.str("instance_id"),
        inflight=f.int("inflight"),
        processed=f.int("processed"),
        uptime_s=f.float("uptime_s"),
        version=f.str("version"),
        load=load,
    )


def parse_fleet(body: Mapping[str, Any]) -> FleetState:
    """Validate a ``GET /fleet`` answer."""
    f = _Fields(body, "GET /fleet")
    instances = []
    for i, raw in enumerate(f.list("instances")):
        inst = _Fields(raw, f"GET /fleet: instances[{i}]")
        instances.append(
            FleetInstance(
                id=inst.str("id"),
                state=inst.str("state"),
                health=inst.str("health"),
                address=inst.opt_str("address"),
                inflight=inst.int("inflight"),
                launched_at=inst.time("launched_at", nullable=True),
            )
        )
    events = []
    for i, raw in enumerate(f.list("events")):
        ev = _Fields(raw, f"GET /fleet: events[{i}]")
        events.append(
            FleetEvent(
                at=ev.time("at", nullable=True),
                kind=ev.str("kind"),
                instance_id=ev.opt_str("instance_id"),
                message=ev.str("message"),
            )
        )
    return FleetState(
        name=f.str("name"),
        provider=f.str("provider"),
        desired=f.int("desired"),
        min=f.int("min"),
        max=f.int("max"),
        instances=tuple(instances),
        events=tuple(events),
    )
