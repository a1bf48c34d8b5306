"""Local provider: worker processes (``python -m server``) on free loopback ports.

The fleet owns the link secret: it makes one the first time (``link-secret``, 0600, in the
run folder; kept across restarts, so links outlive them) and hands it to every worker in
the environment (never argv) with ``IMAGEFLEET_LINK_SECRET_REQUIRED=1``, so a worker never
makes a secret of its own and every worker's signed link is valid on every other. When the
fleet's own environment sets ``IMAGEFLEET_LINK_SECRET`` (one key, or ``new,old`` to rotate),
that is handed on instead. Each worker runs in its own session (process
group): a Ctrl-C at the terminal reaches only the fleet, which then stops its workers in
order (SIGTERM lets them drain, SIGKILL after ``stop_timeout_s``).

Run folder (``run_dir``): a lock held for the fleet's lifetime (one fleet per storage
folder) and ``workers.json`` listing the workers' pids and ids. If a fleet was killed
without cleaning up, the next one finds that file and kills the workers it lists — after
checking that each pid still runs a server with that instance id, so a recycled pid is
never hit. They are cleaned up rather than adopted because they point at the old
gateway's address.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fleet.aws.config import write_private_file
from fleet.local.gateway import Gateway
from fleet.local.options import without_fleet_options
from fleet.model import Instance, InstanceState
from fleet.providers.base import PermanentProviderError, TransientProviderError
from server.atomic import write_atomic

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "workers.json"
LOCK_FILE = "fleet.lock"
LINK_SECRET_FILE = "link-secret"
# The server's names (server/signing.py; not imported: it would load the whole server).
SECRET_ENV = "IMAGEFLEET_LINK_SECRET"
SECRET_REQUIRED_ENV = "IMAGEFLEET_LINK_SECRET_REQUIRED"
STORAGE_SECRET_FILE = ".link-secret"
MIN_SECRET_CHARS = 32


@dataclass(frozen=True)
class WorkerLaunch:
    """What a worker command is built from."""

    instance_id: str
    host: str
    port: int
    storage_dir: Path
    gateway_url: str
    token: str | None
    # Where results go when not the folder: ``s3://bucket[/prefix]`` (the standard AWS
    # credential chain; the folder still holds the run state).
    storage_location: str | None = None


def server_command(launch: WorkerLaunch) -> list[str]:
    """The default worker: this project's processing server."""
    # The token travels in the environment (IMAGEFLEET_TOKEN), never in argv where any
    # local user could read it with ps.
    return [sys.executable, "-m", "server", "--host", launch.host, "--port",
            str(launch.port), "--storage", launch.storage_location or str(launch.storage_dir),
            "--instance-id",
            launch.instance_id, "--peers", launch.gateway_url,
            # Links name the gateway, whatever Host header a client sent.
            "--public-url", launch.gateway_url]


WorkerCommand = Callable[[WorkerLaunch], Sequence[str]]


