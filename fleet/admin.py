"""The fleet's admin HTTP API: ``GET /fleet``, ``POST /fleet/scale``,
``POST /fleet/instances/<id>/terminate``.

The local gateway mounts these routes next to its proxy; ``python -m fleet run`` (AWS)
serves them alone with :func:`create_admin_app`. Errors are JSON
``{"error": {"code", "message"}}`` like the processing server's.

What a request must bring (checked in this order, :func:`admin_refusal`):

- ``Host`` naming this gateway (when ``allowed_hosts`` is given: the local gateway on
  loopback), else 421 — a web page that rebinds its DNS name to 127.0.0.1 sends its own
  name and is refused, so it can neither read the fleet nor change it.
- For the routes that change state: no foreign ``Origin`` (403), the admin token as
  ``Authorization: Bearer`` (401), and ``Content-Type: application/json`` (415) — a web
  page can send a cross-origin "simple" POST, but never with a JSON content type without
  a CORS preflight, which this API never grants. Bodies are capped (413, answered from
  ``Content-Length`` before reading) and must be JSON (400, also when nested too deep).
- ``GET /fleet`` needs the token only from off this machine: it stays readable on
  loopback (unless ``loopback_reads_open`` is off: the cloud manager, whose loopback is
  not the admin's).

``create_admin_app`` also answers ``GET /fleet/ping`` (200, no information, no token):
the load balancer's health check of a manager behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from fleet.manager import AdminError
from server.api import ErrorBody
from server.tokens import bearer_accepts

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/fleet"
ADMIN_BODY_LIMIT = 64 * 1024  # {"desired": 3} is 14 bytes; nothing legitimate is larger
JSON_TYPE = "application/json"

# (method, path pattern, what it is) for every admin route: used for the routes and to
# answer 404/405 for paths under /fleet that match none.
ADMIN_ROUTE_TABLE: tuple[tuple[str, str], ...] = (
    ("GET", ADMIN_PREFIX),
    ("POST", ADMIN_PREFIX + "/scale"),
    ("POST", ADMIN_PREFIX + "/instances/{instance_id}/terminate"),
    ("GET", ADMIN_PREFIX + "/metrics"),
)
METRICS_PATH = "/metrics"  # Prometheus text: read-only, the same rule as GET /fleet

STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 408: "request_timeout", 411: "length_required",
                413: "too_many_bytes", 414: "uri_too_long", 415: "unsupported_media_type",
                417: "expectation_failed", 421: "misdirected_request",
                431: "headers_too_large", 500: "internal_error", 501: "not_implemented",
                502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}


class TokenCheck(Protocol):
    """A token source that may change while the server runs (``server.tokens.TokenGate``:
    an SSM parameter re-read periodically, with a rotation's overlap)."""

    def accepts(self, authorization: str) -> bool: ...


class FleetAdmin(Protocol):
    def snapshot(self) -> dict[str, Any]: ...

    def scale(self, desired: object) -> dict[str, Any]: ...

    def terminate(self, instance_id: str) -> dict[str, Any]: ...


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(ErrorBody.of(code, message).model_dump(mode="json"),
                             status=status, headers=headers)


# --- answering before the body is read -------------------------------------------------


@dataclass(frozen=True)
class DrainLimits:
    """How much of an unwanted request body is read (and dropped) after an early answer:
    closing a socket with unread bytes makes the kernel send a reset, which can destroy
    the answer before the client reads it (nginx's lingering close)."""

    seconds: float = 5.0
    max_bytes: int = 64 * 1024 * 1024


def body_pending(request: web.BaseRequest) -> bool:
    """True while part of the request body may still sit unread in the socket."""
    return request.body_exists and not request.content.is_eof()


async def refuse(request: web.BaseRequest, response: web.StreamResponse,
                 drain: DrainLimits = DrainLimits()) -> web.StreamResponse:
    """Send ``response`` now, then drop what the client still sends (bounded by
    ``drain``) and close the connection."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    await discard_body(request, drain)
    return response


async def discard_body(request: web.BaseRequest, drain: DrainLimits) -> None:
    left = drain.max_bytes
    # A client that vanishes or sends a malformed chunk ends the drain, nothing more.
    with contextlib.suppress(TimeoutError, ConnectionError, web.RequestPayloadError):
        async with asyncio.timeout(drain.seconds):
            while left > 0:
                chunk = await request.content.readany()
                if not chunk:
                    return
                left -= len(chunk)


def json_errors_middleware(drain: DrainLimits = DrainLimits()):
    """Every error as JSON (aiohttp's own 404/405/413 too), never a traceback page; an
    answer given before the body arrived drains it first (see :func:`refuse`)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow",
                                                                              "retry-after")}
            message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" \
                else exc.reason
            response = error_response(exc.status, STATUS_CODES.get(exc.status, "error"),
                                      message, headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except TimeoutError:
            response = error_response(504, "gateway_timeout", "the request timed out")
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path)
            response = error_response(500, "internal_error",
                                      "unexpected error; the gateway logged the details")
        if not response.prepared and body_pending(request):
            return await refuse(request, response, drain)
        return response

    return middleware


