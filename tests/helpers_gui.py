"""GUI test helpers: a real Xvfb display, pumping Tk until a condition holds, and
checks that nothing (threads, child processes) is left running."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

XVFB_START_TIMEOUT = 15.0
FIRST_DISPLAY = 90  # away from the :0/:1 a developer's own session uses


def _display_free(number: int) -> bool:
    return not (Path(f"/tmp/.X{number}-lock").exists()
                or Path(f"/tmp/.X11-unix/X{number}").exists())


def _display_ready(number: int) -> bool:
    path = f"/tmp/.X11-unix/X{number}"
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


@contextmanager
def xvfb_display() -> Iterator[str]:
    """Start ``Xvfb :N -screen 0 1280x800x24 -nolisten tcp`` on a free N and yield ":N".

    Without Xvfb the test fails in CI (``CI`` set) and is skipped elsewhere.
    Another process may grab the same N between the check and the start; then Xvfb
    exits at once and the next number is tried.
    """
    binary = shutil.which("Xvfb")
    if binary is None:
        message = "Xvfb is not installed (run scripts/install_system_deps.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    for number in range(FIRST_DISPLAY, FIRST_DISPLAY + 60):
        if not _display_free(number):
            continue
        proc = subprocess.Popen(
            [binary, f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + XVFB_START_TIMEOUT
        while proc.poll() is None and not _display_ready(number):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise AssertionError(f"Xvfb :{number} did not become ready in "
                                     f"{XVFB_START_TIMEOUT:.0f}s")
            time.sleep(0.02)
        if proc.poll() is not None:  # lost the race for this number: try the next
            continue
        try:
            yield f":{number}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return
    raise AssertionError("no free X display number for Xvfb")


def pump_until(app: Any, predicate: Callable[[], T], timeout: float,
               what: str = "condition") -> T:
    """Run Tk's event loop (``app.update()``) until ``predicate()`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        app.update()
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.01)  # let the worker thread run between Tk passes


def _state_and_parent(pid: int) -> tuple[str, int] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the fields after the ")" that ends the command name: state, ppid, ...
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return state, int(ppid)


def child_pids(pid: int | None = None) -> list[int]:
    """Live (non-zombie) direct children of ``pid`` (default: this process), from /proc."""
    parent = os.getpid() if pid is None else pid
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _state_and_parent(int(entry.name))
            if info is not None and info[1] == parent and info[0] != "Z":
                children.append(int(entry.name))
    return children


def threads_now() -> set[threading.Thread]:
    return set(threading.enumerate())


def threads_started_since(baseline: set[threading.Thread]) -> list[str]:
    """Names of live threads that were not running at ``baseline`` (threads that ended
    meanwhile, e.g. another fixture's, do not count)."""
    return sorted(t.name for t in threading.enumerate() if t not in baseline)
