"""A private X display: ``Xvfb :N`` on a free N, for the GUI tests and the GUI benchmark.

The display number is free when neither its lock file nor its socket exists. Another
process may still take the same N between the check and the start; Xvfb then exits at
once and the next number is tried. The display is ready when its socket accepts a
connection (polled with a deadline, never slept for).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 15.0
NUMBERS_TRIED = 60


class XvfbError(RuntimeError):
    """Xvfb is missing, did not become ready, or no display number was free."""


def xvfb_binary() -> str:
    binary = shutil.which("Xvfb")
    if binary is None:
        raise XvfbError("Xvfb is not installed (run scripts/install_system_deps.sh)")
    return binary


def display_free(number: int) -> bool:
    return not (Path(f"/tmp/.X{number}-lock").exists()
                or Path(f"/tmp/.X11-unix/X{number}").exists())


def display_ready(number: int) -> bool:
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
def running_xvfb(first_display: int) -> Iterator[str]:
    """Start ``Xvfb :N -screen 0 1280x800x24 -nolisten tcp`` on the first free N from
    ``first_display`` and yield ":N"; stopped (by its own pid) on exit."""
    binary = xvfb_binary()
    for number in range(first_display, first_display + NUMBERS_TRIED):
        if not display_free(number):
            continue
        proc = subprocess.Popen(
            [binary, f":{number}", "-screen", "0", "1280x800x24", "-nolisten", "tcp"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and not display_ready(number):
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(5)
                raise XvfbError(f"Xvfb :{number} did not become ready in "
                                f"{START_TIMEOUT_S:.0f}s")
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
    raise XvfbError("no free X display number for Xvfb")