def server_name_hook(name: str):
    """An ``on_response_prepare`` hook naming the server ``name`` instead of aiohttp's
    version banner (``Python/3.x aiohttp/3.x``); a proxied answer's own ``Server`` stays."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        if response.headers.get("Server", SERVER_SOFTWARE) == SERVER_SOFTWARE:
            response.headers["Server"] = name

    return hook


# --- who may do what --------------------------------------------------------------------


@dataclass(frozen=True)
class AdminPolicy:
    """``token``: required for state changes (and for ``GET /fleet`` from off this
    machine); None: open (only when the caller chose so). ``allowed_hosts``: the Host
    values this server answers to (``127.0.0.1:PORT``...); None: any (behind a load
    balancer, whose name we do not know). ``loopback_reads_open``: ``GET /fleet`` from
    loopback needs no token."""

    token: str | TokenCheck | None = None
    allowed_hosts: frozenset[str] | None = None
    max_body_bytes: int = ADMIN_BODY_LIMIT
    loopback_reads_open: bool = True


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str


def loopback_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host values a gateway bound to ``host:port`` answers to, when that is a
    loopback address (None otherwise: its public names are not known here)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return frozenset({f"{host}:{port}", f"127.0.0.1:{port}", f"localhost:{port}",
                      f"[::1]:{port}"})


def is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def authorized(given: str | None, token: str | TokenCheck | None) -> bool:
    """Whether the ``Authorization`` value ``given`` is ``Bearer TOKEN`` (constant time;
    never raises, whatever bytes the header holds)."""
    if token is None:
        return True
    if not isinstance(token, str):
        return token.accepts(given or "")
    return bearer_accepts(given, (token,))


def admin_refusal(policy: AdminPolicy, *, host: str | None,
                  origin: str | None, authorization: str | None,
                  content_type: str | None, content_length: int | None,
                  remote: str | None, changes_state: bool) -> Refusal | None:
    """Why this admin request is refused, or None: a pure decision on its headers."""
    if policy.allowed_hosts is not None and (host or "").lower() not in policy.allowed_hosts:
        allowed = ", ".join(sorted(policy.allowed_hosts))
        return Refusal(421, "misdirected_request",
                       f"Host {host!r} is not this gateway; the admin API answers only to "
                       f"{allowed}")
    if not changes_state:
        if policy.token is not None \
                and not (policy.loopback_reads_open and is_loopback(remote)) \
                and not authorized(authorization, policy.token):
            return Refusal(401, "unauthorized", "missing or wrong token: send "
                           "'Authorization: Bearer TOKEN'" + (
                               " (only loopback may read without)"
                               if policy.loopback_reads_open else ""))
        return None
    if origin is not None and policy.allowed_hosts is not None and \
            origin.lower() not in {f"http://{h}" for h in policy.allowed_hosts}:
        return Refusal(403, "cross_origin",
                       f"requests from web pages ({origin!r}) may not change the fleet")
    if not authorized(authorization, policy.token):
        return Refusal(401, "unauthorized",
                       "missing or wrong token: send 'Authorization: Bearer TOKEN' (a local "
                       "fleet writes its admin token to <storage>/.fleet/admin-token)")
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if mimetype != JSON_TYPE:
        return Refusal(415, "unsupported_media_type",
                       f"send a JSON body with 'Content-Type: {JSON_TYPE}' "
                       f"(got {content_type or 'none'!r})")
    if content_length is not None and content_length > policy.max_body_bytes:
        return Refusal(413, "too_many_bytes",
                       f"admin request bodies are at most {policy.max_body_bytes} bytes, "
                       f"got {content_length}")
    return None


async def read_json_body(request: web.Request, limit: int) -> Any:
    """The request body as JSON (null when empty); raises :class:`AdminError` 413/400."""
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise AdminError(413, "too_many_bytes",
                             f"admin request bodies are at most {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw or b"null")
    except RecursionError:
        raise AdminError(400, "invalid_json", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise AdminError(400, "invalid_json", 'body must be JSON like {"desired": 3}') from None


def admin_fallback(request: web.BaseRequest) -> web.Response:
    """404 or 405 (with ``Allow``) for a path under ``/fleet`` that no route took."""
    allowed = sorted({method for method, template in ADMIN_ROUTE_TABLE
                      if _template_matches(template, request.path)})
    if allowed:
        allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
        return error_response(405, "method_not_allowed",
                              f"{request.method} is not allowed on {request.path}; use "
                              f"{allow}", {"Allow": allow})
    routes = ", ".join(f"{m} {t}" for m, t in ADMIN_ROUTE_TABLE)
    return error_response(404, "not_found",
                          f"no admin route {request.method} {request.path}; routes: {routes}")


def _template_matches(template: str, path: str) -> bool:
    pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template))
    return re.fullmatch(pattern, path) is not None


# --- routes -------------------------------------------------------------------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def admin_routes(admin: FleetAdmin, token: str | TokenCheck | None = None, *,
                 allowed_hosts: frozenset[str] | None = None,
                 max_body_bytes: int = ADMIN_BODY_LIMIT,
                 loopback_reads_open: bool = True,
                 prometheus: Callable[[], bytes] | None = None) -> list[web.RouteDef]:
    """Routes for ``admin`` under :class:`AdminPolicy` (see the module docstring).
    ``GET /fleet/metrics`` answers the admin's rolling window (``admin.window(seconds)``);
    with ``prometheus`` (the text of the metrics), ``GET /metrics`` answers it."""
    policy = AdminPolicy(token, allowed_hosts, max_body_bytes, loopback_reads_open)

    def guarded(handler: Handler, *, changes_state: bool) -> Handler:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            refusal = admin_refusal(
                policy, host=request.headers.get("Host"),
                origin=request.headers.get("Origin"),
                authorization=request.headers.get("Authorization"),
                content_type=request.headers.get("Content-Type"),
                content_length=request.content_length, remote=request.remote,
                changes_state=changes_state)
            if refusal is not None:
                return error_response(refusal.status, refusal.code, refusal.message)
            try:
                return await handler(request)
            except AdminError as exc:
                return error_response(exc.status, exc.code, exc.message)
        return wrapper

    async def get_fleet(request: web.Request) -> web.Response:
        return web.json_response(admin.snapshot())

    async def post_scale(request: web.Request) -> web.Response:
        body = await read_json_body(request, policy.max_body_bytes)
        if not isinstance(body, dict) or "desired" not in body:
            return error_response(400, "invalid_desired",
                                  'body must be a JSON object like {"desired": 3}')
        return web.json_response(admin.scale(body["desired"]))

    async def post_terminate(request: web.Request) -> web.Response:
        await read_json_body(request, policy.max_body_bytes)  # any JSON; {} is usual
        return web.json_response(admin.terminate(request.match_info["instance_id"]),
                                 status=202)

    async def get_fleet_metrics(request: web.Request) -> web.Response:
        raw = request.query.get("seconds", "3600")
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 24 * 3600:
            return error_response(400, "invalid_parameter",
                                  f"'seconds' got {raw[:20]!r}; allowed: 1 to 86400")
        window = getattr(admin, "window", None)
        if window is None:
            return error_response(404, "not_found", "this fleet keeps no metrics window")
        return web.json_response(window(seconds))

    async def get_metrics(request: web.Request) -> web.Response:
        assert prometheus is not None
        return web.Response(body=prometheus(), headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    handlers = {ADMIN_ROUTE_TABLE[0]: guarded(get_fleet, changes_state=False),
                ADMIN_ROUTE_TABLE[1]: guarded(post_scale, changes_state=True),
                ADMIN_ROUTE_TABLE[2]: guarded(post_terminate, changes_state=True),
                ADMIN_ROUTE_TABLE[3]: guarded(get_fleet_metrics, changes_state=False)}
    if prometheus is not None:
        handlers["GET", METRICS_PATH] = guarded(get_metrics, changes_state=False)
    # web.get also answers HEAD, as before.
    return [web.get(path, handler) if method == "GET" else web.route(method, path, handler)
            for (method, path), handler in handlers.items()]


async def ping(request: web.Request) -> web.Response:
    """For a load balancer's health check: answers, tells nothing, needs no token."""
    return web.json_response({"status": "ok"})


def create_admin_app(admin: FleetAdmin, token: str | TokenCheck | None = None, *,
                     allowed_hosts: frozenset[str] | None = None,
                     loopback_reads_open: bool = True) -> web.Application:
    metrics = getattr(admin, "metrics", None)

    def prometheus() -> bytes:
        from fleet.metrics import render  # prometheus_client: only when scraped
        return render(metrics.registry)

    async def fallback(request: web.Request) -> web.Response:
        if request.path == ADMIN_PREFIX or request.path.startswith(ADMIN_PREFIX + "/"):
            return admin_fallback(request)
        return error_response(404, "not_found", f"no route {request.method} {request.path}")

    app = web.Application(middlewares=[json_errors_middleware()],
                          client_max_size=ADMIN_BODY_LIMIT)
    app.on_response_prepare.append(server_name_hook("imagefleet-fleet"))
    app.add_routes(admin_routes(admin, token, allowed_hosts=allowed_hosts,
                                loopback_reads_open=loopback_reads_open,
                                prometheus=prometheus if metrics is not None else None))
    app.router.add_get(ADMIN_PREFIX + "/ping", ping)
    app.router.add_route("*", "/{tail:.*}", fallback)
    return app
