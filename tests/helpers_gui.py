"""GUI test helpers: a real Xvfb display, pumping Tk until a condition holds, and
checks that nothing (threads, child processes) is left running."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

from scripts.xvfb import XvfbError, running_xvfb, xvfb_binary

T = TypeVar("T")

FIRST_DISPLAY = 90  # away from the :0/:1 a developer's own session uses


@contextmanager
def xvfb_display() -> Iterator[str]:
    """A private Xvfb display (``scripts/xvfb.py``) from :90 up; yields ":N".

    Without Xvfb the test fails in CI (``CI`` set) and is skipped elsewhere.
    """
    try:
        xvfb_binary()
    except XvfbError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with running_xvfb(FIRST_DISPLAY) as display:
        yield display


def app_environ(base: Path) -> dict[str, str]:
    """This process's environment without IMAGEFLEET_* settings, with the app's config,
    cache and data folders under ``base`` (so a test never reads or writes the user's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    env["XDG_CONFIG_HOME"] = str(base / "config")
    env["XDG_CACHE_HOME"] = str(base / "cache")
    env["XDG_DATA_HOME"] = str(base / "data")  # the batch journal
    env["IMAGEFLEET_LOCAL_PORT"] = "0"  # never the stable port: tests run side by side
    return env


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


def descendant_pids(pid: int | None = None) -> list[int]:
    """Live children of ``pid`` (default: this process), their children, and so on."""
    found: list[int] = []
    frontier = [os.getpid() if pid is None else pid]
    while frontier:
        children = [c for parent in frontier for c in child_pids(parent)]
        found.extend(children)
        frontier = children
    return found


def threads_now() -> set[threading.Thread]:
    return set(threading.enumerate())


def threads_started_since(baseline: set[threading.Thread]) -> list[str]:
    """Names of live threads that were not running at ``baseline`` (threads that ended
    meanwhile, e.g. another fixture's, do not count)."""
    return sorted(t.name for t in threading.enumerate() if t not in baseline)


def xdnd_drop(app: Any, target: Any, paths: list[Path]) -> None:
    """Drop ``paths`` on ``target`` the way an XDND drop from a file manager arrives.

    Without a second program to drag from, this takes the drag source's part inside the
    app: a hidden window owns the ``XdndSelection`` and serves the files as
    ``text/uri-list``. Then it calls tkdnd's Tcl handlers exactly as tkdnd's C code does
    on the XdndEnter, XdndPosition and XdndDrop client messages; the dropped data is
    fetched through the X selection as in a real drop.
    """
    from urllib.parse import quote

    uris = "".join(f"file://{quote(str(p))}\r\n" for p in paths)
    import tkinter

    source = tkinter.Toplevel(app)
    source.withdraw()
    app.tk.call("set", "::xdnd_test_uris", uris)
    app.tk.eval("proc ::xdnd_test_serve {offset count} "
                "{ string range $::xdnd_test_uris $offset [expr {$offset + $count - 1}] }")
    try:
        app.tk.call("selection", "handle", "-selection", "XdndSelection", "-type",
                    "text/uri-list", str(source), "::xdnd_test_serve")
        app.tk.call("selection", "own", "-selection", "XdndSelection", str(source))
        source_id = source.winfo_id()
        x = target.winfo_rootx() + target.winfo_width() // 2
        y = target.winfo_rooty() + target.winfo_height() // 2
        app.tk.call("tkdnd::xdnd::HandleXdndEnter", str(target), source_id,
                    ("text/uri-list",), 0)
        action = app.tk.call("tkdnd::xdnd::HandleXdndPosition", str(target), x, y, 0,
                             source_id)
        assert str(action) != "refuse_drop", "the window refused the drop"
        result = app.tk.call("tkdnd::xdnd::HandleXdndDrop", 0)
        assert str(result) == "copy", f"the drop was not taken: {result}"
    finally:
        app.tk.call("selection", "clear", "-selection", "XdndSelection")
        source.destroy()


# Run as its own process, so that nothing in the test's process (a blocked Tk thread that
# holds the GIL) can delay it: polls URL for SECONDS after its first answer, touches READY
# at that first answer, and prints the longest time between two answers as JSON.
_PROBE = """
import json, sys, time, urllib.request
from pathlib import Path
url, seconds, ready = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
gaps, last, end = [], None, None
while end is None or time.monotonic() < end:
    with urllib.request.urlopen(url, timeout=30) as answer:
        answer.read()
    now = time.monotonic()
    if last is None:
        ready.touch()
        end = now + seconds
    else:
        gaps.append(now - last)
    last = now
    time.sleep(0.05)
print(json.dumps({"longest_gap_s": max(gaps), "answers": len(gaps) + 1}))
"""


def start_http_probe(url: str, seconds: float, ready: Path) -> subprocess.Popen:
    """A separate process timing ``GET url`` answers (see ``_PROBE``); read its result
    with ``json.loads(probe.communicate(timeout=...)[0])``."""
    import sys

    return subprocess.Popen([sys.executable, "-c", _PROBE, url, str(seconds), str(ready)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)


class ScriptedDialogs:
    """Stands in for the app's file dialogs and questions (its ``Dialogs`` seam, the
    methods the buttons call) and records what was asked."""

    def __init__(self) -> None:
        self.open_files: list[str] = []
        self.directory: str | None = None
        self.save_as: str | None = None
        self.confirm_answer = True
        self.three_way_answer: bool | None = None  # Yes / No / Cancel (None)
        self.confirmations: list[str] = []  # every question asked, in order
        self.opened_urls: list[str] = []
        self.browser_works = True
        self.strings: list[str | None] = []  # answers to ask_string, in order
        self.recipe_file: str | None = None  # Import / Export recipe's file

    def ask_string(self, title: str, prompt: str, initial: str = "") -> str | None:
        self.confirmations.append(prompt)
        return self.strings.pop(0) if self.strings else None

    def ask_open_recipe(self) -> str | None:
        return self.recipe_file

    def ask_save_recipe(self, initial_name: str) -> str | None:
        return self.recipe_file

    def ask_open_files(self) -> list[str]:
        return self.open_files

    def ask_directory(self, title: str) -> str | None:
        return self.directory

    def ask_save_as(self, initial_name: str) -> str | None:
        return self.save_as

    def confirm(self, title: str, message: str) -> bool:
        self.confirmations.append(message)
        return self.confirm_answer

    def ask_yes_no_cancel(self, title: str, message: str) -> bool | None:
        self.confirmations.append(message)
        return self.three_way_answer

    def open_url(self, url: str) -> bool:
        self.opened_urls.append(url)
        return self.browser_works
