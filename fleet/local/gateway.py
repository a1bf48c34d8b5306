"""The local load balancer: plays an AWS ALB's part in front of local workers.

Behaviour, chosen to match an ALB (and nginx where an ALB says nothing) so that what
works locally works in the cloud:

- Routing: least outstanding requests over healthy targets (ties rotate). Outstanding is
  the larger of what the gateway has open to a target and what the target itself last
  reported in its ``/health`` body (``inflight``, ``load.busy + load.queued``): a client
  that gives up cancels its request here, but the worker may still be computing it.
- Active health checks: ``GET /health`` on each registered target every
  ``interval_s`` (default 1 s) with a ``timeout_s`` (default 1 s). A target becomes
  ``healthy`` after ``healthy_threshold`` consecutive successes (default 2) and
  ``unhealthy`` after ``unhealthy_threshold`` consecutive failures (default 2); it starts
  ``initial``. Success is a 200 answer. All four come from the fleet spec. A check that
  fails because this process is out of file descriptors counts for nothing: the target
  is not to blame.
- Passive health checks (Envoy's outlier detection, nginx's ``max_fails``): a proxied
  request whose connection is refused or reset before any answer takes the target out
  of rotation at once (``unhealthy``) until active checks pass again.
- A refused connection is tried on the next target (nginx's default
  ``proxy_next_upstream error``; an ALB answers 502 here): the request never reached the
  dead worker, so sending it elsewhere cannot run it twice, and a worker killed a moment
  ago must not cost a client one of its retries. When no other healthy target is left the
  answer is 503 ``no_healthy_targets`` with ``Retry-After``. A connection that was reset
  or timed out after the request was sent answers 502 or 504: no retry.
- Progress: :meth:`Gateway.status` reports when a target last showed it makes progress
  (a passed check, a finished proxied answer, its completed-work counter growing), so
  the manager can tell a busy worker from a dead one.
- Deregistration drains: a deregistered target gets no new requests, its in-flight ones
  complete; when none are left it is removed (``unused``).
- Shedding at the front door: workers report in ``/health`` what they admit at once
  (slots + queue). When every routable target already has that many requests open from
  this gateway, a request with a body gets ``503 overloaded`` with ``Retry-After`` here,
  before it is buffered or forwarded: the worker would refuse it anyway, after a second
  transfer of the body it would then have to read.
- A lagging gateway fails no target: a health check that timed out while this process's
  own event loop ran late (it is saturated, or the machine is) counts for nothing.
- No other retries: a request that fails upstream after it was sent answers 502 or 504
  (timed out); retrying is the client's job. With no healthy target it answers 503
  ``{"error": {"code": "no_healthy_targets", ...}}`` (an ALB would fail open and try
  unhealthy targets; we prefer a clear, retryable answer).
- Request bodies are buffered whole before a target is chosen (as nginx does): in memory
  up to ``memory_body_bytes``, then in a temporary file; bounded by ``max_body_bytes``
  (413 at once from ``Content-Length``, the rest drained for a bounded time so the client
  reads the answer instead of a reset). A slow upload so holds a client connection but no
  upstream connection. Responses stream back in chunks.
- Connections: an idle keep-alive connection closes after ``idle_timeout_s`` (60 s, the
  ALB default), one that has not sent its request headers within ``header_timeout_s``
  gets 408, a body with no bytes for ``body_timeout_s`` gets 408. Open client
  connections are capped (default from ``RLIMIT_NOFILE``, keeping descriptors in reserve
  for upstream connections, health checks and worker launches): one over the cap gets a
  503 JSON answer and is closed. Out of descriptors, accepting pauses for a second
  (asyncio) and is logged at most once a second.
- Its own errors are JSON like the workers', without a version banner.
- ``X-Forwarded-For`` / ``-Proto`` / ``-Port`` are set; ``Host`` is passed unchanged so
  the workers' signed links point back at the gateway.

It also serves the fleet admin API (:mod:`fleet.admin`) under ``/fleet``.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import json
import logging
import resource
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import IO, Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from fleet.admin import (
    ADMIN_BODY_LIMIT,
    ADMIN_PREFIX,
    STATUS_CODES,
    DrainLimits,
    FleetAdmin,
    admin_fallback,
    admin_routes,
    error_response,
    json_errors_middleware,
    loopback_hosts,
    server_name_hook,
)
from fleet.model import FleetSpec, Health
from server.api import ErrorBody

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MiB = 1024 * 1024
SERVER_NAME = "imagefleet-gateway"  # instead of aiohttp's "Python/3.x aiohttp/3.x"
HEALTH_BODY_LIMIT = 64 * 1024
# The event loop counts as lagging when a 100 ms sleep wakes more than 250 ms late.
LAG_PROBE_S = 0.1
LAG_LIMIT_S = 0.25
# A client connection can hold three descriptors at once: its socket, the temporary file
# of a large body and the upstream connection that body is sent on.
DESCRIPTORS_PER_CONNECTION = 3
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# RFC 9110 §7.6.1 hop-by-hop fields, never forwarded; plus the framing and Expect fields,
# which the gateway sets itself for the buffered body.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "proxy-connection",
})
NOT_FORWARDED = HOP_BY_HOP | {"content-length", "expect"}


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
class GatewayLimits:
    """What a client may hold and for how long (module docstring)."""

    # The workers take 50 MiB of image; a multipart form adds a little around it.
    max_body_bytes: int = 51 * MiB
    memory_body_bytes: int = 1 * MiB  # beyond this a body goes to a temporary file
    max_buffered_bytes: int = 2048 * MiB  # all bodies being buffered at once
    spool_dir: str | None = None  # for those temporary files; None: the system's
    body_timeout_s: float = 30.0  # longest pause between body bytes
    idle_timeout_s: float = 60.0  # keep-alive connection with no request
    header_timeout_s: float = 10.0  # from a request's first byte to its last header
    drain: DrainLimits = field(default_factory=DrainLimits)  # after an early answer
    max_connections: int | None = None  # None: from RLIMIT_NOFILE, see connection_cap
    descriptor_reserve: int = 64  # kept for health checks, launches, logs, the loop
    refusal_linger_s: float = 1.0  # an over-cap connection is closed after at most this

    def __post_init__(self) -> None:
        problems = [f"{name} must be > 0, got {getattr(self, name)}"
                    for name in ("max_body_bytes", "memory_body_bytes", "max_buffered_bytes",
                                 "body_timeout_s", "idle_timeout_s", "header_timeout_s")
                    if not getattr(self, name) > 0]
        if self.max_connections is not None and self.max_connections < 1:
            problems.append(f"max_connections must be >= 1, got {self.max_connections}")
        if self.descriptor_reserve < 0 or self.refusal_linger_s < 0:
            problems.append("descriptor_reserve and refusal_linger_s must be >= 0")
        if problems:
            raise ValueError("invalid gateway limits: " + "; ".join(problems))


@dataclass(frozen=True)
class TargetStatus:
    """What the gateway knows of one target. ``inflight``: requests the gateway has open
    to it. ``reported_inflight``: what the target last said it is working on (None before
    its first readable ``/health``). ``last_progress_at``: ``time.time()`` of the last
    evidence that it makes progress (a passed health check, a proxied answer it finished,
    its completed-work counter growing), None if there is none yet."""

    registered: bool
    health: Health
    inflight: int
    last_progress_at: float | None = None
    reported_inflight: int | None = None
    capacity: int | None = None  # what it admits at once, from its /health (None: unknown)


# --- pure decisions ----------------------------------------------------------------------


@dataclass(frozen=True)
class HealthReport:
    """What a worker's ``/health`` body says about its load."""

    inflight: int | None = None  # requests it is working on or has queued
    completed: int | None = None  # a counter of finished work (never decreases)
    capacity: int | None = None  # requests it admits at once: slots + queue_limit


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def parse_health_report(raw: bytes) -> HealthReport:
    """Read ``inflight``, ``processed`` and ``load: {busy, queued, completed}`` from a
    ``/health`` body; anything missing or malformed is None."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return HealthReport()
    if not isinstance(body, dict):
        return HealthReport()
    load = body.get("load") if isinstance(body.get("load"), dict) else {}
    busy, queued = _count(load.get("busy")), _count(load.get("queued"))
    candidates = [n for n in (_count(body.get("inflight")),
                              None if busy is None else busy + (queued or 0)) if n is not None]
    completed = _count(load.get("completed"))
    slots, queue_limit = _count(load.get("slots")), _count(load.get("queue_limit"))
    return HealthReport(inflight=max(candidates) if candidates else None,
                        completed=completed if completed is not None
                        else _count(body.get("processed")),
                        capacity=slots + (queue_limit or 0) if slots else None)


def all_full(open_requests: Sequence[tuple[int, int | None]]) -> bool:
    """Shed at the front door? ``open_requests``: for each routable target, the requests
    this gateway has open to it and the work it admits at once (None: unknown). True
    only when every target is known to be at capacity: the worker would refuse the
    request anyway, after reading its whole body, so refusing here costs neither the
    worker's time nor a second transfer. Unknown capacity never sheds."""
    return bool(open_requests) and all(
        capacity is not None and inflight >= capacity for inflight, capacity in open_requests)


