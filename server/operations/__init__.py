"""The registry of operations. Pure image code: no Flask, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from server.operations import edges, filters, geometry, morphology, tone
from server.operations.base import Image, Operation, OperationInputError, Params

__all__ = ["Image", "Operation", "OperationInputError", "Params", "Registry", "default_registry"]


class Registry(Mapping[str, Operation]):
    """An immutable name → Operation mapping that keeps declaration order."""

    def __init__(self, operations: Iterable[Operation]):
        ops: dict[str, Operation] = {}
        for op in operations:
            if op.name in ops:
                raise ValueError(f"duplicate operation name {op.name!r}")
            ops[op.name] = op
        self._ops = ops

    def __getitem__(self, name: str) -> Operation:
        return self._ops[name]

    def __iter__(self):
        return iter(self._ops)

    def __len__(self) -> int:
        return len(self._ops)


def default_registry() -> Registry:
    # Order is the order the desktop app lists them in: the original eight first.
    first = ("invert", "grayscale", "gaussian_blur", "canny", "threshold", "lines",
             "contours", "morphology")
    everything = [*tone.OPERATIONS, *filters.OPERATIONS, *edges.OPERATIONS,
                  *morphology.OPERATIONS, *geometry.OPERATIONS]
    by_name = {op.name: op for op in everything}
    ordered = [by_name[name] for name in first]
    ordered += [op for op in everything if op.name not in first]
    return Registry(ordered)
