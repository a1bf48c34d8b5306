"""Checking what a user asked for against the server's operation specs (``GET /operations``).

One set of rules for the command line's ``--op``/``--param``/``--steps`` and for recipes
(``gui.recipes``), so a parameter refused by one is refused by the other with the same
words. Pure functions over :class:`gui.client.OperationSpec`; no Tk, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from gui.client import OperationSpec, ParamSpec
from server.api import KNOWN_TYPES, ParamError, check_param, format_number


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
        low = "" if spec.min is None else format_number(spec.min)
        high = "" if spec.max is None else format_number(spec.max)
        allowed = f"{spec.type} {low}..{high}" if low or high else spec.type
    return f"{spec.name} ({allowed}, default {spec.default!r})"


def coerce_value(spec: ParamSpec, value: Any) -> Any:
    """Type ``value`` (text from the command line, or a JSON value) by ``spec``, with the
    server's own rules (:func:`server.api.check_param`).

    Raises SpecError naming the parameter and what it allows.
    """
    if spec.type not in KNOWN_TYPES:
        # A type this client does not know yet: pass JSON-looking text through typed.
        return guess_value(value) if isinstance(value, str) else value
    try:
        return check_param(spec, value.strip() if isinstance(value, str) else value)
    except ParamError:
        raise SpecError(f"parameter {spec.name}={value!r} is invalid: expected "
                        f"{describe_param(spec)}") from None


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
