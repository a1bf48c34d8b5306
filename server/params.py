"""Typed, bounded parameter specs.

Each operation declares its parameters once; the same specs validate requests, feed
`GET /operations` and build the desktop app's controls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from server.api import ParamError, ParamSpec, check_param
from server.errors import ApiError, bad_request

__all__ = ["ParamSet", "ParamSpec", "ParamType", "bool_param", "choice_param", "float_param",
           "int_param", "parse_param"]

ParamType = Literal["int", "float", "bool", "choice"]

# Bounds a client could otherwise use to make one request very expensive.
MAX_STRING_IN_MESSAGE = 40


def _shorten(value: Any) -> str:
    text = repr(value)
    if len(text) > MAX_STRING_IN_MESSAGE:
        text = text[:MAX_STRING_IN_MESSAGE] + "…"
    return text


def parse_param(op_name: str, spec: ParamSpec, value: Any) -> Any:
    """``value`` in its canonical Python type (:func:`server.api.check_param`), or a 400
    :class:`ApiError` naming the operation, the parameter and what it allows."""
    try:
        return check_param(spec, value)
    except ParamError:
        raise _invalid(op_name, spec, value) from None


def _invalid(op_name: str, spec: ParamSpec, value: Any) -> ApiError:
    return bad_request("invalid_parameter",
                       f"{op_name}: parameter '{spec.name}' got {_shorten(value)}; "
                       f"allowed: {spec.allowed()}")


def int_param(name: str, default: int, lo: int, hi: int, description: str = "", *,
              odd: bool = False) -> ParamSpec:
    return ParamSpec(name=name, type="int", default=default, description=description, min=lo,
                     max=hi, odd=odd)


def float_param(name: str, default: float, lo: float, hi: float,
                description: str = "") -> ParamSpec:
    return ParamSpec(name=name, type="float", default=default, description=description, min=lo,
                     max=hi)


def bool_param(name: str, default: bool, description: str = "") -> ParamSpec:
    return ParamSpec(name=name, type="bool", default=default, description=description)


def choice_param(name: str, default: str, choices: tuple[str, ...],
                 description: str = "") -> ParamSpec:
    assert default in choices
    return ParamSpec(name=name, type="choice", default=default, description=description,
                     choices=choices)


@dataclass(frozen=True)
class ParamSet:
    """Parsed, complete parameters (defaults filled in) — hashable and canonical."""

    values: tuple[tuple[str, Any], ...] = field(default_factory=tuple)

    def __getitem__(self, key: str) -> Any:
        for name, value in self.values:
            if name == key:
                return value
        raise KeyError(key)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)
