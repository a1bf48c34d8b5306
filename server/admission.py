"""Admission control: how much image work one server process takes on at once.

A request for work is *admitted* (it may then read its body, wait for a processing slot
and run) only while the admitted requests fit in ``slots + queue_limit``. Beyond that
it is refused at once, before its body is decoded, with 503 ``overloaded`` and a
``Retry-After``: a short queue absorbs bursts, a long one only adds latency and holds
threads that ``/health`` needs (Envoy's overload manager, imgproxy's
``IMGPROXY_MAX_CLIENTS`` do the same).

Each admitted request carries a :class:`Control`: its deadline and a way to ask whether
its client is still there. Waiting for a slot and the pipeline between steps check it,
so an abandoned or overdue request stops and gives its slot back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from server.errors import ApiError

# How long a waiting request sleeps between checks of its client and deadline while it
# waits for a slot (a free slot wakes it at once).
CHECK_INTERVAL_S = 0.1
RETRY_AFTER_S = 1


class Stopped(ApiError):
    """The request was stopped before it finished: its client left or its deadline
    passed. Raised between steps; the slot is released on the way out."""


def client_gone() -> Stopped:
    # 499 is nginx's "client closed request": nobody reads it, but the access log does.
    return Stopped(499, "client_disconnected", "the client closed the connection")


def deadline_passed(limit_s: float) -> Stopped:
    return Stopped(504, "deadline_exceeded",
                   f"the request did not finish within its deadline of {limit_s:g} s; "
                   "send a smaller image or a lighter pipeline")


@dataclass(frozen=True)
class Control:
    """A request's deadline (``time.monotonic()`` based) and client liveness check."""

    deadline: float
    limit_s: float
    disconnected: Callable[[], bool] = lambda: False

    @classmethod
    def unbounded(cls) -> Control:
        return cls(deadline=float("inf"), limit_s=float("inf"))

    def check(self) -> None:
        """Raise :class:`Stopped` if the request should not go on."""
        if time.monotonic() > self.deadline:
            raise deadline_passed(self.limit_s)
        if self.disconnected():
            raise client_gone()


@dataclass
class Admission:
    """Counts admitted requests and hands out processing slots (thread-safe)."""

    slots: int
    queue_limit: int
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _admitted: int = 0
    _busy: int = 0
    completed: int = 0
    shed: int = 0
    stopped: int = 0

    def __post_init__(self) -> None:
        if self.slots < 1 or self.queue_limit < 0:
            raise ValueError(f"need slots >= 1 and queue_limit >= 0, got {self.slots}, "
                             f"{self.queue_limit}")

    @property
    def capacity(self) -> int:
        return self.slots + self.queue_limit

    def try_admit(self) -> bool:
        with self._cond:
            if self._admitted >= self.capacity:
                self.shed += 1
                return False
            self._admitted += 1
            return True

    def admit_or_raise(self) -> None:
        if not self.try_admit():
            raise ApiError(
                503, "overloaded",
                f"this instance is at capacity ({self.slots} processing, {self.queue_limit} "
                f"queued); retry after {RETRY_AFTER_S} s", retry_after=RETRY_AFTER_S)

    def leave(self, outcome: str = "completed") -> None:
        """An admitted request is done; ``outcome`` is ``completed`` or ``stopped``."""
        with self._cond:
            self._admitted -= 1
            if outcome == "stopped":
                self.stopped += 1
            else:
                self.completed += 1
            self._cond.notify_all()

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Admit (or raise 503 ``overloaded``) for the duration of the block."""
        self.admit_or_raise()
        outcome = "completed"
        try:
            yield
        except Stopped:
            outcome = "stopped"
            raise
        finally:
            self.leave(outcome)

    @contextlib.contextmanager
    def slot(self, control: Control | None = None) -> Iterator[None]:
        """Hold one processing slot; while waiting, give up when ``control`` says so."""
        control = control or Control.unbounded()
        with self._cond:
            while self._busy >= self.slots:
                control.check()
                self._cond.wait(CHECK_INTERVAL_S)
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            busy, admitted = self._busy, self._admitted
            return {"busy": busy, "slots": self.slots, "queued": max(0, admitted - busy),
                    "queue_limit": self.queue_limit, "completed": self.completed,
                    "shed": self.shed, "stopped": self.stopped}


def client_disconnected(environ: dict[str, Any]) -> Callable[[], bool]:
    """A cheap "has the client gone?" check for a WSGI request, from what the server
    offers: waitress's own check (with ``channel_request_lookahead`` > 0), else a
    non-blocking peek at gunicorn's socket (an orderly close reads as b"")."""
    check = environ.get("waitress.client_disconnected")
    if callable(check):
        return check
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        return lambda: _peer_closed(sock)
    return lambda: False


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # nothing to read: still connected
    except OSError:
        return True  # reset, or closed on our side
