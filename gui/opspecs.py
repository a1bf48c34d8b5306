"""Checking what a user asked for against the server's operation specs (``GET /operations``).

One set of rules for the command line's ``--op``/``--param``/``--steps`` and for recipes
(``gui.recipes``), so a parameter refused by one is refused by the other with the same
words. Pure functions over :class:`gui.client.OperationSpec`; no Tk, no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from gui.client import OperationSpec, ParamSpec

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class SpecError(Exception):
    """What was asked does not fit the operations' specs; the message names what is
    allowed (the valid operations, parameters, range or choices)."""


def describe_param(spec: ParamSpec) -> str:
    """``ksize (int 1..151, default 15)``: what a user may pass."""
    if spec.type == "choice":
        allowed = "one of " + "|".join(str(c) for c in spec.choices or ())
    elif spec.type == "bool":
        allowed = "bool"
    else:
        low = "" if spec.min is None else _number(spec.min)
        high = "" if spec.max is None else _number(spec.max)
        allowed = f"{spec.type} {low}..{high}" if low or high else spec.type
    return f"{spec.name} ({allowed}, default {spec.default!r})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def coerce_value(spec: ParamSpec, value: Any) -> Any:
    """Type ``value`` (text from the command line, or a JSON value) by ``spec``.

    Raises SpecError naming the parameter and what it allows.
    """
    what = f"parameter {spec.name}={value!r} is invalid: expected {describe_param(spec)}"
    if spec.type == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise SpecError(what)
    if spec.type == "choice":
        choices = spec.choices or ()
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise SpecError(what)
    if spec.type in ("int", "float"):
        number: float
        try:
            if isinstance(value, bool):
                raise ValueError
            if spec.type == "int":
                number = value if isinstance(value, int) else int(str(value).strip())
            else:
                number = float(value)
        except (TypeError, ValueError):
            raise SpecError(what) from None
        if math.isnan(number) or math.isinf(number):
            raise SpecError(what)
        if (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max
        ):
            raise SpecError(what)
        return number
    # A type this client does not know yet: pass JSON-looking text through typed.
    return guess_value(value) if isinstance(value, str) else value


def guess_value(text: str) -> Any:
    """Text → its JSON value if it parses (``5`` → 5, ``true`` → True), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_operation(operations: Sequence[OperationSpec], name: str) -> OperationSpec:
    for op in operations:
        if op.name == name:
            return op
    valid = ", ".join(op.name for op in operations)
    raise SpecError(f"unknown operation {name!r}; valid operations: {valid}")


def coerce_params(op: OperationSpec, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check names against ``op`` and type every value; SpecError lists the valid ones."""
    params: dict[str, Any] = {}
    for name, value in raw.items():
        spec = op.param(name)
        if spec is None:
            valid = "; ".join(describe_param(p) for p in op.params) or "none"
            raise SpecError(
                f"unknown parameter {name!r} for {op.name}; valid parameters: {valid}"
            )
        params[name] = coerce_value(spec, value)
    return params


def check_steps(operations: Sequence[OperationSpec],
                steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate each step's operation and parameters against the server's list."""
    checked = []
    for step in steps:
        op = find_operation(operations, str(step["op"]))
        params = coerce_params(op, {k: v for k, v in step.items() if k != "op"})
        checked.append({"op": op.name, **params})
    return checked
