"""The app's connection to a fleet: the API client and, when no endpoint is configured,
the embedded local fleet it starts. Every coroutine here runs on the worker's loop.

Endpoint precedence: ``--endpoint`` flag, then ``IMAGEFLEET_ENDPOINT``, then the
settings file; when none is set, a local fleet of ``fleet_size`` workers is started as a
child process (``gui.fleet_process.FleetProcess``: ``python -m fleet local``) and its
gateway is used. The embedded fleet's admin API needs the token the fleet made at start
(``admin_token``): the Fleet view's admin client sends that one. ``watch_fleet`` tells
the app when that process has died, so it can say so and start a new one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gui.client import ImageFleetClient, OperationSpec
from gui.settings import Settings, app_environment

log = logging.getLogger(__name__)

FLEET_START_TIMEOUT_S = 90.0
FLEET_WATCH_S = 0.5
# More deaths than this within the window and the app stops restarting the fleet by itself
# (a fleet that cannot run would otherwise be restarted forever); the user can still ask.
RESTARTS_ALLOWED = 3
RESTART_WINDOW_S = 120.0


class EmbeddedFleet(Protocol):
    """What the app needs from the embedded fleet (``gui.fleet_process.FleetProcess``)."""

    @property
    def endpoint(self) -> str: ...
    # Optional: ``admin_token``, the bearer token its POST /fleet/... routes need, and
    # ``exit_status()``, None while it runs (without it the fleet is not watched).
    def start(self, timeout: float = ...) -> Any: ...
    def stop(self) -> Any: ...


@dataclass(frozen=True)
class LocalFleetOptions:
    """How the embedded fleet is started (from the settings): its port (0: any free one;
    a taken one falls back to a free one), and where its results go and for how long."""

    port: int = 0
    results: str | None = None  # s3://bucket[/prefix], or None for the storage folder
    region: str | None = None
    max_storage_mb: float | None = None
    max_age_days: float | None = None


def local_fleet_options(environ: Mapping[str, str], settings: Settings) -> LocalFleetOptions:
    """The embedded fleet's options (env ``IMAGEFLEET_LOCAL_PORT`` > the setting)."""
    port = settings.local_port
    raw = app_environment(environ).get("local_port", "").strip()
    if raw.isdigit() and int(raw) <= 65535:
        port = int(raw)
    return LocalFleetOptions(port=port, results=settings.s3_location,
                             region=settings.s3_region or None,
                             max_storage_mb=settings.storage_max_mb or None,
                             max_age_days=settings.storage_max_age_days or None)


FleetFactory = Callable[[int, Path, LocalFleetOptions], EmbeddedFleet]


def default_fleet_factory(workers: int, storage_dir: Path,
                          options: LocalFleetOptions | None = None) -> EmbeddedFleet:
    from gui.fleet_process import FleetProcess, SharingOptions

    options = options or LocalFleetOptions()
    return FleetProcess(workers, storage_dir, port=options.port, sharing=SharingOptions(
        results=options.results, region=options.region,
        max_storage_mb=options.max_storage_mb, max_age_days=options.max_age_days))


@dataclass(frozen=True)
class FleetExit:
    """The embedded fleet died on its own (not stopped by the app)."""

    detail: str  # e.g. "killed by SIGKILL"


def restart_allowed(deaths: Sequence[float], now: float,
                    allowed: int = RESTARTS_ALLOWED, window_s: float = RESTART_WINDOW_S
                    ) -> bool:
    """Restart by itself unless the fleet died more than ``allowed`` times in the window."""
    return sum(1 for at in deaths if now - at <= window_s) <= allowed


def choose_endpoint(flag: str | None, environ: Mapping[str, str], settings: Settings) -> str:
    """The endpoint to use, or "" for the embedded fleet (flag > env > settings)."""
    for candidate in (flag, app_environment(environ).get("endpoint"), settings.endpoint):
        if candidate and candidate.strip():
            return candidate.strip().rstrip("/")
    return ""


def choose_admin_endpoint(flag: str | None, environ: Mapping[str, str],
                          settings: Settings) -> str:
    """Where ``/fleet`` is served, or "" when it is the endpoint itself."""
    for candidate in (flag, app_environment(environ).get("admin_endpoint"),
                      settings.admin_endpoint):
        if candidate and candidate.strip():
            return candidate.strip().rstrip("/")
    return ""


def choose_ca_file(environ: Mapping[str, str], settings: Settings) -> str:
    """The pinned certificate's file (env ``IMAGEFLEET_CA_FILE`` > settings), or ""."""
    return (app_environment(environ).get("ca_file") or settings.ca_file or "").strip()


def choose_token(environ: Mapping[str, str], settings: Settings) -> str | None:
    return app_environment(environ).get("token") or settings.token or None


def choose_admin_token(environ: Mapping[str, str], settings: Settings) -> str | None:
    """The fleet's admin token (env ``IMAGEFLEET_ADMIN_TOKEN`` > settings), or None."""
    return app_environment(environ).get("admin_token") or settings.admin_token or None


@dataclass(frozen=True)
class Connected:
    endpoint: str
    embedded: bool
    operations: list[OperationSpec]


