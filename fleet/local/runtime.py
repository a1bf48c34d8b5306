"""A whole fleet on one machine: gateway + local worker processes + manager.

Two ways to run the same pieces:

- :class:`LocalFleetRuntime` — async, in the caller's loop (``python -m fleet local``).
- :class:`LocalFleet` — owns an asyncio loop in a background thread
  (:class:`server.background.BackgroundLoop`), so a synchronous
  program (the desktop app) can embed a fleet: ``with LocalFleet(...) as fleet:``
  ``fleet.endpoint``.

The admin API's state-changing routes always need a token. Given one (``token``, which
the workers require too) it is used as before; otherwise the fleet makes one at start
(``admin_token``), writes it to ``<run folder>/admin-token`` (mode 0600, removed at
stop) and hands it to whoever embeds the fleet; the workers then need no token.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleet.local.gateway import Gateway, GatewayLimits, HealthCheckConfig
from fleet.local.options import DEFAULT_STORAGE
from fleet.local.provider import LocalProvider, WorkerCommand, server_command
from fleet.manager import FleetManager
from fleet.model import Event, FleetSpec, Health, spec_from_mapping
from fleet.storage_cleanup import Caps, sweep
from server.background import BackgroundLoop

log = logging.getLogger(__name__)
T = TypeVar("T")

ADMIN_TOKEN_FILE = "admin-token"
CLEANUP_INTERVAL_S = 300.0  # how often the storage caps are applied (and once at start)


def local_spec(workers: int = 2, min_workers: int | None = None,
               max_workers: int | None = None, **overrides: Any) -> FleetSpec:
    """The spec for ``--workers/--min/--max``: min and max default to ``workers``, so
    scaling is on only when a range is given."""
    low = workers if min_workers is None else min_workers
    high = workers if max_workers is None else max_workers
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not 0 <= low <= workers <= high:
        raise ValueError(f"need 0 <= min <= workers <= max, got min={low} workers={workers} "
                         f"max={high}")
    return spec_from_mapping({"name": "local", "desired": workers, "min": low, "max": high,
                              **overrides})


@dataclass
class LocalFleetRuntime:
    gateway: Gateway
    provider: LocalProvider
    manager: FleetManager
    stop_event: asyncio.Event
    admin_token: str
    # Where the generated admin token was written; None when the caller gave the token.
    admin_token_path: Path | None = None
    task: asyncio.Task | None = None
    sampler_task: asyncio.Task | None = None
    cleanup_task: asyncio.Task | None = None

    @classmethod
    async def start(cls, spec: FleetSpec, *, port: int = 0,
                    storage_dir: Path = DEFAULT_STORAGE, token: str | None = None,
                    command: WorkerCommand = server_command, run_dir: Path | None = None,
                    stop_timeout_s: float = 10.0,
                    limits: GatewayLimits | None = None,
                    sample_interval_s: float = 5.0,
                    storage_location: str | None = None,
                    caps: Caps | None = None,
                    cleanup_interval_s: float = CLEANUP_INTERVAL_S) -> LocalFleetRuntime:
        admin_token = token or secrets.token_urlsafe(32)
        gateway = Gateway(port=port, health=HealthCheckConfig.from_spec(spec),
                          token=admin_token, limits=limits)
        provider = LocalProvider(gateway, storage_dir=storage_dir, run_dir=run_dir,
                                 command=command, token=token, stop_timeout_s=stop_timeout_s,
                                 storage_location=storage_location)
        provider.start()  # takes the run folder's lock: the token file below is ours
        token_path = None
        if token is None:
            token_path = provider.run_dir / ADMIN_TOKEN_FILE
            try:
                write_secret(token_path, admin_token)
            except OSError:
                await provider.close()
                raise
        manager = FleetManager(provider, spec, sample_interval_s=sample_interval_s)
        for note in provider.notes:
            manager.record(Event(time.time(), "cleanup", None, note))
        gateway.admin = manager
        try:
            await gateway.start()
        except OSError:
            _remove_secret(token_path)
            await provider.close()
            await gateway.close()
            raise
        runtime = cls(gateway, provider, manager, asyncio.Event(), admin_token, token_path)
        runtime.task = asyncio.get_running_loop().create_task(
            manager.run(runtime.stop_event), name="fleet manager")
        runtime.sampler_task = asyncio.get_running_loop().create_task(
            manager.sampler(lambda: token).run(runtime.stop_event), name="fleet sampler")
        if caps is not None and (caps.max_bytes is not None or caps.max_age_s is not None):
            runtime.cleanup_task = asyncio.get_running_loop().create_task(
                runtime._clean_storage(provider.storage_dir, caps, cleanup_interval_s),
                name="storage cleanup")
        return runtime

    async def _clean_storage(self, root: Path, caps: Caps, interval_s: float) -> None:
        """Apply the storage caps now and every ``interval_s`` (in a thread: the scan is
        file-system I/O), until the fleet stops."""
        while not self.stop_event.is_set():
            try:
                removed, freed = await asyncio.to_thread(sweep, root, caps)
            except OSError as exc:
                self.manager.record(Event(time.time(), "cleanup", None,
                                          f"storage cleanup failed: {exc}"))
            else:
                if removed:
                    self.manager.record(Event(
                        time.time(), "cleanup", None,
                        f"storage cleanup removed {removed} object(s), {freed} bytes"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), interval_s)

    @property
    def endpoint(self) -> str:
        return self.gateway.url

    async def wait_healthy(self, timeout: float, count: int = 1) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Judged on the manager's view so that /fleet agrees the moment start() returns.
        while sum(1 for i in self.manager.instances
                  if i.health is Health.HEALTHY and i.live) < count:
            if loop.time() >= deadline:
                recent = "; ".join(f"{e.kind} {e.instance_id or ''}: {e.message}"
                                   for e in self.manager.events[-5:])
                raise TimeoutError(f"no healthy worker within {timeout:.0f}s "
                                   f"(recent events: {recent or 'none'})")
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        """Stop the manager first (so nothing relaunches), then the workers (they drain
        through the still-open gateway), then the gateway."""
        self.stop_event.set()
        if self.task is not None:
            await self.task
            self.task = None
        if self.sampler_task is not None:
            await self.sampler_task
            self.sampler_task = None
        if self.cleanup_task is not None:
            await self.cleanup_task
            self.cleanup_task = None
        # Before the run folder's lock goes (provider.close): a fleet started next may
        # write its own token there.
        _remove_secret(self.admin_token_path)
        await self.provider.close()
        await self.gateway.close()


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by its owner only (also if it existed)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, value.encode() + b"\n")
    finally:
        os.close(fd)


def _remove_secret(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class LocalFleet:
    """An embedded local fleet (gateway and workers) with its own event loop thread."""

    def __init__(self, workers: int = 2, min_workers: int | None = None,
                 max_workers: int | None = None, port: int = 0,
                 storage_dir: Path = DEFAULT_STORAGE, token: str | None = None, *,
                 spec_overrides: dict[str, Any] | None = None,
                 command: WorkerCommand = server_command, run_dir: Path | None = None,
                 stop_timeout_s: float = 10.0,
                 gateway_limits: GatewayLimits | None = None,
                 sample_interval_s: float = 5.0) -> None:
        self.spec = local_spec(workers, min_workers, max_workers, **(spec_overrides or {}))
        self._options = {"port": port, "storage_dir": Path(storage_dir), "token": token,
                         "command": command, "run_dir": run_dir,
                         "stop_timeout_s": stop_timeout_s, "limits": gateway_limits,
                         "sample_interval_s": sample_interval_s}
        self._background: BackgroundLoop | None = None
        self._runtime: LocalFleetRuntime | None = None

    # --- life-cycle ------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LocalFleet:
        """Return once the gateway listens and at least one worker is healthy."""
        if self._background is not None:
            raise RuntimeError("LocalFleet already started")
        self._background = BackgroundLoop("imagefleet-local")
        self._background.start()
        try:
            self._runtime = self._call(LocalFleetRuntime.start(self.spec, **self._options),
                                       timeout)
            atexit.register(self._emergency_stop)
            self._call(self._runtime.wait_healthy(timeout), timeout + 5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop everything started; no worker process or thread is left."""
        background = self._background
        if background is None:
            return
        try:
            if self._runtime is not None:
                self._call(self._runtime.aclose(), timeout)
        finally:
            atexit.unregister(self._emergency_stop)
            if self._runtime is not None:
                self._runtime.provider.stop_all_sync(timeout_s=1.0)
            self._runtime = None
            background.stop(timeout=timeout)
            self._background = None

    def __enter__(self) -> LocalFleet:
        # ``with LocalFleet(...).start(timeout) as fleet`` is fine too.
        return self if self._runtime is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- state -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self._require().endpoint

    @property
    def admin_token(self) -> str:
        """The token ``POST /fleet/...`` needs (``Authorization: Bearer``)."""
        return self._require().admin_token

    def snapshot(self) -> dict[str, Any]:
        runtime = self._require()
        return self._call(_in_loop(runtime.manager.snapshot), 10)

    def worker_pids(self) -> dict[str, int]:
        runtime = self._require()
        return self._call(_in_loop(runtime.provider.pids), 10)

    def healthy_count(self) -> int:
        runtime = self._require()
        return self._call(_in_loop(runtime.gateway.healthy_count), 10)

    @property
    def runtime(self) -> LocalFleetRuntime:
        return self._require()

    # --- helpers ---------------------------------------------------------------------------

    def _require(self) -> LocalFleetRuntime:
        if self._runtime is None:
            raise RuntimeError("LocalFleet is not running; call start() first")
        return self._runtime

    def _call(self, coroutine: Awaitable[T], timeout: float) -> T:
        if self._background is None:
            raise RuntimeError("LocalFleet is not running; call start() first")
        return self._background.call(coroutine, timeout)

    def _emergency_stop(self) -> None:
        # At interpreter exit without stop(): the loop thread still runs, so stop in
        # order (manager first), or it would relaunch the workers being killed.
        self.stop(timeout=10.0)


async def _in_loop(function: Callable[[], Any]) -> Any:
    return function()
