"""The embedded local fleet as a child process: ``python -m fleet local``, the same command
a user can run, so nothing the window does (a long layout, a busy callback) can delay the
gateway's health checks or the manager's decisions, and a crash of one side does not take
the other down.

The child runs in its own session (a Ctrl-C in the app's terminal or a signal to the app's
process group does not reach it directly; the app stops it in order). It is told:

- ``--ready-file``: it writes ``{"endpoint", "pid", "admin_token_file"}`` there once a worker
  is healthy; :meth:`FleetProcess.start` waits for that file (or for the child's exit,
  reported with the tail of its log).
- ``--stop-on-stdin-eof``: its stdin is a pipe whose only writer is this process, so when
  the app ends in any way (even SIGKILL) the kernel closes the pipe and the fleet stops its
  workers and exits.

Stopping: close the pipe and SIGTERM the child's process group (both mean "drain and
stop"), wait up to a deadline, then SIGKILL it and kill the workers it recorded as running
(``fleet.local.provider.cleanup_leftovers``, which checks each pid is still that worker).
Blocking calls here (``start``, ``stop``) run on a worker thread, never on Tk's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_FILE = "local-fleet.json"
LOG_FILE = "local-fleet.log"
LOG_KEEP_BYTES = 5 * 1024 * 1024  # past this, the log starts afresh (the old one kept as .1)
STOP_TIMEOUT_S = 20.0  # the fleet drains its workers (each gets up to 10 s) before exiting
POLL_S = 0.05
# The user's API token is for a remote endpoint; the embedded fleet's workers stay open
# (loopback only) and its admin routes use the token the fleet makes.
DROPPED_ENV = ("IMAGEFLEET_TOKEN",)


class FleetStartError(RuntimeError):
    """The fleet process exited or did not become ready; the message says why."""


@dataclass(frozen=True)
class FleetReady:
    """What the fleet's readiness file says."""

    endpoint: str
    pid: int
    admin_token_file: str | None
    port_taken: int | None = None  # the stable port asked for was taken: links changed


@dataclass(frozen=True)
class SharingOptions:
    """Where the embedded fleet's results go and how long they stay: ``results`` is
    ``s3://bucket[/prefix]`` (credentials from the standard AWS chain, never from the
    settings) or None for the storage folder; the caps apply to the folder."""

    results: str | None = None
    region: str | None = None
    max_storage_mb: float | None = None
    max_age_days: float | None = None


def fleet_command(workers: int, storage_dir: Path, ready_file: Path, port: int = 0,
                  python: str = sys.executable,
                  sharing: SharingOptions | None = None) -> list[str]:
    """``python -m fleet local`` for an embedded fleet (port 0: a free one; a fixed port
    that is taken falls back to a free one)."""
    command = [python, "-m", "fleet", "local", "--workers", str(workers), "--port", str(port),
               "--storage", str(storage_dir), "--ready-file", str(ready_file),
               "--stop-on-stdin-eof", "--port-fallback"]
    sharing = sharing or SharingOptions()
    if sharing.results:
        command += ["--results", sharing.results]
    if sharing.max_storage_mb:
        command += ["--max-storage-mb", f"{sharing.max_storage_mb:g}"]
    if sharing.max_age_days:
        command += ["--max-age-days", f"{sharing.max_age_days:g}"]
    return command


def parse_ready(text: str) -> FleetReady:
    data = json.loads(text)
    endpoint = data.get("endpoint")
    if not isinstance(endpoint, str) or not endpoint.startswith("http"):
        raise ValueError(f"no endpoint in the fleet's readiness file: {text[:200]!r}")
    token_file = data.get("admin_token_file")
    taken = data.get("port_taken")
    return FleetReady(endpoint, int(data.get("pid") or 0),
                      token_file if isinstance(token_file, str) else None,
                      taken if isinstance(taken, int) and not isinstance(taken, bool) else None)


