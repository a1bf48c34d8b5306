"""The background event loop thread shared by the desktop app and the embedded fleet."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from server.background import BackgroundLoop

ROOT = Path(__file__).resolve().parent.parent


def test_start_submit_stop_and_join() -> None:
    background = BackgroundLoop("test-loop")
    background.start()
    try:
        assert background.alive

        async def where() -> str:
            await asyncio.sleep(0)
            return threading.current_thread().name

        assert background.submit(where()).result(5) == "test-loop"
        assert background.call(where(), 5) == "test-loop"
    finally:
        background.stop(timeout=5)
    assert not background.alive
    assert background.loop.is_closed()
    assert "test-loop" not in {t.name for t in threading.enumerate()}


def test_an_exception_reaches_the_caller() -> None:
    background = BackgroundLoop()
    background.start()
    try:
        async def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            background.call(fail(), 5)
    finally:
        background.stop(timeout=5)


def test_stop_cancels_pending_work_then_runs_the_cleanup() -> None:
    background = BackgroundLoop()
    background.start()
    started = threading.Event()
    order: list[str] = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            order.append("cancelled")
            raise

    async def cleanup() -> None:
        order.append("cleanup")

    pending = background.submit(forever())
    assert started.wait(5)
    background.stop(cleanup, timeout=5)
    assert pending.cancelled()
    assert order == ["cancelled", "cleanup"]


def test_submit_after_stop_is_refused_and_the_coroutine_closed() -> None:
    background = BackgroundLoop()
    background.start()
    background.stop(timeout=5)

    async def late() -> None:
        raise AssertionError("must not run")

    coro = late()
    with pytest.raises(RuntimeError, match="stopping"):
        background.submit(coro)
    assert coro.cr_frame is None  # closed, so no "never awaited" warning


def test_stop_twice_or_without_start_is_harmless() -> None:
    never = BackgroundLoop()
    never.stop(timeout=1)
    assert never.loop.is_closed()
    background = BackgroundLoop()
    background.start()
    background.stop(timeout=5)
    background.stop(timeout=5)


def test_no_gui_toolkit_is_imported() -> None:
    # A fresh interpreter: this test process may have imported Tk for other tests.
    check = ("import sys, server.background, gui.worker; "
             "sys.exit('tkinter' in sys.modules)")
    subprocess.run([sys.executable, "-c", check], check=True, cwd=ROOT, timeout=60)
