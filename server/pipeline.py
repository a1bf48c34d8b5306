"""Parsing a request into a validated, canonical pipeline, and running it.

Pure: no Flask, no I/O. The canonical form (every parameter present, in a fixed
type) is what the result key is derived from, so equal requests share one key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.cost import CostEstimate, estimate
from server.errors import ApiError, bad_request
from server.operations import Image, Operation, OperationInputError, Registry
from server.params import ParamSet, parse_param

MAX_STEPS = 20
MAX_JSON_CHARS = 16_384


@dataclass(frozen=True)
class Step:
    operation: Operation
    params: ParamSet

    def to_json(self) -> dict[str, Any]:
        return {"op": self.operation.name, **self.params.as_dict()}


@dataclass(frozen=True)
class Pipeline:
    steps: tuple[Step, ...]

    @property
    def names(self) -> list[str]:
        return [s.operation.name for s in self.steps]

    def canonical(self) -> str:
        return json.dumps([s.to_json() for s in self.steps], sort_keys=True,
                          separators=(",", ":"))

    def output_size(self, width: int, height: int) -> list[tuple[int, int]]:
        """The size after each step, from the input size alone (raises 400 when a
        step does not fit the image, e.g. a crop outside it)."""
        sizes = []
        for step in self.steps:
            try:
                width, height = step.operation.size_after(width, height, step.params.as_dict())
            except OperationInputError as exc:
                raise bad_request("invalid_parameter", f"{step.operation.name}: {exc}") from exc
            sizes.append((width, height))
        return sizes

    def cost(self, width: int, height: int) -> CostEstimate:
        """Estimated CPU seconds of running this pipeline on a width x height image."""
        return estimate([(s.operation.name, s.params.as_dict()) for s in self.steps],
                        self.output_size(width, height), width, height)

    def run(self, image: Image, between_steps: Callable[[], None] | None = None) -> Image:
        """Run every step; ``between_steps`` is called before each one and may raise to
        stop (a request whose client left or whose deadline passed)."""
        for step in self.steps:
            if between_steps is not None:
                between_steps()
            try:
                image = step.operation.apply(image, step.params.as_dict())
            except OperationInputError as exc:
                raise bad_request("invalid_parameter", f"{step.operation.name}: {exc}") from exc
        return image


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _load_json(field: str, text: str) -> Any:
    if len(text) > MAX_JSON_CHARS:
        raise bad_request("invalid_json",
                          f"'{field}' is {len(text)} characters; at most {MAX_JSON_CHARS} allowed")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise bad_request("invalid_json", f"'{field}' is not valid JSON: {exc}") from exc


def parse_step(registry: Registry, name: Any, raw: Mapping[str, Any], where: str = "") -> Step:
    if not isinstance(name, str) or name not in registry:
        shown = repr(name)[:40]
        raise bad_request(
            "unknown_operation",
            f"{where}unknown operation {shown}; valid operations: {', '.join(registry)}",
        )
    op = registry[name]
    specs = {p.name: p for p in op.params}
    unknown = [key for key in raw if key not in specs]
    if unknown:
        valid = ", ".join(specs) if specs else "none"
        raise bad_request(
            "invalid_parameter",
            f"{where}{name}: unknown parameter {unknown[0][:40]!r}; valid parameters: {valid}",
        )
    values = tuple(
        (spec.name, parse_param(name, spec, raw[spec.name]) if spec.name in raw
         else spec.default)
        for spec in op.params
    )
    params = ParamSet(values)
    if op.check is not None:
        try:
            op.check(params.as_dict())
        except OperationInputError as exc:
            raise bad_request("invalid_parameter", f"{where}{name}: {exc}") from exc
    return Step(op, params)


def parse_pipeline(registry: Registry, operation: str | None, params: str | None,
                   steps: str | None) -> Pipeline:
    """Build a pipeline from the `operation`/`params` or `steps` form fields."""
    if steps is not None and operation is not None:
        raise bad_request("invalid_request", "send either 'operation' or 'steps', not both")
    if steps is not None:
        if params is not None:
            raise bad_request("invalid_request",
                              "'params' goes with 'operation'; in 'steps' each step "
                              "carries its own parameters")
        raw_steps = _load_json("steps", steps)
        if not isinstance(raw_steps, list) or not raw_steps:
            raise bad_request("invalid_steps",
                              "'steps' must be a non-empty JSON list of {\"op\": name, ...params}")
        if len(raw_steps) > MAX_STEPS:
            raise bad_request("invalid_steps",
                              f"'steps' has {len(raw_steps)} steps; at most {MAX_STEPS} allowed")
        parsed = []
        for index, raw in enumerate(raw_steps):
            if not isinstance(raw, dict) or "op" not in raw:
                raise bad_request("invalid_steps",
                                  f"step {index + 1} must be an object with an 'op' name")
            rest = {k: v for k, v in raw.items() if k != "op"}
            parsed.append(parse_step(registry, raw["op"], rest, where=f"step {index + 1}: "))
        return Pipeline(tuple(parsed))
    if operation is None or operation == "":
        raise bad_request("missing_field",
                          "send an 'operation' (with optional 'params') or 'steps'")
    raw_params: Any = {}
    if params not in (None, ""):
        raw_params = _load_json("params", params)
        if not isinstance(raw_params, dict):
            raise bad_request("invalid_params", "'params' must be a JSON object")
    return Pipeline((parse_step(registry, operation, raw_params),))


def check_output_pixels(pipeline: Pipeline, width: int, height: int, max_pixels: int) -> None:
    for (w, h), step in zip(pipeline.output_size(width, height), pipeline.steps, strict=True):
        if w * h > max_pixels:
            raise ApiError(
                413, "too_many_pixels",
                f"{step.operation.name} would make a {w}x{h} image ({w * h / 1e6:.1f} MP); "
                f"at most {max_pixels / 1e6:.1f} MP allowed",
            )
