"""`python -m server --workers N`: N server processes sharing one listening socket.

One Python process cannot keep several cores busy with request handling: parsing,
routing and storage hold the GIL, and waitress's I/O thread then waits behind the
request threads. So the supervisor binds the socket once and starts N ordinary
`python -m server` processes that inherit it; the kernel hands each new connection
to whichever worker accepts first, and an idle worker accepts first. The supervisor
itself serves nothing: it restarts a worker that dies, and on SIGTERM or SIGINT it
passes the signal on, so every worker drains as a single server would, and exits when
they all have.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

log = logging.getLogger("imagefleet.server")

LISTEN_BACKLOG = 1024
PR_SET_PDEATHSIG = 1
# What a worker receives when its supervisor dies. Not SIGTERM: when a multi-threaded
# parent is killed, Linux hands the children from each exiting thread to the next and
# sends the parent-death signal every time, so a worker may get it several times, and a
# second SIGTERM means "quit now, skip the drain". The worker treats this one as "drain",
# however often it comes.
PARENT_DEATH_SIGNAL = signal.SIGHUP
WORKER_ONLY_FLAGS = ("--workers", "--listen-fd", "--parent-pid", "--instance-id")
# A worker that dies sooner than this after starting is crash-looping: back off.
STABLE_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def worker_argv(argv: Sequence[str], fd: int, instance_id: str,
                parent_pid: int) -> list[str]:
    """The supervisor's own arguments for one worker: without --workers, and with the
    inherited socket, the supervisor's pid and its instance id (one server to the
    outside)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in WORKER_ONLY_FLAGS:
            skip = True
        elif not arg.startswith(tuple(flag + "=" for flag in WORKER_ONLY_FLAGS)):
            out.append(arg)
    return [*out, "--workers", "1", "--listen-fd", str(fd), "--parent-pid", str(parent_pid),
            "--instance-id", instance_id]


def restart_delay(lifetime: float, previous_delay: float) -> float:
    """Pure: how long to wait before restarting a worker that lived `lifetime` s."""
    if lifetime >= STABLE_SECONDS:
        return 0.0
    return min(MAX_BACKOFF_SECONDS, max(1.0, previous_delay * 2))


def die_with_parent(parent_pid: int | None) -> bool:
    """Called by a worker at start, after it handles PARENT_DEATH_SIGNAL: Linux sends
    that signal if the supervisor is killed outright, so no worker outlives it
    (elsewhere this asks for nothing). False if the supervisor is already gone: it died
    before the request was made, so no signal will come."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL)
    # Asked after the prctl: a death before it shows here, a death after it signals.
    return parent_pid is None or os.getppid() == parent_pid


@dataclass
class _Worker:
    slot: int
    process: subprocess.Popen
    started: float
    delay: float = 0.0


class Supervisor:
    def __init__(self, argv: Sequence[str], sock: socket.socket, workers: int,
                 instance_id: str):
        self._argv = worker_argv(argv, sock.fileno(), instance_id, os.getpid())
        self._sock = sock
        self._count = workers
        self._stopping = threading.Event()
        self._workers: dict[int, _Worker] = {}

    def _spawn(self, slot: int, delay: float = 0.0) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which
        # passes it on once (a worker seeing two signals would quit without draining).
        process = subprocess.Popen(
            [sys.executable, "-m", "server", *self._argv], pass_fds=(self._sock.fileno(),),
            process_group=0)
        self._workers[process.pid] = _Worker(slot, process, time.monotonic(), delay)
        log.info("worker %d started (pid %d)", slot, process.pid)
        if self._stopping.is_set():  # a signal came while it was being started
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def _on_signal(self, signum: int, _frame) -> None:
        self._stopping.set()
        # Each worker drains like a single server; a second signal makes them quit.
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # not Popen.send_signal: it may reap

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in range(self._count):
            self._spawn(slot)
        status = 0
        while self._workers:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            worker.process.returncode = code
            if self._stopping.is_set():
                log.info("worker %d exited (%s)", worker.slot, code)
                status = status or (0 if code == 0 else 1)
                continue
            lifetime = time.monotonic() - worker.started
            delay = restart_delay(lifetime, worker.delay)
            log.warning("worker %d (pid %d) exited with %s after %.1f s; restarting%s",
                        worker.slot, pid, code, lifetime,
                        f" in {delay:.0f} s" if delay else "")
            if delay and self._stopping.wait(delay):
                continue
            self._spawn(worker.slot, delay)
        self._sock.close()
        return status
