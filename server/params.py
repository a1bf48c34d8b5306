"""Typed, bounded parameter specs.

Each operation declares its parameters once; the same specs validate requests, feed
`GET /operations` and build the desktop app's controls.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from server.errors import bad_request

ParamType = Literal["int", "float", "bool", "choice"]

# Bounds a client could otherwise use to make one request very expensive.
MAX_STRING_IN_MESSAGE = 40
# Numbers sent as text (form fields, command lines): plain decimal notation only.
NUMBER = re.compile(r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?")


def _shorten(value: Any) -> str:
    text = repr(value)
    if len(text) > MAX_STRING_IN_MESSAGE:
        text = text[:MAX_STRING_IN_MESSAGE] + "…"
    return text


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType
    default: Any
    description: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    odd: bool = False  # kernel sizes: OpenCV requires odd values

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices else None,
            "description": self.description,
        }
        if self.odd:
            out["odd"] = True
        return out

    def allowed(self) -> str:
        if self.type == "choice":
            return "one of " + ", ".join(self.choices)
        if self.type == "bool":
            return "true or false"
        if self.type == "float":
            kind = "a number"
        else:
            kind = "an odd integer" if self.odd else "an integer"
        return f"{kind} from {_fmt(self.min)} to {_fmt(self.max)}"

    def parse(self, op_name: str, value: Any) -> Any:
        """Return the value in its canonical Python type, or raise a 400 ApiError."""

        def fail() -> None:
            raise bad_request(
                "invalid_parameter",
                f"{op_name}: parameter '{self.name}' got {_shorten(value)}; "
                f"allowed: {self.allowed()}",
            )

        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            fail()
        if self.type == "choice":
            if isinstance(value, str) and value in self.choices:
                return value
            fail()
        # Numbers: accept JSON numbers and numeric strings (form fields, CLI k=v).
        number: float
        if isinstance(value, bool):
            fail()
        if isinstance(value, int | float):
            try:
                number = float(value)
            except OverflowError:  # a JSON integer with hundreds of digits
                fail()
        elif isinstance(value, str) and NUMBER.fullmatch(value):
            number = float(value)
        else:
            fail()
        if not math.isfinite(number):
            fail()
        if self.min is not None and number < self.min:
            fail()
        if self.max is not None and number > self.max:
            fail()
        if self.type == "int":
            if number != int(number):
                fail()
            result = int(number)
            if self.odd and result % 2 == 0:
                fail()
            return result
        return number


def _fmt(value: float | None) -> str:
    if value is None:
        return "any"
    return str(int(value)) if float(value).is_integer() else str(value)


def int_param(name: str, default: int, lo: int, hi: int, description: str = "", *,
              odd: bool = False) -> ParamSpec:
    return ParamSpec(name, "int", default, description, lo, hi, odd=odd)


def float_param(name: str, default: float, lo: float, hi: float,
                description: str = "") -> ParamSpec:
    return ParamSpec(name, "float", default, description, lo, hi)


def bool_param(name: str, default: bool, description: str = "") -> ParamSpec:
    return ParamSpec(name, "bool", default, description)


def choice_param(name: str, default: str, choices: tuple[str, ...],
                 description: str = "") -> ParamSpec:
    assert default in choices
    return ParamSpec(name, "choice", default, description, choices=choices)


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
