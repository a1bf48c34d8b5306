"""The managers' shared run loop: a cycle every interval, a stop event, failures survived."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fleet.loop import run_every


async def _until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.005)


def test_stops_on_its_event_between_cycles() -> None:
    cycles: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()

        async def cycle() -> None:
            cycles.append(len(cycles))

        task = asyncio.create_task(run_every(cycle, stop, 0.01))
        await _until(lambda: len(cycles) >= 3)
        stop.set()
        await asyncio.wait_for(task, 5)
        assert task.done() and task.exception() is None

    asyncio.run(scenario())


def test_a_long_interval_does_not_delay_the_stop() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        ran = asyncio.Event()

        async def cycle() -> None:
            ran.set()

        task = asyncio.create_task(run_every(cycle, stop, 3600.0))
        await asyncio.wait_for(ran.wait(), 5)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_survives_a_failing_cycle_and_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    failures: list[Exception] = []
    calls: list[int] = []

    async def scenario() -> None:
        stop = asyncio.Event()

        async def cycle() -> None:
            calls.append(1)
            if len(calls) <= 2:
                raise RuntimeError(f"bug {len(calls)}")

        task = asyncio.create_task(run_every(cycle, stop, 0.001, what="test cycle",
                                             on_failure=failures.append))
        await _until(lambda: len(calls) >= 4)
        stop.set()
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.ERROR, logger="fleet.loop"):
        asyncio.run(scenario())
    assert [str(e) for e in failures] == ["bug 1", "bug 2"]
    assert [r.getMessage() for r in caplog.records] == ["test cycle failed"] * 2


def test_no_cycle_when_stopped_before_start() -> None:
    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()

        async def cycle() -> None:
            raise AssertionError("must not run")

        await asyncio.wait_for(run_every(cycle, stop, 0.01), 5)

    asyncio.run(scenario())