class UpstreamFailure(enum.Enum):
    LOCAL_RESOURCES = "local_resources"  # this process is out of descriptors or memory
    TARGET_DOWN = "target_down"  # refused, or reset before any answer
    OTHER = "other"


def _os_errors(exc: BaseException) -> list[OSError]:
    found, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            found.append(current)
        inner = getattr(current, "os_error", None)
        if isinstance(inner, OSError) and id(inner) not in seen:
            found.append(inner)
        current = current.__cause__ or current.__context__
    return found


def classify_upstream_error(exc: BaseException) -> UpstreamFailure:
    """Whose fault a failed upstream request (or health check) is."""
    os_errors = _os_errors(exc)
    if any(e.errno in RESOURCE_ERRNOS for e in os_errors):
        return UpstreamFailure.LOCAL_RESOURCES
    if isinstance(exc, TimeoutError):
        return UpstreamFailure.OTHER  # slow is not dead: active checks judge that
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
        return UpstreamFailure.TARGET_DOWN
    if any(e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE) for e in os_errors):
        return UpstreamFailure.TARGET_DOWN
    return UpstreamFailure.OTHER


def connection_cap(soft_limit: int, reserve: int) -> int:
    """Client connections allowed with ``soft_limit`` descriptors, ``reserve`` of them
    kept for everything else."""
    return max(1, (soft_limit - reserve) // DESCRIPTORS_PER_CONNECTION)


def descriptor_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_descriptor_limit(ceiling: int = 65536) -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` towards its hard limit (at most
    ``ceiling``); returns the soft limit now in force. For entry points, not libraries:
    it changes the whole process (and the workers it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.info("could not raise the descriptor limit to %d: %s", wanted, exc)
    return descriptor_limit()


def raw_json_response(status: int, code: str, message: str,
                      headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer, for connections that never get
    as far as aiohttp's request handling."""
    body = ErrorBody.of(code, message).model_dump_json().encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close", f"Server: {SERVER_NAME}",
             *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class RateLimitedLog:
    """At most one line per ``key`` per ``interval_s``; the next says how many were
    dropped. Abuse must not turn into megabytes of log."""

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._interval_s:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            message += " (%d more like this not logged)"
            args = (*args, dropped)
        self._logger.log(level, message, *args)


# --- targets -------------------------------------------------------------------------------


class CheckOutcome(enum.Enum):
    PASSED = "passed"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"  # this process could not even try (no descriptors)


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
    reported_inflight: int | None = None
    completed: int | None = None
    capacity: int | None = None
    last_progress_at: float | None = None
    checker: asyncio.Task | None = field(default=None, repr=False)

    @property
    def load(self) -> int:
        return max(self.inflight, self.reported_inflight or 0)


# --- client connections --------------------------------------------------------------------


@dataclass
class _ConnectionBook:
    """Counts open client connections against the cap, and refused ones still lingering
    (bounded, so refusing cannot itself use up the reserve)."""

    cap: int
    linger_cap: int
    open: int = 0
    lingering: int = 0


class _ClientConnection(RequestHandler):
    """aiohttp's HTTP/1 connection handler plus what it lacks: a header timeout, JSON for
    requests it rejects itself, and counting against the connection cap. aiohttp's own
    ``keepalive_timeout`` (armed from the moment of connecting) is the idle timeout."""

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop,
                 book: _ConnectionBook, header_timeout_s: float, rate_log: RateLimitedLog,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._event_loop = loop
        self._book = book
        self._header_timeout_s = header_timeout_s
        self._rate_log = rate_log
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False
        self._counted = True

    # The gateway's middleware calls these around every request it handles.
    def request_started(self) -> None:
        self._in_request = True
        self._cancel_head_timer()

    def request_finished(self) -> None:
        self._in_request = False

    def data_received(self, data: bytes) -> None:
        # The first byte of a request starts its header clock; request_started stops it.
        if data and not self._in_request and self._head_timer is None:
            self._head_timer = self._event_loop.call_later(self._header_timeout_s,
                                                           self._head_timed_out)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._counted:
            self._counted = False
            self._book.open -= 1
        super().connection_lost(exc)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_request or self.transport is None:
            return
        self._rate_log.log(logging.INFO, "header-timeout",
                           "closed a connection that sent no complete request headers "
                           "within %.0fs", self._header_timeout_s)
        self.transport.write(raw_json_response(
            408, "request_timeout",
            f"no complete request headers within {self._header_timeout_s:g}s"))
        self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """What aiohttp answers itself (malformed requests): JSON, one log line."""
        if status >= 500:
            self._rate_log.log(logging.WARNING, f"error-{status}",
                               "error %d handling a request: %r", status, exc)
        else:
            self._rate_log.log(logging.INFO, f"error-{status}", "rejected a malformed "
                               "request (%d): %s", status, message or exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if status >= 500:
            text = "unexpected error; the gateway logged the details"
        else:
            text = f"malformed request: {message or HTTPStatus(status).phrase}"
        response = error_response(status, STATUS_CODES.get(status, "error"), text)
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response


class _Refusal(asyncio.Protocol):
    """A connection over the cap: answer 503 at once, then close — after a short
    lingering read (if few are lingering already) so the client reads the answer."""

    def __init__(self, book: _ConnectionBook, linger_s: float) -> None:
        self._book = book
        self._linger_s = linger_s
        self._lingering = False
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(raw_json_response(
            503, "too_many_connections",
            f"the gateway has {self._book.cap} connections open, its limit; retry shortly",
            (("Retry-After", "1"),)))
        if self._linger_s > 0 and self._book.lingering < self._book.linger_cap \
                and transport.can_write_eof():
            self._lingering = True
            self._book.lingering += 1
            transport.write_eof()
            self._timer = asyncio.get_running_loop().call_later(self._linger_s,
                                                                transport.close)
        else:
            transport.close()

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > CHUNK and self._transport is not None:
            self._transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._lingering:
            self._lingering = False
            self._book.lingering -= 1


# --- buffered request bodies ---------------------------------------------------------------


@dataclass
class _Budget:
    """Bytes of request bodies being buffered, over all requests at once."""

    limit: int
    used: int = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True


class _Body:
    """A request body read whole: in memory when small, else in a temporary file."""

    def __init__(self, spool: IO[bytes] | None, budget: _Budget, in_memory: int) -> None:
        self.spool = spool
        self.size = 0
        self._budget = budget
        self._in_memory = in_memory

    @property
    def exists(self) -> bool:
        return self.spool is not None

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.spool is None:
            return None
        self.spool.seek(0)
        if self.size <= self._in_memory:
            return self.spool.read()
        return self._chunks(self.spool)

    @staticmethod
    async def _chunks(spool: IO[bytes]) -> AsyncIterator[bytes]:
        # Reads come from the page cache the writes just filled: quick enough for the loop.
        while chunk := spool.read(CHUNK):
            yield chunk

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        self._budget.used -= self.size
        self.size = 0


class _BodyRefused(Exception):
    def __init__(self, response: web.Response, drain: bool = True) -> None:
        super().__init__(response.status)
        self.response = response
        self.drain = drain  # False: the client stopped sending; nothing to wait for


# --- the gateway ---------------------------------------------------------------------------


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
        limits: GatewayLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.health = health or HealthCheckConfig()
        self.admin = admin
        self.token = token  # the admin token (None: the admin API changes state for anyone)
        self.limits = limits or GatewayLimits()
        # sock_connect, not connect: waiting for a pool slot must never count as a failed
        # connection (and with limit=0 there is no waiting anyway).
        self._upstream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._clock = clock
        self.shed = 0  # requests refused at the front door because every target was full
        self._lagged_at = float("-inf")  # loop time the event loop was last seen lagging
        self._lag_watch: asyncio.Task | None = None
        self._targets: dict[str, _Target] = {}
        self._picks = itertools.count(1)
        self._budget = _Budget(self.limits.max_buffered_bytes)
        self._book = _ConnectionBook(cap=1, linger_cap=1)
        self._rate_log = RateLimitedLog(log)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._check_session: aiohttp.ClientSession | None = None
        self._loop_handler: tuple[asyncio.AbstractEventLoop, Any, Any] | None = None
        self._protocol_options: dict[str, Any] = {}
        self.port: int | None = None
        from fleet.metrics import GatewayMetrics  # prometheus_client: only when built
        self.metrics = GatewayMetrics(lambda: {
            "healthy": self.healthy_count(), "targets": len(self._targets),
            "open_connections": self.open_connections, "shed": self.shed})

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("gateway not started")
        return f"http://{self.host}:{self.port}"

    @property
    def max_connections(self) -> int:
        return self._book.cap

    @property
    def open_connections(self) -> int:
        return self._book.open

    # --- life-cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = self._bind()
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.host}:{self.requested_port} "
                          f"({exc.strerror or exc}); choose another port") from exc
        self.port = sock.getsockname()[1]
        # No connection pooling upstream: a pooled keep-alive connection to a worker that
        # was just killed would turn the next request into a 502 instead of a fresh try.
        # No cap on upstream connections either (limit=0): the client connection cap
        # bounds them, and a pool limit would make every request wait behind slow ones.
        self._session = aiohttp.ClientSession(
            timeout=self._upstream_timeout, auto_decompress=False,
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            cookie_jar=aiohttp.DummyCookieJar())
        self._check_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0))
        app = web.Application(middlewares=[self._track_request,
                                           json_errors_middleware(self.limits.drain)],
                              client_max_size=ADMIN_BODY_LIMIT)
        app.on_response_prepare.append(server_name_hook(SERVER_NAME))
        if self.admin is not None:
            app.add_routes(admin_routes(self.admin, self.token,
                                        allowed_hosts=loopback_hosts(self.host, self.port),
                                        prometheus=self._prometheus))
        app.router.add_route("*", "/{tail:.*}", self._proxy, expect_handler=self._expect)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        limits = self.limits
        cap = limits.max_connections or connection_cap(descriptor_limit(),
                                                       limits.descriptor_reserve)
        self._book = _ConnectionBook(cap=cap, linger_cap=max(1, limits.descriptor_reserve // 4))
        self._protocol_options = {
            "keepalive_timeout": limits.idle_timeout_s, "access_log": None,
            # Early answers drain the body themselves (fleet.admin.refuse), bounded in
            # time and bytes; aiohttp's own lingering is bounded in time only.
            "lingering_time": 0.0,
        }
        self._install_loop_error_filter(loop)
        self._lag_watch = loop.create_task(self._watch_lag(), name="gateway-lag-watch")
        try:
            self._listener = await loop.create_server(self._make_protocol, sock=sock,
                                                      backlog=511)
        except OSError:
            sock.close()
            await self.close()
            raise
        log.info("gateway listening on %s (at most %d client connections)", self.url, cap)

    def _prometheus(self) -> bytes:
        """``GET /metrics``, answered here and not forwarded: the gateway's own metrics
        and the manager's (each worker serves its own on its own address)."""
        from fleet.metrics import render
        manager = getattr(self.admin, "metrics", None)
        return render(self.metrics.registry,
                      *([manager.registry] if manager is not None else []))

    def _bind(self) -> socket.socket:
        family = socket.getaddrinfo(self.host, self.requested_port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((self.host, self.requested_port), family=family,
                                    backlog=511)

    async def close(self) -> None:
        if self._lag_watch is not None:
            self._lag_watch.cancel()
            self._lag_watch = None
        for target in list(self._targets.values()):
            self._stop_checker(target)
        self._targets.clear()
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        for session in (self._session, self._check_session):
            if session is not None:
                await session.close()
        self._session = self._check_session = None
        self._remove_loop_error_filter()

    def _make_protocol(self) -> asyncio.Protocol:
        book = self._book
        if book.open >= book.cap:
            self._rate_log.log(logging.WARNING, "connection-cap",
                               "%d client connections open, the limit: refusing new ones "
                               "with 503", book.cap)
            return _Refusal(book, self.limits.refusal_linger_s)
        assert self._runner is not None and self._runner.server is not None
        book.open += 1
        return _ClientConnection(self._runner.server, loop=asyncio.get_running_loop(),
                                 book=book, header_timeout_s=self.limits.header_timeout_s,
                                 rate_log=self._rate_log, **self._protocol_options)

    def _install_loop_error_filter(self, loop: asyncio.AbstractEventLoop) -> None:
        """asyncio logs a traceback for every failed accept (and, before Python 3.12,
        retries up to the backlog at once): out of descriptors that is thousands of lines
        a second. Those become one line a second; anything else goes on as before."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
                self._rate_log.log(logging.WARNING, "accept",
                                   "cannot accept connections: %s (%s); retrying in 1 s",
                                   exc.strerror, context.get("message", ""))
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        self._loop_handler = (loop, handler, previous)

    def _remove_loop_error_filter(self) -> None:
        if self._loop_handler is not None:
            loop, handler, previous = self._loop_handler
            if loop.get_exception_handler() is handler:
                loop.set_exception_handler(previous)
            self._loop_handler = None

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
        return TargetStatus(registered=True, health=target.health, inflight=target.inflight,
                            last_progress_at=target.last_progress_at,
                            reported_inflight=target.reported_inflight,
                            capacity=target.capacity)

    def healthy_count(self) -> int:
        return len(self._candidates())

    def _candidates(self) -> list[_Target]:
        return [t for t in self._targets.values()
                if t.health is Health.HEALTHY and not t.draining]

    def _finish_drain(self, target: _Target) -> None:
        if target.draining and target.inflight == 0:
            self._targets.pop(target.id, None)

    @staticmethod
    def _stop_checker(target: _Target) -> None:
        if target.checker is not None:
            target.checker.cancel()
            target.checker = None

    def _mark_down(self, target: _Target, exc: BaseException) -> None:
        """Passive check: out of rotation now; back after healthy_threshold active checks."""
        if target.draining or target.health is Health.UNHEALTHY:
            return
        log.warning("target %s out of rotation: %s (passive check; back after %d passed "
                    "checks)", target.id, exc.__class__.__name__,
                    self.health.healthy_threshold)
        target.health = Health.UNHEALTHY
        target.successes = 0
        target.failures = max(target.failures, self.health.unhealthy_threshold)

    # --- health checks ---------------------------------------------------------------------

    async def _check_loop(self, target: _Target) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            outcome, report = await self._check_once(target)
            self._record_check(target, outcome, report)
            await asyncio.sleep(max(0.0, self.health.interval_s - (loop.time() - started)))

    async def _watch_lag(self) -> None:
        """Note when this process's own event loop runs late (it is saturated, or the
        machine is): a health check that timed out then says nothing about the target."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            if loop.time() - before - LAG_PROBE_S > LAG_LIMIT_S:
                self._lagged_at = loop.time()

    def _check_was_starved(self, started: float) -> bool:
        """Did this gateway lag while a check that timed out was under way? Either the
        lag watch saw it, or the timeout itself fired late."""
        now = asyncio.get_running_loop().time()
        return (self._lagged_at >= started
                or now - started > self.health.timeout_s + LAG_LIMIT_S)

    async def _check_once(self, target: _Target) -> tuple[CheckOutcome, HealthReport | None]:
        assert self._check_session is not None
        url = f"http://{target.address}{self.health.path}"
        started = asyncio.get_running_loop().time()
        try:
            async with self._check_session.get(
                    url, timeout=aiohttp.ClientTimeout(total=self.health.timeout_s)) as resp:
                raw = await _read_at_most(resp.content, HEALTH_BODY_LIMIT)
                outcome = CheckOutcome.PASSED if resp.status == 200 else CheckOutcome.FAILED
                return outcome, parse_health_report(raw)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if classify_upstream_error(exc) is UpstreamFailure.LOCAL_RESOURCES:
                self._rate_log.log(logging.WARNING, "check-resources",
                                   "health check of %s not made: %s; not counted against it",
                                   target.id, exc)
                return CheckOutcome.INCONCLUSIVE, None
            if isinstance(exc, TimeoutError) and self._check_was_starved(started):
                # Busy must not look like dead: the gateway, not the target, was slow.
                self._rate_log.log(logging.WARNING, "check-lag",
                                   "health check of %s timed out while the gateway itself "
                                   "lagged; not counted against it", target.id)
                return CheckOutcome.INCONCLUSIVE, None
            return CheckOutcome.FAILED, None

    def _record_check(self, target: _Target, outcome: CheckOutcome,
                      report: HealthReport | None) -> None:
        if target.draining:
            return
        now = self._clock()
        if report is not None:
            target.reported_inflight = report.inflight
            target.capacity = report.capacity
            if report.completed is not None:
                if target.completed is not None and report.completed > target.completed:
                    target.last_progress_at = now
                target.completed = report.completed
        if outcome is CheckOutcome.INCONCLUSIVE:
            return
        if outcome is CheckOutcome.PASSED:
            target.last_progress_at = now
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

    @web.middleware
    async def _track_request(self, request: web.Request, handler) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, _ClientConnection):
            protocol.request_started()
        try:
            response = await handler(request)
            if request.path != "/metrics" and not request.path.startswith(ADMIN_PREFIX):
                self.metrics.requests.labels(str(response.status)).inc()
            return response
        finally:
            if isinstance(protocol, _ClientConnection):
                protocol.request_finished()

    def _pick(self, tried: AbstractSet[str] = frozenset()) -> _Target | None:
        candidates = [t for t in self._candidates() if t.id not in tried]
        if not candidates:
            return None
        target = min(candidates, key=lambda t: (t.load, t.last_pick))
        target.last_pick = next(self._picks)
        return target

    def _upstream_headers(self, request: web.Request, body: _Body) -> dict[str, str]:
        connection_named = {
            name.strip().lower()
            for value in request.headers.getall("Connection", [])
            for name in value.split(",")
        }
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in NOT_FORWARDED or lower in connection_named:
                continue
            headers[name] = value if name not in headers else f"{headers[name]}, {value}"
        peer = request.remote or ""
        previous = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Port"] = str(self.port)
        if body.exists or "Content-Length" in request.headers:
            headers["Content-Length"] = str(body.size)
        return headers

    def _too_large(self, size: int | None) -> web.Response:
        got = f", got {size}" if size is not None else ""
        return error_response(413, "too_many_bytes",
                              f"the request body is larger than {self.limits.max_body_bytes} "
                              f"bytes, the limit{got}")

    @staticmethod
    def _no_healthy_targets() -> web.Response:
        return error_response(503, "no_healthy_targets",
                              "no healthy processing server is available; retry shortly",
                              {"Retry-After": "1"})

    def _overloaded(self) -> web.Response:
        self.shed += 1
        return error_response(503, "overloaded",
                              "every processing server is at capacity; retry after 1 s",
                              {"Retry-After": "1"})

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized body before it is sent."""
        if request.version != aiohttp.HttpVersion11:
            return None
        if request.headers.get("Expect", "").lower() != "100-continue":
            response = error_response(417, "expectation_failed",
                                      "only 'Expect: 100-continue' is supported")
        elif request.content_length is not None \
                and request.content_length > self.limits.max_body_bytes:
            response = self._too_large(request.content_length)
        else:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # what aiohttp's own handler does
            return None
        response.headers["Server"] = SERVER_NAME
        response.force_close()
        return response

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if request.path == ADMIN_PREFIX or request.path.startswith(ADMIN_PREFIX + "/"):
            return admin_fallback(request)
        candidates = self._candidates()
        if not candidates:
            return self._no_healthy_targets()  # the middleware drains any body
        if request.body_exists and all_full([(t.inflight, t.capacity) for t in candidates]):
            return self._overloaded()
        try:
            body = await self._buffer_body(request)
        except _BodyRefused as refused:
            if not refused.drain:
                refused.response.force_close()
                await refused.response.prepare(request)
                await refused.response.write_eof()
            return refused.response
        try:
            tried: set[str] = set()
            while True:
                # Picked only now: buffering took time, health may have changed.
                target = self._pick(tried)
                if target is None:
                    return self._no_healthy_targets()
                tried.add(target.id)
                target.inflight += 1
                try:
                    answer = await self._forward(request, target, body)
                finally:
                    target.inflight -= 1
                    self._finish_drain(target)
                if answer is not None:
                    return answer
        finally:
            body.close()

    async def _buffer_body(self, request: web.Request) -> _Body:
        limits = self.limits
        if not request.body_exists:
            return _Body(None, self._budget, limits.memory_body_bytes)
        if request.content_length is not None and request.content_length > limits.max_body_bytes:
            raise _BodyRefused(self._too_large(request.content_length))
        spool = tempfile.SpooledTemporaryFile(max_size=limits.memory_body_bytes,  # noqa: SIM115
                                              dir=limits.spool_dir)
        body = _Body(spool, self._budget, limits.memory_body_bytes)
        try:
            while True:
                try:
                    async with asyncio.timeout(limits.body_timeout_s):
                        chunk = await request.content.readany()
                except TimeoutError:
                    raise _BodyRefused(error_response(
                        408, "request_timeout", f"the request body stalled: no bytes for "
                        f"{limits.body_timeout_s:g}s"), drain=False) from None
                except web.RequestPayloadError as exc:
                    raise _BodyRefused(error_response(400, "bad_request",
                                                      f"malformed request body: {exc}")) from None
                if not chunk:
                    return body
                if body.size + len(chunk) > limits.max_body_bytes:
                    raise _BodyRefused(self._too_large(None))
                if not self._budget.take(len(chunk)):
                    raise _BodyRefused(error_response(
                        503, "gateway_busy", "the gateway is buffering as many request bytes "
                        "as it may; retry shortly", {"Retry-After": "1"}))
                body.size += len(chunk)
                try:
                    spool.write(chunk)  # page cache; rolls over to a file past memory_body_bytes
                except OSError as exc:
                    self._rate_log.log(logging.WARNING, "spool",
                                       "cannot buffer a request body: %s", exc)
                    raise _BodyRefused(error_response(
                        503, "gateway_busy", "the gateway cannot buffer the request body "
                        f"({exc.strerror or exc}); retry shortly", {"Retry-After": "1"})) from None
        except BaseException:
            body.close()
            raise

    async def _forward(self, request: web.Request, target: _Target,
                       body: _Body) -> web.StreamResponse | None:
        """Send the request to ``target`` and stream its answer back; ``None`` when the
        connection was refused, so nothing was sent and the next target may have it."""
        assert self._session is not None
        url = f"http://{target.address}{request.raw_path}"
        response: web.StreamResponse | None = None
        started = time.monotonic()
        try:
            async with self._session.request(
                    request.method, url, headers=self._upstream_headers(request, body),
                    data=body.payload(), allow_redirects=False) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        response.headers.add(name, value)
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    # ALB's idle timeout applies while sending too: a client that stops
                    # reading does not hold the connection (and the worker's) forever.
                    async with asyncio.timeout(self.limits.idle_timeout_s):
                        await response.write(chunk)
                target.last_progress_at = self._clock()  # the worker finished an answer
                self.metrics.upstream_seconds.observe(time.monotonic() - started)
                await response.write_eof()
                return response
        except TimeoutError:
            if response is None or not response.prepared:
                return error_response(504, "gateway_timeout",
                                      f"instance {target.id} did not answer in time")
            return self._cut_short(request, response, target, "timed out")
        except aiohttp.ClientError as exc:
            if response is not None and response.prepared:
                return self._cut_short(request, response, target, repr(exc))
            failure = classify_upstream_error(exc)
            if failure is UpstreamFailure.LOCAL_RESOURCES:
                self._rate_log.log(logging.WARNING, "proxy-resources",
                                   "cannot reach %s: %s", target.id, exc)
                return error_response(503, "gateway_busy",
                                      "the gateway is out of file descriptors; retry shortly",
                                      {"Retry-After": "1"})
            if failure is UpstreamFailure.TARGET_DOWN:
                self._mark_down(target, exc)
                if isinstance(exc, aiohttp.ClientConnectorError):
                    self._rate_log.log(logging.INFO, f"refused-{target.id}",
                                       "%s refused the connection; trying the next target",
                                       target.id)
                    return None
            self._rate_log.log(logging.INFO, f"upstream-{target.id}", "upstream %s failed: %s",
                               target.id, exc)
            return error_response(502, "bad_gateway",
                                  f"instance {target.id} failed: {exc.__class__.__name__}")

    def _cut_short(self, request: web.Request, response: web.StreamResponse, target: _Target,
                   why: str) -> web.StreamResponse:
        # Headers are already out: the only honest signal left is a cut connection, so
        # the client sees a short body (and retries) rather than a complete one.
        self._rate_log.log(logging.INFO, f"cut-{target.id}",
                           "response from %s cut short: %s", target.id, why)
        if request.transport is not None:
            request.transport.close()
        return response


async def _read_at_most(stream: aiohttp.StreamReader, limit: int) -> bytes:
    chunks, size = [], 0
    while size <= limit and (chunk := await stream.readany()):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:limit]