class Connection:
    """Owns the client (and maybe the embedded fleet); see the module docstring."""

    def __init__(self, storage_dir: Path, fleet_factory: FleetFactory = default_fleet_factory,
                 ) -> None:
        self._storage_dir = storage_dir
        self._fleet_factory = fleet_factory
        self._fleet: EmbeddedFleet | None = None
        self._fleet_size = 0
        self.fleet_options = LocalFleetOptions()  # the app sets it from the settings
        self._fleet_started_with: LocalFleetOptions | None = None
        self._fleet_starting: asyncio.Future[Any] | None = None
        self._watch: asyncio.Future[FleetExit | None] | None = None
        self._watched: EmbeddedFleet | None = None
        self._client: ImageFleetClient | None = None
        self._admin: ImageFleetClient | None = None
        self.endpoint = ""

    @property
    def fleet_notice(self) -> str | None:
        """What the embedded fleet has to tell the user (its stable port was taken)."""
        return getattr(self._fleet, "port_notice", None)

    @property
    def client(self) -> ImageFleetClient:
        if self._client is None:
            raise RuntimeError("not connected yet")
        return self._client

    @property
    def admin_client(self) -> ImageFleetClient:
        """The client for ``/fleet``: a separate admin address when one is set."""
        return self._admin or self.client

    @property
    def connected(self) -> bool:
        return self._client is not None

    @property
    def fleet(self) -> EmbeddedFleet | None:
        return self._fleet

    async def connect(self, endpoint: str, token: str | None, concurrency: int,
                      fleet_size: int, admin_endpoint: str = "", ca_file: str = "",
                      admin_token: str | None = None) -> Connected:
        """(Re)connect. An empty endpoint means the embedded fleet, started if needed (and
        restarted when its size changed). Fetches the operations to prove the link works.
        ``ca_file``: the only certificate a remote endpoint is trusted with (pinning).
        ``admin_token``: sent to ``/fleet`` instead of the API token (an AWS fleet's
        manager, at the endpoint itself or at ``admin_endpoint``)."""
        await self._close_client()
        embedded = not endpoint
        if embedded:
            endpoint = await self._ensure_fleet(fleet_size)
        elif self._fleet is not None:
            await self._stop_fleet()
        pin = None if embedded or not ca_file else ca_file  # the local fleet is plain HTTP
        client = ImageFleetClient(endpoint, token, concurrency=concurrency, ca_file=pin)
        await client.__aenter__()
        self._client, self.endpoint = client, endpoint
        separate = bool(admin_endpoint) and admin_endpoint != endpoint
        if not embedded and (separate or (admin_token and admin_token != token)):
            # Same pinned certificate: through the load balancer /fleet is the same origin.
            admin = ImageFleetClient(admin_endpoint or endpoint, admin_token or token,
                                     concurrency=2, ca_file=pin)
            await admin.__aenter__()
            self._admin = admin
        elif embedded:
            # The fleet's own admin token, not the user's API token: scale and terminate
            # in the Fleet view keep working on the embedded fleet.
            admin_token = getattr(self._fleet, "admin_token", None) or token
            if admin_token != token:
                admin = ImageFleetClient(endpoint, admin_token, concurrency=2)
                await admin.__aenter__()
                self._admin = admin
        operations = await client.operations()
        return Connected(endpoint, embedded, operations)

    async def _ensure_fleet(self, size: int) -> str:
        if self._fleet is not None and (self._fleet_size != size
                                        or self._fleet_started_with != self.fleet_options):
            await self._stop_fleet()
        if self._fleet is None:
            self._storage_dir.mkdir(parents=True, exist_ok=True)
            self._fleet = self._fleet_factory(size, self._storage_dir, self.fleet_options)
            self._fleet_size = size
            self._fleet_started_with = self.fleet_options
            loop = asyncio.get_running_loop()
            # start() blocks until a worker is healthy; a thread keeps the loop free
            fleet = self._fleet
            self._fleet_starting = loop.run_in_executor(
                None, lambda: fleet.start(timeout=FLEET_START_TIMEOUT_S))
            try:
                await asyncio.shield(self._fleet_starting)
            except Exception:
                await self._stop_fleet()
                raise
        return self._fleet.endpoint

    async def watch_fleet(self) -> FleetExit | None:
        """Return when the running embedded fleet exits by itself (None when the app
        stops or replaces it first). Every caller for the same fleet shares one watch,
        so a reconnect to the same fleet does not start a second one."""
        fleet = self._fleet
        if fleet is None or getattr(fleet, "exit_status", None) is None:
            return None
        if self._watch is None or self._watched is not fleet:
            self._watch = asyncio.ensure_future(self._watch_exit(fleet))
            self._watched = fleet
        return await asyncio.shield(self._watch)

    async def _watch_exit(self, fleet: Any) -> FleetExit | None:
        # Polls a non-blocking wait on the child: no thread sits in a blocking wait.
        from gui.fleet_process import describe_exit

        exit_status = fleet.exit_status
        while self._fleet is fleet:
            returncode = exit_status()
            if returncode is not None:
                # The client stays until the next connect() replaces it: the UI may
                # still be using it until it hears of the exit.
                self._fleet = None
                await asyncio.to_thread(fleet.stop)  # closes its log and pipe
                return FleetExit(describe_exit(returncode))
            await asyncio.sleep(FLEET_WATCH_S)
        return None

    async def _stop_fleet(self) -> None:
        fleet, self._fleet = self._fleet, None
        starting, self._fleet_starting = self._fleet_starting, None
        if fleet is None:
            return
        if starting is not None and not starting.done():
            # closing while it still starts: cut the start short where the fleet can,
            # let start() finish, then stop what it began
            cancel_start = getattr(fleet, "cancel_start", None)
            if cancel_start is not None:
                cancel_start()
            await asyncio.wait([starting])
        await asyncio.to_thread(fleet.stop)

    async def _close_client(self) -> None:
        for client in (self._client, self._admin):
            if client is not None:
                await client.aclose()
        self._client = self._admin = None

    async def close(self) -> None:
        await self._close_client()
        await self._stop_fleet()
