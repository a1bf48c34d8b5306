"""Polling with a deadline: how tests wait for something, instead of sleeping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline (an assertion failure in tests)."""


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05,
               what: str = "") -> T:
    """Call `predicate` until it returns something truthy and return that value.

    Exceptions raised by the predicate count as "not yet" (a server that is still
    starting refuses connections); the last one is chained to the timeout error so a
    failure says why it never became true.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - polled code may fail until it is ready
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            name = what or getattr(predicate, "__name__", "condition")
            raise WaitTimeout(f"timed out after {timeout}s waiting for {name}") from last_error
        time.sleep(interval)


class FakeClock:
    """A clock that moves only when told: ``clock()`` is the time, ``advance(s)`` moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
