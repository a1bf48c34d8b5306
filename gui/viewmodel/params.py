"""Operation parameters in the app: ``/operations`` parameter specs → the controls that
edit them, and a control's raw value → a typed parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from server.api import format_number, parse_bool

SLIDER_MAX_INT_STEPS = 1000  # wider integer ranges get a spinbox: a slider would be too coarse
FLOAT_SLIDER_POSITIONS = 200  # at least this many positions on a float slider
MAX_SLIDER_STEPS = 100_000



class SchemaError(ValueError):
    """The server described a parameter the app cannot build a control for."""


@dataclass(frozen=True)
class ControlSpec:
    """How one operation parameter is shown and parsed.

    ``kind`` is one of ``slider``, ``spinbox``, ``dropdown``, ``checkbox``.
    ``steps`` is the slider's number of steps (None for other kinds).
    """

    name: str
    label: str
    kind: str
    value_type: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    steps: int | None = None
    choices: tuple[str, ...] = ()
    odd: bool = False  # kernel sizes: only odd integers are valid
    description: str = ""

    @property
    def increment(self) -> float:
        """One step: 1 for ints (2 for odd-only), the slider's resolution for floats."""
        if self.value_type == "int":
            return 2 if self.odd else 1
        if self.steps and self.minimum is not None and self.maximum is not None:
            return (self.maximum - self.minimum) / self.steps
        return 0.1


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def control_for(param: Any) -> ControlSpec:
    """One control for a ParamSpec-like object (name, type, default, min, max, choices)."""
    name = param.name
    kind_of = param.type
    low, high = param.min, param.max
    # ``odd`` and ``description`` are optional in the schema (older clients drop them)
    odd = bool(getattr(param, "odd", False))
    description = str(getattr(param, "description", "") or "")
    if kind_of == "bool":
        return ControlSpec(name, _label(name), "checkbox", "bool", bool(param.default),
                           description=description)
    if kind_of == "choice":
        choices = tuple(str(c) for c in (param.choices or ()))
        if not choices:
            raise SchemaError(f"parameter {name!r} is a choice but the server gave no choices")
        default = str(param.default) if param.default is not None else choices[0]
        return ControlSpec(name, _label(name), "dropdown", "choice", default, choices=choices,
                           description=description)
    if kind_of not in ("int", "float"):
        raise SchemaError(
            f"parameter {name!r} has type {kind_of!r}; the app knows int, float, bool, choice"
        )
    bounded = low is not None and high is not None and high > low
    default = param.default if param.default is not None else (low if low is not None else 0)
    if kind_of == "int":
        default = int(default)
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
        if odd:
            # a slider over odd values only: its ends must be odd too
            low = None if low is None else (low if low % 2 else low + 1)
            high = None if high is None else (high if high % 2 else high - 1)
        if bounded and low is not None and high is not None and high > low and (
                high - low <= SLIDER_MAX_INT_STEPS):
            steps = (high - low) // 2 if odd else high - low
            return ControlSpec(name, _label(name), "slider", "int", default, low, high,
                               steps=steps, odd=odd, description=description)
        return ControlSpec(name, _label(name), "spinbox", "int", default, low, high, odd=odd,
                           description=description)
    default = float(default)
    if bounded:
        return ControlSpec(name, _label(name), "slider", "float", default, float(low),
                           float(high), steps=float_slider_steps(low, high, default),
                           description=description)
    return ControlSpec(name, _label(name), "spinbox", "float", default, low, high,
                       description=description)


def _on_grid(distance: float, step: float) -> bool:
    ratio = distance / step
    return abs(ratio - round(ratio)) < 1e-6


def float_slider_steps(low: float, high: float, default: float) -> int:
    """Steps for a float slider: a power-of-ten resolution giving at least
    FLOAT_SLIDER_POSITIONS positions, fine enough that the default and both ends sit
    exactly on a position (so an untouched slider sends the server's default)."""
    step = 10 ** math.floor(math.log10((high - low) / FLOAT_SLIDER_POSITIONS))
    while (high - low) / step <= MAX_SLIDER_STEPS:
        if _on_grid(default - low, step) and _on_grid(high - low, step):
            return round((high - low) / step)
        step /= 10
    return FLOAT_SLIDER_POSITIONS


def controls_for(operation: Any) -> list[ControlSpec]:
    return [control_for(p) for p in operation.params]


def _decimals(spec: ControlSpec) -> int:
    if spec.value_type != "float":
        return 0
    return max(0, -math.floor(math.log10(spec.increment))) if spec.increment < 1 else 1


def coerce_value(spec: ControlSpec, raw: Any) -> Any:
    """Turn a widget's raw value into the typed parameter, or raise ValueError saying
    what is allowed. Slider floats are rounded to the slider's resolution."""
    if spec.value_type == "bool":
        if isinstance(raw, str):
            return parse_bool(raw) is True  # the server's words for true
        return bool(raw)
    if spec.value_type == "choice":
        value = str(raw)
        if value not in spec.choices:
            raise ValueError(f"{spec.label} must be one of {', '.join(spec.choices)}")
        return value
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"{spec.label} must be a number{_range_text(spec)}, got {text!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{spec.label} must be a finite number{_range_text(spec)}")
    if spec.value_type == "int":
        kind = "an odd whole number" if spec.odd else "a whole number"
        if spec.kind == "spinbox" and (number != int(number) or (spec.odd and number % 2 == 0)):
            raise ValueError(f"{spec.label} must be {kind}{_range_text(spec)}")
        value: float = round(number)
        if spec.odd and value % 2 == 0:  # a slider position between two odd values
            value += 1 if spec.maximum is None or value + 1 <= spec.maximum else -1
    else:
        value = round(number, _decimals(spec) + 1) if spec.kind == "slider" else number
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        shown = format_value(spec, value)
        raise ValueError(f"{spec.label} must be{_range_text(spec)}, got {shown}")
    return int(value) if spec.value_type == "int" else float(value)


def _range_text(spec: ControlSpec) -> str:
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None:
        return f" from {format_number(low)} to {format_number(high)}"
    if low is not None:
        return f" of at least {format_number(low)}"
    if high is not None:
        return f" of at most {format_number(high)}"
    return ""


def format_value(spec: ControlSpec, value: Any) -> str:
    if spec.value_type == "int":
        return str(round(float(value)))
    if spec.value_type == "float":
        return f"{float(value):.{_decimals(spec) + 1}f}".rstrip("0").rstrip(".") or "0"
    return str(value)
