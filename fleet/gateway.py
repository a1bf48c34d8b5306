"""The local load balancer: plays an AWS ALB's part in front of local workers.

Behaviour, chosen to match an ALB so that what works locally works in the cloud:

- Routing: least outstanding requests over healthy targets (ties rotate).
- Active health checks: ``GET /health`` on each registered target every
  ``interval_s`` (default 1 s) with a ``timeout_s`` (default 1 s). A target becomes
  ``healthy`` after ``healthy_threshold`` consecutive successes (default 2) and
  ``unhealthy`` after ``unhealthy_threshold`` consecutive failures (default 2); it starts
  ``initial``. Success is a 200 answer. All four come from the fleet spec.
- Deregistration drains: a deregistered target gets no new requests, its in-flight ones
  complete; when none are left it is removed (``unused``).
- No retries: a request that fails upstream answers 502 (connection failed) or 504
  (timed out); retrying is the client's job. With no healthy target it answers 503
  ``{"error": {"code": "no_healthy_targets", ...}}`` (an ALB would fail open and try
  unhealthy targets; we prefer a clear, retryable answer).
- Bodies stream both ways in chunks; neither upload nor download is held in memory.
- ``X-Forwarded-For`` / ``-Proto`` / ``-Port`` are set; ``Host`` is passed unchanged so
  the workers' signed links point back at the gateway.

It also serves the fleet admin API (:mod:`fleet.admin`) under ``/fleet``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from fleet.admin import ADMIN_PREFIX, FleetAdmin, admin_routes, error_response
from fleet.model import FleetSpec, Health

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
# RFC 9110 §7.6.1 hop-by-hop fields, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "proxy-connection",
})


@dataclass(frozen=True)
class HealthCheckConfig:
    interval_s: float = 1.0
    timeout_s: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2
    path: str = "/health"

    @classmethod
    def from_spec(cls, spec: FleetSpec) -> HealthCheckConfig:
        return cls(interval_s=spec.health_check_interval_s,
                   timeout_s=spec.health_check_timeout_s,
                   healthy_threshold=spec.healthy_threshold,
                   unhealthy_threshold=spec.unhealthy_threshold)


@dataclass(frozen=True)
class TargetStatus:
    registered: bool
    health: Health
    inflight: int


@dataclass
class _Target:
    id: str
    address: str
    health: Health = Health.INITIAL
    inflight: int = 0
    successes: int = 0
    failures: int = 0
    draining: bool = False
    last_pick: int = 0
    checker: asyncio.Task | None = field(default=None, repr=False)


class Gateway:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health: HealthCheckConfig | None = None,
        admin: FleetAdmin | None = None,
        token: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 300.0,
        max_body_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.health = health or HealthCheckConfig()
        self.admin = admin
        self.token = token
        self._upstream_timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._max_body_bytes = max_body_bytes
        self._targets: dict[str, _Target] = {}
        self._picks = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._check_session: aiohttp.ClientSession | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("gateway not started")
        return f"http://{self.host}:{self.port}"

    # --- life-cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        # No connection pooling upstream: a pooled keep-alive connection to a worker that
        # was just killed would turn the next request into a 502 instead of a fresh try.
        self._session = aiohttp.ClientSession(
            timeout=self._upstream_timeout, auto_decompress=False,
            connector=aiohttp.TCPConnector(force_close=True), cookie_jar=aiohttp.DummyCookieJar())
        self._check_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True))
        app = web.Application(client_max_size=self._max_body_bytes)
        if self.admin is not None:
            app.add_routes(admin_routes(self.admin, self.token))
        app.router.add_route("*", "/{tail:.*}", self._proxy)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        try:
            await site.start()
        except OSError as exc:
            await self.close()
            raise OSError(exc.errno, f"cannot listen on {self.host}:{self.requested_port} "
                          f"({exc.strerror or exc}); choose another port") from exc
        sockets = site._server.sockets if site._server else []  # aiohttp exposes no getter
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port
        log.info("gateway listening on %s", self.url)

    async def close(self) -> None:
        for target in list(self._targets.values()):
            self._stop_checker(target)
        self._targets.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for session in (self._session, self._check_session):
            if session is not None:
                await session.close()
        self._session = self._check_session = None

    # --- targets ---------------------------------------------------------------------------

    def register(self, target_id: str, address: str) -> None:
        if target_id in self._targets:
            return
        target = _Target(target_id, address)
        self._targets[target_id] = target
        target.checker = asyncio.get_running_loop().create_task(
            self._check_loop(target), name=f"health-check {target_id}")

    def deregister(self, target_id: str) -> None:
        target = self._targets.get(target_id)
        if target is None or target.draining:
            return
        target.draining = True
        target.health = Health.DRAINING
        self._stop_checker(target)  # an ALB does not check draining targets either
        self._finish_drain(target)

    def remove(self, target_id: str) -> None:
        target = self._targets.pop(target_id, None)
        if target is not None:
            self._stop_checker(target)

    def status(self, target_id: str) -> TargetStatus:
        target = self._targets.get(target_id)
        if target is None:
            return TargetStatus(registered=False, health=Health.UNUSED, inflight=0)
        return TargetStatus(registered=True, health=target.health, inflight=target.inflight)

    def healthy_count(self) -> int:
        return sum(1 for t in self._targets.values()
                   if t.health is Health.HEALTHY and not t.draining)

    def _finish_drain(self, target: _Target) -> None:
        if target.draining and target.inflight == 0:
            self._targets.pop(target.id, None)

    @staticmethod
    def _stop_checker(target: _Target) -> None:
        if target.checker is not None:
            target.checker.cancel()
            target.checker = None

    # --- health checks ---------------------------------------------------------------------

    async def _check_loop(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ok = await self._check_once(target)
            self._record_check(target, ok)
            await asyncio.sleep(max(0.0, self.health.interval_s - (loop.time() - started)))

    async def _check_once(self, target: _Target) -> bool:
        assert self._check_session is not None
        url = f"http://{target.address}{self.health.path}"
        try:
            async with self._check_session.get(
                    url, timeout=aiohttp.ClientTimeout(total=self.health.timeout_s)) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    def _record_check(self, target: _Target, ok: bool) -> None:
        if target.draining:
            return
        if ok:
            target.successes += 1
            target.failures = 0
            if (target.health is not Health.HEALTHY
                    and target.successes >= self.health.healthy_threshold):
                log.info("target %s healthy", target.id)
                target.health = Health.HEALTHY
        else:
            target.failures += 1
            target.successes = 0
            if (target.health is not Health.UNHEALTHY
                    and target.failures >= self.health.unhealthy_threshold):
                log.info("target %s unhealthy", target.id)
                target.health = Health.UNHEALTHY

    # --- proxy -----------------------------------------------------------------------------

    def _pick(self) -> _Target | None:
        candidates = [t for t in self._targets.values()
                      if t.health is Health.HEALTHY and not t.draining]
        if not candidates:
            return None
        target = min(candidates, key=lambda t: (t.inflight, t.last_pick))
        target.last_pick = next(self._picks)
        return target

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        connection_named = {
            name.strip().lower()
            for value in request.headers.getall("Connection", [])
            for name in value.split(",")
        }
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in connection_named:
                continue
            headers[name] = value if name not in headers else f"{headers[name]}, {value}"
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Port"] = str(self.port)
        return headers

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if request.path == ADMIN_PREFIX or request.path.startswith(ADMIN_PREFIX + "/"):
            return error_response(404, "not_found", f"no admin route {request.method} "
                                  f"{request.path}")
        target = self._pick()
        if target is None:
            return error_response(503, "no_healthy_targets",
                                  "no healthy processing server is available; retry shortly")
        assert self._session is not None
        target.inflight += 1
        try:
            return await self._forward(request, target)
        finally:
            target.inflight -= 1
            self._finish_drain(target)

    async def _forward(self, request: web.Request, target: _Target) -> web.StreamResponse:
        assert self._session is not None
        url = f"http://{target.address}{request.raw_path}"
        data = request.content if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(
                    request.method, url, headers=self._upstream_headers(request), data=data,
                    allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except TimeoutError:
            if response is None or not response.prepared:
                return error_response(504, "gateway_timeout",
                                      f"instance {target.id} did not answer in time")
            raise
        except aiohttp.ClientError as exc:
            if response is None or not response.prepared:
                log.info("upstream %s failed: %s", target.id, exc)
                return error_response(502, "bad_gateway",
                                      f"instance {target.id} failed: {exc.__class__.__name__}")
            # Headers are already out: the only honest signal left is a cut connection,
            # so the client sees a short body (and retries) rather than a complete one.
            log.info("upstream %s cut its response short: %s", target.id, exc)
            if request.transport is not None:
                request.transport.close()
            return response
