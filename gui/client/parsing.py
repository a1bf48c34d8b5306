"""JSON answers validated into the wire models (:mod:`server.api`); a missing or
mistyped field raises :class:`~gui.client.errors.InvalidResponse` naming it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gui.client.errors import InvalidResponse
from gui.client.models import ProcessResult
from server.api import FleetState, Operations, OperationSpec, ServerHealth, describe_error

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], body: Any, where: str) -> M:
    """``body`` as ``model``, or InvalidResponse saying ``where`` and which field is wrong."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidResponse(describe_error(exc, where)) from exc


def parse_operations(body: Mapping[str, Any]) -> list[OperationSpec]:
    """Validate a ``GET /operations`` answer."""
    return list(validate(Operations, body, "GET /operations").operations)


def parse_process_result(
    body: Mapping[str, Any], *, base_url: str, elapsed_s: float, attempts: int
) -> ProcessResult:
    """Validate a ``POST /process`` JSON answer. A relative ``url`` is joined to ``base_url``."""
    # This client's own facts win over any same-named field a newer server might send.
    merged = ({**body, "elapsed_s": elapsed_s, "attempts": attempts}
              if isinstance(body, Mapping) else body)
    result = validate(ProcessResult, merged, "POST /process answer")
    if result.url.startswith("/"):
        result = result.model_copy(update={"url": base_url + result.url})
    return result


def parse_health(body: Mapping[str, Any]) -> ServerHealth:
    """Validate a ``GET /health`` answer."""
    return validate(ServerHealth, body, "GET /health")


def parse_fleet(body: Mapping[str, Any]) -> FleetState:
    """Validate a ``GET /fleet`` answer."""
    return validate(FleetState, body, "GET /fleet")