def log_tail(path: Path, lines: int = 6, max_bytes: int = 16384) -> str:
    """The last lines of the fleet's log, to say why it stopped."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            text = handle.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class FleetProcess:
    """A ``python -m fleet local`` child; the ``EmbeddedFleet`` the connection uses."""

    def __init__(self, workers: int, storage_dir: Path, *, port: int = 0,
                 stop_timeout_s: float = STOP_TIMEOUT_S,
                 environ: dict[str, str] | None = None,
                 sharing: SharingOptions | None = None) -> None:
        self.workers = workers
        self.sharing = sharing or SharingOptions()
        self.storage_dir = Path(storage_dir).resolve()
        self.port = port
        self.stop_timeout_s = stop_timeout_s
        self._environ = dict(os.environ if environ is None else environ)
        self.ready_file = self.storage_dir.parent / READY_FILE
        self.log_file = self.storage_dir.parent / LOG_FILE
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None
        self._ready: FleetReady | None = None
        self._admin_token: str | None = None
        self._cancel = threading.Event()

    # --- life-cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> FleetProcess:
        """Start the child and return once it says a worker is healthy."""
        if self._process is not None:
            raise RuntimeError("the fleet process was started already")
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file.unlink(missing_ok=True)  # a killed fleet's file must not be read
        env = {k: v for k, v in self._environ.items() if k not in DROPPED_ENV}
        env["PYTHONUNBUFFERED"] = "1"
        if self.sharing.region:
            env["AWS_DEFAULT_REGION"] = self.sharing.region
        self._rotate_log()
        self._log_handle = self.log_file.open("ab")
        try:
            self._process = subprocess.Popen(
                fleet_command(self.workers, self.storage_dir, self.ready_file, self.port,
                              sharing=self.sharing),
                cwd=PROJECT_ROOT, env=env, stdin=subprocess.PIPE, stdout=self._log_handle,
                stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self._close_log()
            raise FleetStartError(f"cannot start the local fleet: {exc}") from exc
        try:
            self._ready = self._wait_ready(timeout)
            self._admin_token = self._read_admin_token(self._ready)
        except BaseException:
            self.stop()
            raise
        log.info("local fleet pid %d ready on %s", self._process.pid, self._ready.endpoint)
        return self

    def cancel_start(self) -> None:
        """Make a ``start()`` in progress (on another thread) give up and stop the child:
        closing the app while its fleet starts need not wait for the fleet to be ready."""
        self._cancel.set()

    def _wait_ready(self, timeout: float) -> FleetReady:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._cancel.is_set():
                raise FleetStartError("the local fleet was stopped while starting")
            returncode = process.poll()
            if returncode is not None:
                tail = log_tail(self.log_file)
                raise FleetStartError(f"the local fleet stopped while starting "
                                      f"({describe_exit(returncode)})"
                                      + (f": {tail.splitlines()[-1]}" if tail else ""))
            with contextlib.suppress(FileNotFoundError):
                return parse_ready(self.ready_file.read_text())
            if time.monotonic() >= deadline:
                raise FleetStartError(f"the local fleet was not ready within {timeout:.0f} s "
                                      f"(its log: {self.log_file})")
            time.sleep(POLL_S)

    @staticmethod
    def _read_admin_token(ready: FleetReady) -> str | None:
        if ready.admin_token_file is None:
            return None
        try:
            return Path(ready.admin_token_file).read_text().strip() or None
        except OSError as exc:
            raise FleetStartError(f"cannot read the local fleet's admin token: {exc}") from exc

    def stop(self) -> None:
        """Stop the fleet and its workers; returns when they are gone (or killed)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            if process.poll() is None:
                self._terminate(process)
            else:  # it died by itself, maybe without stopping its workers
                self._kill_recorded_workers()
        finally:
            self._close_log()
            self.ready_file.unlink(missing_ok=True)

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(OSError):
            if process.stdin is not None:
                process.stdin.close()  # end of file: the fleet drains and exits
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)  # its own group: start_new_session
        try:
            process.wait(self.stop_timeout_s)
            return
        except subprocess.TimeoutExpired:
            log.error("the local fleet (pid %d) did not stop within %.0f s; killing it",
                      process.pid, self.stop_timeout_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
        self._kill_recorded_workers()

    def _kill_recorded_workers(self) -> None:
        """Workers run in sessions of their own, so a fleet killed before it stopped them
        leaves them running: kill the ones it recorded (each checked to be that worker
        still) now, rather than when the next fleet starts."""
        from fleet.local.provider import STATE_FILE, cleanup_leftovers

        for note in cleanup_leftovers(self.storage_dir / ".fleet" / STATE_FILE):
            log.warning("%s", note)

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.log_file.stat().st_size > LOG_KEEP_BYTES:
                os.replace(self.log_file, self.log_file.with_name(self.log_file.name + ".1"))

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    # --- state -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self._ready is None:
            raise RuntimeError("the local fleet is not running")
        return self._ready.endpoint

    @property
    def port_notice(self) -> str | None:
        """What to tell the user when the stable port was taken, else None."""
        if self._ready is None or self._ready.port_taken is None:
            return None
        return (f"Port {self._ready.port_taken} was in use, so the local fleet listens on "
                f"{self._ready.endpoint} this time: links made earlier on port "
                f"{self._ready.port_taken} will not open until it is free again "
                "(Settings: Local fleet size, port).")

    @property
    def admin_token(self) -> str | None:
        """The token ``POST /fleet/...`` needs, read from the fleet's 0600 file."""
        return self._admin_token

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def exit_status(self) -> int | None:
        """None while the fleet runs; its return code once it has exited."""
        if self._process is None:
            return None
        return self._process.poll()