@dataclass
class _Worker:
    id: str
    port: int
    process: subprocess.Popen
    launched_at: float
    log_file: IO[bytes] | None = field(default=None, repr=False)
    stopping: bool = False
    exit_detail: str = ""
    kill_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalProvider:
    name = "local"

    def __init__(
        self,
        gateway: Gateway,
        *,
        storage_dir: Path,
        run_dir: Path | None = None,
        command: WorkerCommand = server_command,
        token: str | None = None,
        stop_timeout_s: float = 10.0,
        id_prefix: str = "w",
        extra_env: dict[str, str] | None = None,
        storage_location: str | None = None,
    ) -> None:
        self.gateway = gateway
        self.storage_location = storage_location
        self.storage_dir = Path(storage_dir).resolve()
        self.run_dir = Path(run_dir) if run_dir else self.storage_dir / ".fleet"
        self.command = command
        self.token = token
        self.stop_timeout_s = stop_timeout_s
        self.id_prefix = id_prefix
        self.extra_env = dict(extra_env or {})
        self._workers: dict[str, _Worker] = {}
        self._seq = 0
        self._lock_handle: IO[str] | None = None
        self._link_secret: str | None = None
        self._closed = False
        self.notes: list[str] = []  # what start() found, for the manager's event log

    # --- run folder ------------------------------------------------------------------------

    def start(self) -> None:
        """Take the run folder's lock and clean up what a killed fleet left behind."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        handle = open(self.run_dir / LOCK_FILE, "a+")  # noqa: SIM115 held until close()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise PermanentProviderError(
                f"another fleet is running with run folder {self.run_dir}; stop it or use "
                "another --storage folder") from None
        self._lock_handle = handle
        self.notes.extend(cleanup_leftovers(self.run_dir / STATE_FILE))
        self._link_secret = self._load_link_secret()

    def _load_link_secret(self) -> str:
        """The secret handed to every worker (see the module docstring)."""
        given = self.extra_env.get(SECRET_ENV) or os.environ.get(SECRET_ENV)
        if given:
            return given  # the workers check it, and refuse to start if it is unusable
        return fleet_link_secret(self.run_dir / LINK_SECRET_FILE,
                                 self.storage_dir / STORAGE_SECRET_FILE)

    def _save_state(self) -> None:
        state = {"fleet_pid": os.getpid(),
                 "workers": {w.id: {"pid": w.process.pid, "port": w.port}
                             for w in self._workers.values()}}
        write_atomic(self.run_dir / STATE_FILE, json.dumps(state, indent=1))

    # --- Provider protocol -----------------------------------------------------------------

    async def observe(self) -> tuple[Instance, ...]:
        instances = []
        for worker in list(self._workers.values()):
            code = worker.process.poll()
            if code is not None:
                self._close_log(worker)
                if worker.stopping:
                    self._forget(worker)
                    continue
                worker.exit_detail = describe_exit(code)
                state = InstanceState.STOPPED
            else:
                state = InstanceState.STOPPING if worker.stopping else InstanceState.RUNNING
            target = self.gateway.status(worker.id)
            # Load as the worker sees it too: a request whose client left is no longer
            # open at the gateway, but the worker may still be computing it.
            inflight = max(target.inflight, target.reported_inflight or 0)
            instances.append(Instance(
                id=worker.id, state=state, health=target.health, address=worker.address,
                launched_at=worker.launched_at, inflight=inflight,
                registered=target.registered, detail=worker.exit_detail,
                last_progress_at=target.last_progress_at))
        return tuple(instances)

    async def launch(self, token: str) -> str:
        if self._closed:
            raise PermanentProviderError("local provider is shut down; not launching")
        if self._lock_handle is None:
            self.start()
        self._seq += 1
        instance_id = f"{self.id_prefix}{self._seq}"
        port = free_port()
        launch = WorkerLaunch(instance_id=instance_id, host="127.0.0.1", port=port,
                              storage_dir=self.storage_dir, gateway_url=self.gateway.url,
                              token=self.token, storage_location=self.storage_location)
        command = list(self.command(launch))
        # The fleet's own IMAGEFLEET_* options stay with it: IMAGEFLEET_WORKERS (the
        # fleet's size) would otherwise be a worker's gunicorn process count.
        env = {**without_fleet_options(os.environ), **self.extra_env}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop("IMAGEFLEET_TOKEN", None)  # the fleet's token, or none: never a stray one
        if self.token:
            env["IMAGEFLEET_TOKEN"] = self.token
        assert self._link_secret is not None  # set by start()
        env[SECRET_ENV] = self._link_secret
        env[SECRET_REQUIRED_ENV] = "1"
        # One log per worker id, overwritten when a later fleet reuses the id: bounded.
        log_file = open(self.log_path(instance_id), "wb")  # noqa: SIM115 closed on exit
        try:
            process = subprocess.Popen(
                command, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log_file.close()
            raise TransientProviderError(f"cannot start worker {command[0]!r}: {exc}") from exc
        self._workers[instance_id] = _Worker(instance_id, port, process, time.time(), log_file)
        self._save_state()
        log.info("launched worker %s pid %d on port %d", instance_id, process.pid, port)
        return instance_id

    async def bootstrap(self, instance_id: str) -> None:
        self._get(instance_id)  # local workers need no set-up

    async def register(self, instance_id: str) -> None:
        worker = self._get(instance_id)
        self.gateway.register(instance_id, worker.address)

    async def deregister(self, instance_id: str) -> None:
        self._get(instance_id)
        self.gateway.deregister(instance_id)

    async def terminate(self, instance_id: str, graceful: bool = True) -> None:
        worker = self._workers.get(instance_id)
        self.gateway.remove(instance_id)
        if worker is None:
            return  # already gone: terminate is idempotent
        if worker.process.poll() is not None:
            self._close_log(worker)
            self._forget(worker)
            return
        worker.stopping = True
        if graceful:
            _signal_group(worker.process, signal.SIGTERM)
            # A stopped (SIGSTOPped) process would hold SIGTERM until continued.
            _signal_group(worker.process, signal.SIGCONT)
            if worker.kill_task is None:
                worker.kill_task = asyncio.get_running_loop().create_task(
                    self._kill_after(worker, self.stop_timeout_s))
        else:
            _signal_group(worker.process, signal.SIGKILL)

    async def close(self) -> None:
        """Stop every worker: SIGTERM, then SIGKILL what is left after the timeout."""
        await asyncio.get_running_loop().run_in_executor(None, self.stop_all_sync)

    # --- helpers ---------------------------------------------------------------------------

    def stop_all_sync(self, timeout_s: float | None = None) -> None:
        """Blocking stop of every worker; safe to call more than once (and from atexit)."""
        timeout = self.stop_timeout_s if timeout_s is None else timeout_s
        self._closed = True
        workers = list(self._workers.values())
        for worker in workers:
            if worker.kill_task is not None:
                worker.kill_task.cancel()
            if worker.process.poll() is None:
                _signal_group(worker.process, signal.SIGTERM)
                _signal_group(worker.process, signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for worker in workers:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                worker.process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0fs; killing", worker.id, timeout)
                _signal_group(worker.process, signal.SIGKILL)
                worker.process.wait()
            # The worker led its own process group; anything it spawned goes too.
            _signal_group(worker.process, signal.SIGKILL)
            self._close_log(worker)
        self._workers.clear()
        if self._lock_handle is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / STATE_FILE).unlink()
            self._lock_handle.close()
            self._lock_handle = None

    def pids(self) -> dict[str, int]:
        return {w.id: w.process.pid for w in self._workers.values()}

    def log_path(self, instance_id: str) -> Path:
        return self.run_dir / "logs" / f"{instance_id}.log"

    def _get(self, instance_id: str) -> _Worker:
        worker = self._workers.get(instance_id)
        if worker is None:
            raise PermanentProviderError(f"no local worker {instance_id!r}")
        return worker

    async def _kill_after(self, worker: _Worker, delay: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while worker.process.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if worker.process.poll() is None:
            log.warning("worker %s ignored SIGTERM for %.0fs; killing", worker.id, delay)
            _signal_group(worker.process, signal.SIGKILL)

    def _forget(self, worker: _Worker) -> None:
        if worker.kill_task is not None:
            worker.kill_task.cancel()
        _signal_group(worker.process, signal.SIGKILL)  # stray children of the group
        self._workers.pop(worker.id, None)
        self._save_state()

    @staticmethod
    def _close_log(worker: _Worker) -> None:
        if worker.log_file is not None:
            worker.log_file.close()
            worker.log_file = None


def fleet_link_secret(path: Path, legacy: Path | None = None) -> str:
    """The fleet's link secret, kept in `path` (0600) and made the first time. A fleet
    whose workers kept a secret in the storage folder (`legacy`, before the fleet owned
    it) adopts that one, so the links they handed out stay valid."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) >= MIN_SECRET_CHARS:
        return text
    if text:
        log.warning("link secret %s is too short; making a new one", path)
    adopted = ""
    if legacy is not None:
        with contextlib.suppress(OSError):
            adopted = legacy.read_text().strip()
    secret = adopted if len(adopted) >= MIN_SECRET_CHARS else secrets.token_hex(32)
    write_private_file(path, secret + "\n")
    log.info("%s the fleet's link secret %s", "adopted" if secret == adopted else "made", path)
    return secret


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    # The worker's pid is its process group id (start_new_session). Once the worker
    # has been reaped the group may be gone; that is fine.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def process_command_line(pid: int) -> list[str] | None:
    """The argv of a running process, or None if there is no such process."""
    proc = Path(f"/proc/{pid}/cmdline")
    if proc.parent.exists():
        try:
            return [p for p in proc.read_bytes().decode(errors="replace").split("\0") if p]
        except OSError:
            return None
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                             text=True, check=False, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.split() if out.returncode == 0 and out.stdout.strip() else None


def cleanup_leftovers(state_file: Path) -> list[str]:
    """Kill workers a dead fleet left behind; return what was done, for the event log."""
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        return []
    except (OSError, json.JSONDecodeError) as exc:
        return [f"ignored unreadable {state_file.name}: {exc}"]
    notes = []
    for instance_id, entry in (state.get("workers") or {}).items():
        pid = int(entry.get("pid", 0))
        argv = process_command_line(pid) if pid > 0 else None
        if not argv or "--instance-id" not in argv or instance_id not in argv:
            continue  # gone, or the pid now belongs to something else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        notes.append(f"killed worker {instance_id} (pid {pid}) left by an earlier fleet")
    state_file.unlink(missing_ok=True)
    return notes


__all__ = ["LocalProvider", "WorkerLaunch", "cleanup_leftovers", "fleet_link_secret",
           "free_port", "server_command"]
