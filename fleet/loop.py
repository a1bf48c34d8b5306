"""The managers' run loop, written once: one cycle (observe, decide, act) every interval
until a stop event, surviving a failing cycle.

The local fleet's manager and the AWS service (lease, then the same manager) both run
through :func:`run_every`; what a cycle does and how a failure is recorded is theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def run_every(cycle: Callable[[], Awaitable[object]], stop: asyncio.Event,
                    interval_s: float, *, what: str = "fleet cycle",
                    on_failure: Callable[[Exception], None] | None = None,
                    clock: Callable[[], float] = time.monotonic) -> None:
    """Await ``cycle()`` every ``interval_s`` seconds (start to start) until ``stop`` is
    set; returns as soon as ``stop`` is set between cycles.

    A cycle that raises is logged (``"<what> failed"``) and handed to ``on_failure``, and
    the loop goes on: one bad observation must not stop the fleet's healing. Cancellation
    is not caught."""
    while not stop.is_set():
        started = clock()
        try:
            await cycle()
        except Exception as exc:  # the loop must survive anything one cycle does
            log.exception("%s failed", what)
            if on_failure is not None:
                on_failure(exc)
        wait = max(0.0, interval_s - (clock() - started))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)
