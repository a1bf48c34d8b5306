"""The one async client for the ImageFleet HTTP API served by the processing server.

Used by the desktop app and by ``python -m scripts.process``. It speaks to a
processing server directly or, more usually, through a load balancer (the AWS ALB
or the local gateway of ``python -m fleet local``). Callers never import aiohttp:
every aiohttp or socket failure is turned into one of the exceptions below, in one
place (``_mapped_transport_errors``), with the original chained as ``__cause__``.

Usage::

    async with ImageFleetClient("http://127.0.0.1:8000", token=None, concurrency=4) as client:
        ops = await client.operations()
        result = await client.process(Path("cat.png"), operation="grayscale")
        png = await client.download_result(result)
        outcomes = await client.process_many(
            [Job(Path(p), operation="gaussian_blur", params={"ksize": 5}) for p in paths],
            download=True,
            progress=print,
        )

Behaviour:

* **Bounded, adaptive concurrency.** At most ``concurrency`` HTTP requests are in
  flight per client (a slot held per attempt, not while backing off), and
  ``process_many``/``iter_process`` run at most ``concurrency`` jobs at once, pulling
  jobs lazily from the iterable so a long batch never loads every file at once.
  While the servers shed load the client keeps fewer requests in flight
  (:class:`AdaptiveConcurrency`, AIMD like TCP: each overload episode multiplies the
  window by 0.7, floor 1; successes add it back slowly), so a big batch does not
  hammer a busy fleet with requests it will only turn away.
* **Explicit timeouts** (:class:`Timeout`): connect (DNS + TCP) and read (longest
  silence while waiting for or reading an answer, and the longest an upload may
  stall); an optional total. aiohttp's 300 s default total is never used.
* **Retries** (:class:`RetryPolicy`, decided by the pure :func:`next_retry`):
  exponential backoff with full jitter on connection errors, dropped connections,
  timeouts and HTTP 502/503/504, up to ``attempts``. Back-pressure (503
  ``overloaded``, any 503 with ``Retry-After``, 429) is not a fault: it is retried
  after ``Retry-After`` x [1, 2) seconds for up to ``overload_patience`` seconds and
  uses none of the attempts, so a busy but working fleet never fails a batch that
  a broken one would. Never retried: other 4xx (413 too large, ...) and 5xx (500,
  507 insufficient storage, ...). Retrying ``POST /process`` is harmless: the
  server's result key is derived from the input, pipeline and format, so a repeat
  is a cache hit.
* **Validated answers**: every JSON answer is parsed into frozen dataclasses; a
  missing or mistyped field raises :class:`InvalidResponse` naming the field.
* **Checked downloads**: the byte count must match ``Content-Length`` (and the
  result's ``bytes`` when known) and the bytes must decode as an image (Pillow).
* **Progress**: an optional callback receives :class:`ProgressEvent` values
  (phases ``uploading`` with a byte fraction, ``processing``, ``downloading`` with
  a byte fraction, ``retrying`` (with ``busy`` set when it is back-pressure),
  ``done``, ``failed``). It is called on the event loop's thread and must return
  quickly (a GUI should only post it to a queue).
* **Auth**: ``token`` is sent as ``Authorization: Bearer <token>``, only to the
  endpoint's own origin, never to a presigned S3 link (S3 would reject the request).
* **Pinning**: with ``ca_file`` (a PEM file, e.g. the self-signed certificate
  ``bootstrap_aws up`` wrote) the endpoint's origin is trusted only if it presents
  that certificate, host name checked; other origins (S3 links) keep the system's
  trust store. A certificate problem is a :class:`TransportError` naming it, never
  retried. There is no way to turn verification off.

Exceptions (all carry ``attempts``, the number of HTTP attempts made)::

    ClientError                 base class of everything this module raises
    ├── InvalidRequest          bad arguments or an unreadable local input; nothing was sent
    │                           (also a ValueError)
    ├── TransportError          no usable HTTP answer, after the retries allowed
    │   ├── ConnectError        could not connect (refused, unknown host, unreachable)
    │   ├── ConnectionLost      connection dropped before a complete answer (reset,
    │   │                       server disconnected, truncated body)
    │   └── RequestTimeout      a timeout expired
    │       ├── ConnectTimeout  ... while connecting
    │       └── ReadTimeout     ... waiting for or reading the answer, or uploading
    ├── ServerError             the server answered an error status: ``status``,
    │                           ``code`` and ``message`` from its JSON error body
    │                           (4xx at once; 502/503/504 after the retries allowed;
    │                           503 overloaded and 429 after ``overload_patience``)
    └── InvalidResponse         the answer breaks the contract: not JSON, missing or
                                mistyped fields, or a download that does not decode
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import logging
import mimetypes
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from yarl import URL

__all__ = [
    "AdaptiveConcurrency",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionLost",
    "FleetEvent",
    "FleetInstance",
    "FleetState",
    "Health",
    "ImageFleetClient",
    "InvalidRequest",
    "InvalidResponse",
    "Job",
    "JobOutcome",
    "Load",
    "OperationSpec",
    "ParamSpec",
    "Phase",
    "ProcessResult",
    "ProgressCallback",
    "ProgressEvent",
    "ReadTimeout",
    "RequestTimeout",
    "RetryPolicy",
    "RetryStep",
    "ServerError",
    "Timeout",
    "TransportError",
    "backoff_delay",
    "check_image_bytes",
    "form_fields",
    "is_backpressure",
    "is_retryable",
    "next_retry",
    "parse_fleet",
    "parse_health",
    "parse_operations",
    "parse_process_result",
    "pinned_context",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUSES = frozenset({502, 503, 504})
# Back-pressure without a Retry-After waits about this long; a Retry-After of 0 at least
# the minimum, so a shedding server is never answered with an immediate storm.
DEFAULT_OVERLOAD_WAIT = 1.0
MIN_OVERLOAD_WAIT = 0.1
_UPLOAD_CHUNK = 64 * 1024
_DOWNLOAD_CHUNK = 64 * 1024
_ERROR_BODY_PREVIEW = 300


# --------------------------------------------------------------------------- exceptions


class ClientError(Exception):
    """Base class of every error raised by :mod:`gui.client`."""

    attempts: int = 1

    def __str__(self) -> str:
        text = super().__str__()
        if self.attempts > 1:
            text += f" (after {self.attempts} attempts)"
        return text


class InvalidRequest(ClientError, ValueError):
    """The call's arguments are invalid or a local input cannot be read; nothing was sent."""


class TransportError(ClientError):
    """No usable HTTP answer was received (after the retries allowed)."""


class ConnectError(TransportError):
    """The connection could not be made: refused, unknown host, unreachable."""


class ConnectionLost(TransportError):
    """The connection dropped before a complete answer arrived."""


class RequestTimeout(TransportError):
    """A timeout from :class:`Timeout` expired."""


class ConnectTimeout(RequestTimeout):
    """Connecting took longer than ``Timeout.connect``."""


class ReadTimeout(RequestTimeout):
    """The server stayed silent longer than ``Timeout.read`` (or ``total`` expired)."""


class ServerError(ClientError):
    """The server answered an error status.

    ``status`` is the HTTP status, ``code`` and ``message`` come from the server's
    ``{"error": {"code", "message"}}`` body (``code`` is ``"http_<status>"`` when the
    body is not that JSON, e.g. from a proxy or S3). ``retry_after`` is the
    ``Retry-After`` header in seconds, when given.
    """

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


class InvalidResponse(ClientError):
    """The server's answer does not follow the contract (bad JSON, missing fields, bad image)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Timeout:
    """Per-request time limits in seconds.

    ``connect``: to open the TCP connection. ``read``: the longest silence allowed
    while waiting for the answer or between chunks of it (processing time counts
    here, so keep it above the slowest operation). ``total``: optional cap on one
    whole attempt, including the upload; ``None`` means no cap (never aiohttp's
    300 s default).
    """

    connect: float = 5.0
    read: float = 120.0
    total: float | None = None

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise InvalidRequest(f"Timeout.{name} must be > 0 seconds, got {value!r}")



@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a failed request.

    Two budgets, because a busy fleet is not a broken one:

    * **Faults** (connection errors, dropped connections, timeouts, 502/504, a 503
      without ``Retry-After``): ``attempts`` counts the first try (1 = no retries).
      Before the next try the client waits :func:`backoff_delay` seconds:
      ``min(backoff_max, backoff_base * 2 ** (n - 1))`` after the n-th fault,
      multiplied by a uniform random factor in [0, 1) when ``jitter`` ("full
      jitter", which spreads retries from many clients apart).
    * **Back-pressure** (503 ``overloaded``, any 503 with ``Retry-After``, 429): the
      server is working and asks for time. These answers do not use up ``attempts``;
      the request is retried for up to ``overload_patience`` seconds from its first
      such answer, each time after ``Retry-After`` seconds (1 s when absent) times a
      uniform factor in [1, 2) (so the clients a server turned away come back spread
      over a second, not all at once). ``overload_patience=0`` gives up at the first
      back-pressure answer.
    """

    attempts: int = 5
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    jitter: bool = True
    overload_patience: float = 180.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise InvalidRequest(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.backoff_base < 0 or self.backoff_max < 0:
            raise InvalidRequest("RetryPolicy backoff values must be >= 0 seconds")
        if not self.overload_patience >= 0:
            raise InvalidRequest(
                "RetryPolicy.overload_patience must be >= 0 seconds, "
                f"got {self.overload_patience!r}"
            )


def backoff_delay(
    policy: RetryPolicy, failed_attempt: int, rand: float, retry_after: float | None = None
) -> float:
    """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed.

    Pure: ``rand`` is a number in [0, 1) supplied by the caller. A server's
    ``Retry-After`` raises the delay to at least that much, still capped at
    ``backoff_max``.
    """
    ceiling = min(policy.backoff_max, policy.backoff_base * 2 ** (failed_attempt - 1))
    delay = ceiling * rand if policy.jitter else ceiling
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.backoff_max))
    return delay


def is_backpressure(exc: ClientError) -> bool:
    """Whether ``exc`` is a busy server asking for time rather than a fault.

    503 ``overloaded`` (an instance shedding load), any 503 that names a
    ``Retry-After``, and 429 Too Many Requests.
    """
    if not isinstance(exc, ServerError):
        return False
    if exc.status == 429:
        return True
    return exc.status == 503 and (exc.code == "overloaded" or exc.retry_after is not None)


def is_retryable(exc: ClientError) -> bool:
    """Whether a request that failed with ``exc`` may be sent again (budgets permitting)."""
    if isinstance(exc, ConnectError | ConnectionLost | RequestTimeout):
        return True
    if is_backpressure(exc):
        return True
    return isinstance(exc, ServerError) and exc.status in RETRYABLE_STATUSES


@dataclass(frozen=True)
class RetryStep:
    """What to do after a failed attempt (see :func:`next_retry`).

    ``retry``: send again after ``delay`` seconds. ``busy``: the failure was
    back-pressure (it used the overload budget, not an attempt). ``reason``: why the
    client gives up, when ``retry`` is false ("" for errors never retried).
    """

    retry: bool
    delay: float = 0.0
    busy: bool = False
    reason: str = ""


def next_retry(
    policy: RetryPolicy,
    exc: ClientError,
    *,
    faults: int,
    busy_for: float | None,
    rand: float,
) -> RetryStep:
    """Decide whether and when to retry after ``exc`` (pure).

    ``faults``: the fault failures of this request so far, this one included when it
    is a fault. ``busy_for``: seconds since this request's first back-pressure answer
    (0.0 for this one, None if there was none). ``rand``: uniform in [0, 1).
    """
    if is_backpressure(exc):
        assert isinstance(exc, ServerError)
        elapsed = busy_for or 0.0
        remaining = policy.overload_patience - elapsed
        if remaining <= 0:
            reason = (
                f"server still busy after {elapsed:.0f} s (overload_patience "
                f"{policy.overload_patience:g} s)"
                if policy.overload_patience > 0
                else "server busy and overload_patience is 0"
            )
            return RetryStep(False, busy=True, reason=reason)
        asked = DEFAULT_OVERLOAD_WAIT if exc.retry_after is None else exc.retry_after
        wait = max(MIN_OVERLOAD_WAIT, asked)
        return RetryStep(True, min(remaining, wait * (1.0 + rand)), busy=True)
    if not is_retryable(exc):
        return RetryStep(False)
    if faults >= policy.attempts:
        return RetryStep(False, reason=f"{faults} attempts failed")
    retry_after = exc.retry_after if isinstance(exc, ServerError) else None
    return RetryStep(True, backoff_delay(policy, faults, rand, retry_after))


@dataclass
class AdaptiveConcurrency:
    """How many requests a client keeps in flight: AIMD, like TCP's congestion window.

    Starts at ``ceiling`` (the configured concurrency), so a fleet with room is used
    fully from the first request. A back-pressure answer multiplies the window by
    ``decrease`` (floor 1); each success adds ``1 / window``, i.e. about one request
    per window of successes, back up to ``ceiling``.

    One overload episode cuts once: many requests sent together come back busy
    together, and cutting for each would collapse the window to 1. So each request
    carries the ``epoch`` it was sent in, and only an answer to a request sent since
    the last cut cuts again (TCP reacts once per window of losses for the same
    reason). Pure and clock-free: the caller reports outcomes.
    """

    ceiling: int
    decrease: float = 0.7
    window: float = 0.0
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.ceiling < 1:
            raise InvalidRequest(f"concurrency must be >= 1, got {self.ceiling}")
        if not 0 < self.decrease < 1:
            raise InvalidRequest(f"decrease must be within (0, 1), got {self.decrease}")
        if not self.window:
            self.window = float(self.ceiling)

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(1, min(self.ceiling, int(self.window)))

    def on_success(self) -> None:
        self.window = min(float(self.ceiling), self.window + 1.0 / self.window)

    def on_overload(self, sent_epoch: int) -> bool:
        """A request sent in ``sent_epoch`` was turned away; returns whether the window shrank."""
        if sent_epoch != self.epoch:
            return False
        self.window = max(1.0, self.window * self.decrease)
        self.epoch += 1
        return True


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an operation, as ``GET /operations`` describes it.

    ``type`` is ``"int"``, ``"float"``, ``"bool"`` or ``"choice"``; ``min``/``max``
    bound numbers; ``choices`` lists the allowed values of a ``choice``; ``odd`` marks
    integers that must be odd (kernel sizes); ``description`` is help text.
    """

    name: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    odd: bool = False
    description: str = ""


@dataclass(frozen=True)
class OperationSpec:
    """One operation the servers offer."""

    name: str
    title: str
    description: str
    params: tuple[ParamSpec, ...]
    tileable: bool

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class ProcessResult:
    """The answer to ``POST /process``.

    ``url`` is the (expiring) link to the result, ``expires_at`` is timezone-aware.
    ``bytes`` is the result's size, ``tiles`` is 1 unless the server tiled the image,
    ``timings_ms`` are the server's own timings. ``elapsed_s`` is the wall time this
    client spent (all attempts), ``attempts`` the number of HTTP attempts made.
    """

    key: str
    url: str
    expires_at: datetime
    instance_id: str
    width: int
    height: int
    format: str
    bytes: int
    cached: bool
    tiles: int
    timings_ms: Mapping[str, float] = field(hash=False)
    elapsed_s: float
    attempts: int = 1


@dataclass(frozen=True)
class Load:
    """How loaded an instance is, from ``GET /health``'s ``load`` object.

    ``busy`` of ``slots`` processing slots are working, ``queued`` requests wait
    (at most ``queue_limit``; beyond that the instance answers 503 ``overloaded``),
    ``completed`` counts finished requests since start.
    """

    busy: int
    slots: int
    queued: int
    queue_limit: int
    completed: int


@dataclass(frozen=True)
class Health:
    """The answer to ``GET /health`` (``status`` is ``"ok"`` or ``"draining"``).

    ``load`` is None from a server that does not report it.
    """

    status: str
    instance_id: str
    inflight: int
    processed: int
    uptime_s: float
    version: str
    load: Load | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class FleetInstance:
    """One instance in ``GET /fleet`` (``health`` is an ALB target state)."""

    id: str
    state: str
    health: str
    address: str | None
    inflight: int
    launched_at: datetime | None


@dataclass(frozen=True)
class FleetEvent:
    """One entry of the fleet's event log."""

    at: datetime | None
    kind: str
    instance_id: str | None
    message: str


@dataclass(frozen=True)
class FleetState:
    """The answer to ``GET /fleet``."""

    name: str
    provider: str
    desired: int
    min: int
    max: int
    instances: tuple[FleetInstance, ...]
    events: tuple[FleetEvent, ...]


@dataclass(frozen=True)
class Job:
    """One image to process in a batch; fields as in :meth:`ImageFleetClient.process`.

    ``name`` labels the job in progress events (default: the file name).
    """

    image: bytes | Path
    operation: str | None = None
    params: Mapping[str, Any] | None = None
    steps: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]] | None = None
    format: str | None = None
    quality: int | None = None
    expires_in: int | None = None
    name: str | None = None
    # Encoder, colour and metadata options (None: the server's default); see process().
    progressive: bool | None = None
    subsampling: str | None = None
    lossless: bool | None = None
    icc: str | None = None
    metadata: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.image.name if isinstance(self.image, Path) else "image"


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job of a batch: ``result`` and/or ``error``.

    ``ok`` is true when nothing failed. ``result`` may be set alongside ``error``
    when processing worked but the download failed. ``data`` holds the downloaded
    bytes when the batch asked for downloads.
    """

    index: int
    job: Job
    result: ProcessResult | None
    error: ClientError | None
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


Phase = Literal["uploading", "processing", "downloading", "retrying", "done", "failed"]


@dataclass(frozen=True)
class ProgressEvent:
    """A step of one job, for progress display.

    ``index``/``name`` identify the job (index 0 for single calls); ``fraction`` is
    the progress within ``phase`` (bytes sent or received; 0 when unknown, 1 at
    ``done``); ``attempt`` is the HTTP attempt (1-based); ``message`` explains
    ``retrying`` (the error and the delay) and ``failed`` (the error). ``busy`` marks
    a ``retrying`` that is back-pressure, not a fault: the server is working and asked
    for time (message ``"server busy, retrying in 1.3 s"``); show it as waiting, not
    as an error.
    """

    index: int
    name: str
    phase: Phase
    fraction: float = 0.0
    attempt: int = 1
    message: str = ""
    busy: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class _Reporter:
    """Sends the progress events of one job to the caller's callback (if any)."""

    callback: ProgressCallback | None
    index: int
    name: str

    def __call__(
        self,
        phase: Phase,
        fraction: float = 0.0,
        attempt: int = 1,
        message: str = "",
        busy: bool = False,
    ) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(self.index, self.name, phase, fraction, attempt, message, busy)
            )

    def retrying(self, attempt: int, delay: float, exc: ClientError, busy: bool) -> None:
        if busy:
            self("retrying", 0.0, attempt, f"server busy, retrying in {delay:.1f} s", busy=True)
        else:
            self("retrying", 0.0, attempt, f"{exc}; attempt {attempt + 1} in {delay:.2f} s")


# --------------------------------------------------------------------------- error mapping


@contextlib.contextmanager
def _mapped_transport_errors(what: str) -> Iterator[None]:
    """Turn aiohttp/socket failures inside the block into this module's exceptions.

    The one place where third-party exceptions are translated; ``what`` names the
    request (``"POST http://host/process"``) for the message.
    """
    try:
        yield
    except ClientError:
        raise
    except aiohttp.ConnectionTimeoutError as exc:
        raise ConnectTimeout(f"{what}: timed out while connecting") from exc
    except aiohttp.ClientConnectorCertificateError as exc:
        # Not retried (TransportError): another attempt meets the same certificate.
        cause = exc.certificate_error
        reason = getattr(cause, "verify_message", None) or getattr(cause, "reason", None) \
            or str(cause)
        raise TransportError(
            f"{what}: the server's certificate was refused: certificate verify failed: "
            f"{reason} (trusted: the pinned CA file if one is set, else the system's "
            "certificates)") from exc
    except aiohttp.ClientSSLError as exc:
        raise TransportError(f"{what}: TLS failure: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        os_error = exc.os_error
        reason = os.strerror(os_error.errno) if os_error.errno else str(os_error)
        raise ConnectError(f"{what}: cannot connect to {exc.host}:{exc.port}: {reason}") from exc
    except TimeoutError as exc:  # sock_read (SocketTimeoutError), total, or a stalled upload
        detail = "upload stalled" if "upload stalled" in str(exc) else "no answer in time"
        raise ReadTimeout(f"{what}: {detail} ({exc or 'timeout'})") from exc
    except aiohttp.InvalidURL as exc:
        raise InvalidRequest(f"{what}: invalid URL: {exc}") from exc
    except aiohttp.ClientPayloadError as exc:
        raise ConnectionLost(f"{what}: answer body incomplete: {exc}") from exc
    except aiohttp.ClientConnectionError as exc:
        raise ConnectionLost(f"{what}: connection lost: {exc or type(exc).__name__}") from exc
    except aiohttp.ClientError as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _server_error(resp: aiohttp.ClientResponse) -> ServerError:
    """Build the ServerError for an error answer from its JSON error body, if it has one."""
    raw = await resp.read()
    code, message = f"http_{resp.status}", ""
    try:
        body = json.loads(raw)
        error = body["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace").strip()[:_ERROR_BODY_PREVIEW] or (
            resp.reason or "no details"
        )
    retry_after: float | None = None
    header = resp.headers.get("Retry-After")
    if header is not None:
        with contextlib.suppress(ValueError):
            retry_after = max(0.0, float(header))
    return ServerError(resp.status, code, message, retry_after=retry_after)


async def _read_json(resp: aiohttp.ClientResponse, what: str) -> dict[str, Any]:
    raw = await resp.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        preview = raw[:80].decode("utf-8", "replace")
        raise InvalidResponse(f"{what}: answer is not JSON: {preview!r}") from exc
    if not isinstance(body, dict):
        raise InvalidResponse(f"{what}: expected a JSON object, got {type(body).__name__}")
    return body


# --------------------------------------------------------------------------- answer parsing


class _Fields:
    """Typed access to a JSON object; every problem raises InvalidResponse naming the field."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise InvalidResponse(f"{where}: expected a JSON object, got {type(obj).__name__}")
        self.obj = obj
        self.where = where

    def _get(self, name: str, kinds: tuple[type, ...], kind_name: str, nullable: bool) -> Any:
        if name not in self.obj:
            raise InvalidResponse(f"{self.where}: missing field {name!r}")
        value = self.obj[name]
        if value is None and nullable:
            return None
        # bool is an int subclass; a JSON true is never a valid number here.
        if isinstance(value, bool) and bool not in kinds:
            value_ok = False
        else:
            value_ok = isinstance(value, kinds)
        if not value_ok:
            raise InvalidResponse(
                f"{self.where}: field {name!r} should be {kind_name}, got {value!r}"
            )
        return value

    def str(self, name: str) -> str:
        return self._get(name, (str,), "a string", False)

    def opt_str(self, name: str) -> str | None:
        return self._get(name, (str,), "a string or null", True)

    def int(self, name: str) -> int:
        return self._get(name, (int,), "an integer", False)

    def float(self, name: str) -> float:
        return float(self._get(name, (int, float), "a number", False))

    def opt_float(self, name: str) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return None
        return self.float(name)

    def bool(self, name: str) -> bool:
        return self._get(name, (bool,), "true or false", False)

    def list(self, name: str) -> list[Any]:
        return self._get(name, (list,), "a list", False)

    def dict(self, name: str) -> dict[str, Any]:
        return self._get(name, (dict,), "an object", False)

    def time(self, name: str, nullable: bool = False) -> datetime | None:
        value = self._get(name, (str, int, float), "an ISO 8601 time", nullable)
        if value is None:
            return None
        try:
            return _parse_time(value)
        except (ValueError, OverflowError, OSError) as exc:
            raise InvalidResponse(
                f"{self.where}: field {name!r} is not a valid time: {value!r}"
            ) from exc


def _parse_time(value: str | float) -> datetime:
    """ISO 8601 text or Unix seconds → aware datetime (naive text is taken as UTC)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def parse_operations(body: Mapping[str, Any]) -> list[OperationSpec]:
    """Validate a ``GET /operations`` answer."""
    top = _Fields(body, "GET /operations")
    operations = []
    for i, raw in enumerate(top.list("operations")):
        op = _Fields(raw, f"GET /operations: operations[{i}]")
        name = op.str("name")
        params = []
        for j, raw_param in enumerate(op.list("params")):
            p = _Fields(raw_param, f"GET /operations: operation {name!r} params[{j}]")
            if "default" not in p.obj:
                raise InvalidResponse(f"{p.where}: missing field 'default'")
            choices = p.obj.get("choices")
            if choices is not None and not isinstance(choices, list):
                raise InvalidResponse(f"{p.where}: field 'choices' should be a list or null")
            params.append(
                ParamSpec(
                    name=p.str("name"),
                    type=p.str("type"),
                    default=p.obj["default"],
                    min=p.opt_float("min"),
                    max=p.opt_float("max"),
                    choices=tuple(choices) if choices is not None else None,
                    odd=p.obj.get("odd") is True,
                    description=str(p.obj.get("description") or ""),
                )
            )
        operations.append(
            OperationSpec(
                name=name,
                title=op.str("title"),
                description=op.str("description"),
                params=tuple(params),
                tileable=op.bool("tileable"),
            )
        )
    return operations


def parse_process_result(
    body: Mapping[str, Any], *, base_url: str, elapsed_s: float, attempts: int
) -> ProcessResult:
    """Validate a ``POST /process`` JSON answer. A relative ``url`` is joined to ``base_url``."""
    f = _Fields(body, "POST /process answer")
    timings = {}
    for name, value in f.dict("timings_ms").items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidResponse(f"{f.where}: timings_ms[{name!r}] should be a number")
        timings[str(name)] = float(value)
    url = f.str("url")
    if url.startswith("/"):
        url = base_url + url
    expires_at = f.time("expires_at")
    assert expires_at is not None  # not nullable
    return ProcessResult(
        key=f.str("key"),
        url=url,
        expires_at=expires_at,
        instance_id=f.str("instance_id"),
        width=f.int("width"),
        height=f.int("height"),
        format=f.str("format"),
        bytes=f.int("bytes"),
        cached=f.bool("cached"),
        tiles=f.int("tiles"),
        timings_ms=timings,
        elapsed_s=elapsed_s,
        attempts=attempts,
    )


def parse_health(body: Mapping[str, Any]) -> Health:
    """Validate a ``GET /health`` answer."""
    f = _Fields(body, "GET /health")
    load = None
    if f.obj.get("load") is not None:
        raw = _Fields(f.dict("load"), "GET /health: load")
        load = Load(
            busy=raw.int("busy"),
            slots=raw.int("slots"),
            queued=raw.int("queued"),
            queue_limit=raw.int("queue_limit"),
            completed=raw.int("completed"),
        )
    return Health(
        status=f.str("status"),
        instance_id=f.str("instance_id"),
        inflight=f.int("inflight"),
        processed=f.int("processed"),
        uptime_s=f.float("uptime_s"),
        version=f.str("version"),
        load=load,
    )


def parse_fleet(body: Mapping[str, Any]) -> FleetState:
    """Validate a ``GET /fleet`` answer."""
    f = _Fields(body, "GET /fleet")
    instances = []
    for i, raw in enumerate(f.list("instances")):
        inst = _Fields(raw, f"GET /fleet: instances[{i}]")
        instances.append(
            FleetInstance(
                id=inst.str("id"),
                state=inst.str("state"),
                health=inst.str("health"),
                address=inst.opt_str("address"),
                inflight=inst.int("inflight"),
                launched_at=inst.time("launched_at", nullable=True),
            )
        )
    events = []
    for i, raw in enumerate(f.list("events")):
        ev = _Fields(raw, f"GET /fleet: events[{i}]")
        events.append(
            FleetEvent(
                at=ev.time("at", nullable=True),
                kind=ev.str("kind"),
                instance_id=ev.opt_str("instance_id"),
                message=ev.str("message"),
            )
        )
    return FleetState(
        name=f.str("name"),
        provider=f.str("provider"),
        desired=f.int("desired"),
        min=f.int("min"),
        max=f.int("max"),
        instances=tuple(instances),
        events=tuple(events),
    )


# --------------------------------------------------------------------------- request bodies


def form_fields(
    *,
    operation: str | None,
    params: Mapping[str, Any] | None,
    steps: Iterable[Mapping[str, Any]] | None,
    format: str | None,
    quality: int | None,
    expires_in: int | None,
    progressive: bool | None = None,
    subsampling: str | None = None,
    lossless: bool | None = None,
    icc: str | None = None,
    metadata: str | None = None,
) -> dict[str, str]:
    """The text fields of a ``POST /process`` form (pure; InvalidRequest on misuse).

    Exactly one of ``operation`` and ``steps`` is required. Values are checked only
    for shape; the server checks names and ranges and answers 400 with the valid ones.
    """
    if (operation is None) == (steps is None):
        raise InvalidRequest("give exactly one of 'operation' or 'steps'")
    fields: dict[str, str] = {}
    if operation is not None:
        if not isinstance(operation, str) or not operation:
            raise InvalidRequest(f"operation must be a non-empty string, got {operation!r}")
        fields["operation"] = operation
        if params:
            fields["params"] = _json_field("params", dict(params))
    else:
        if params:
            raise InvalidRequest("'params' goes with 'operation'; put step params in each step")
        step_list = [dict(step) for step in steps or ()]
        if not step_list:
            raise InvalidRequest("'steps' must list at least one step")
        for i, step in enumerate(step_list):
            if not isinstance(step.get("op"), str):
                raise InvalidRequest(f"steps[{i}] needs an 'op' naming the operation: {step!r}")
        fields["steps"] = _json_field("steps", step_list)
    if format is not None:
        fields["format"] = str(format)
    if quality is not None:
        fields["quality"] = str(int(quality))
    if expires_in is not None:
        fields["expires_in"] = str(int(expires_in))
    for name, flag in (("progressive", progressive), ("lossless", lossless)):
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidRequest(f"{name} must be true or false, got {flag!r}")
            fields[name] = "true" if flag else "false"
    for name, text in (("subsampling", subsampling), ("icc", icc), ("metadata", metadata)):
        if text is not None:
            fields[name] = str(text)
    return fields


def _json_field(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{name} cannot be sent as JSON: {exc}") from exc


class _ProgressPayload(aiohttp.Payload):
    """Bytes written in chunks, reporting (sent, total) after each one.

    Progress counts bytes handed to the transport (which applies back-pressure),
    a close enough measure of upload progress. aiohttp has no write timeout, so a
    peer that stops reading (a stopped process behind a proxy) would hold the upload
    forever: each chunk must be accepted within ``stall_timeout`` seconds.
    """

    _autoclose = True

    def __init__(
        self,
        value: bytes,
        *,
        on_progress: Callable[[int, int], None],
        stall_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(value, **kwargs)
        self._size = len(value)
        self._on_progress = on_progress
        self._stall_timeout = stall_timeout

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self._value.decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._value

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        if content_length is not None:
            view = view[:content_length]
        total = len(view)
        for start in range(0, total, _UPLOAD_CHUNK):
            chunk = view[start : start + _UPLOAD_CHUNK]
            try:
                async with asyncio.timeout(self._stall_timeout):
                    await writer.write(chunk)
            except TimeoutError:
                # aiohttp hands a TimeoutError from here to the response unchanged.
                raise TimeoutError(
                    f"upload stalled: the peer read nothing for {self._stall_timeout:g} s"
                ) from None
            self._on_progress(start + len(chunk), total)


def _multipart(
    fields: Mapping[str, str],
    image: bytes,
    filename: str,
    on_progress: Callable[[int, int], None],
    stall_timeout: float,
) -> aiohttp.MultipartWriter:
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields.items():
        part = writer.append(value, {"Content-Type": "text/plain; charset=utf-8"})
        part.set_content_disposition("form-data", name=name)
    content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    payload = _ProgressPayload(
        image, on_progress=on_progress, stall_timeout=stall_timeout, content_type=content_type
    )
    payload.set_content_disposition("form-data", name="image", filename=filename)
    writer.append_payload(payload)
    return writer


def _upload_filename(label: str, image: bytes | Path) -> str:
    """A plain ASCII file name for the form (the server only needs the bytes)."""
    candidate = image.name if isinstance(image, Path) else Path(label).name
    if candidate.isascii() and candidate.isprintable() and '"' not in candidate and candidate:
        return candidate
    suffix = Path(candidate).suffix
    return "image" + (suffix if suffix.isascii() else "")


async def _load_image(image: bytes | bytearray | Path | str) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from exc


def check_image_bytes(data: bytes, where: str) -> None:
    """Raise InvalidResponse unless ``data`` is an image Pillow can parse and verify."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
    except Image.DecompressionBombError:
        return  # a header this large parsed fine; the pixel count is the server's business
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidResponse(f"{where}: not a decodable image: {exc}") from exc


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


# --------------------------------------------------------------------------- request window


@dataclass
class _Slot:
    """One request's place in the window: the epoch it was sent in and how it ended."""

    epoch: int
    outcome: Literal["ok", "busy", "other"] = "other"


class _AdaptiveLimiter:
    """Admits requests while fewer than ``control.limit`` are in flight (FIFO waiters).

    The asyncio side of :class:`AdaptiveConcurrency`: each request holds a slot for
    one attempt (never while backing off) and reports how it ended, which moves the
    window. A smaller window only holds back new requests; those in flight finish.
    """

    def __init__(self, control: AdaptiveConcurrency) -> None:
        self.control = control
        self.inflight = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[_Slot]:
        await self._acquire()
        slot = _Slot(self.control.epoch)
        try:
            yield slot
        finally:
            self.inflight -= 1
            if slot.outcome == "ok":
                self.control.on_success()
            elif slot.outcome == "busy" and self.control.on_overload(slot.epoch):
                log.info("server busy: keeping at most %d requests in flight", self.control.limit)
            self._wake()

    async def _acquire(self) -> None:
        if not self._waiters and self.inflight < self.control.limit:
            self.inflight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # Granted just as we were cancelled: pass the slot on.
                self.inflight -= 1
                self._wake()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        while self._waiters and self.inflight < self.control.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.inflight += 1  # taken on the waiter's behalf, so nobody overtakes it
                waiter.set_result(None)


# --------------------------------------------------------------------------- the client


def pinned_context(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A TLS context that trusts exactly the certificate(s) in ``ca_file`` and nothing
    from the system store; host names are checked (the certificate names the endpoint)."""
    try:
        pem = Path(ca_file).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"CA file {ca_file}: {getattr(exc, 'strerror', None) or exc}") \
            from exc
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise InvalidRequest(f"CA file {ca_file} holds no PEM certificate")
    try:
        context = ssl.create_default_context(cadata=pem)
    except ssl.SSLError as exc:
        raise InvalidRequest(f"CA file {ca_file}: not a usable certificate ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ImageFleetClient:
    """Async client for one ImageFleet endpoint (a load balancer or one server).

    Use as an async context manager (it owns an aiohttp session). All methods are
    coroutines to be awaited on the loop that entered the context.

    ``endpoint``: base URL such as ``http://127.0.0.1:8000``. ``token``: sent as
    ``Authorization: Bearer`` to the endpoint. ``concurrency``: the most requests in
    flight at once (and jobs at once in a batch). ``timeout``/``retry``: see
    :class:`Timeout` and :class:`RetryPolicy`. ``rng``: random source for the
    backoff jitter (tests may pass a seeded one). ``ca_file``: the only certificate
    (PEM) the endpoint is trusted with (pinning, for a self-signed load balancer).
    """

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        *,
        concurrency: int = 4,
        ca_file: str | os.PathLike[str] | None = None,
        timeout: Timeout = Timeout(),  # frozen, so a shared default is safe
        retry: RetryPolicy = RetryPolicy(),
        rng: random.Random | None = None,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidRequest(
                f"endpoint must be an http:// or https:// URL with a host, got {endpoint!r}"
            )
        if concurrency < 1:
            raise InvalidRequest(f"concurrency must be >= 1, got {concurrency}")
        self.endpoint = endpoint.rstrip("/")
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry = retry
        self._token = token
        self._ca_file = ca_file
        self._pinned: ssl.SSLContext | None = None
        self._rng = rng or random.Random()
        self._limiter = _AdaptiveLimiter(AdaptiveConcurrency(concurrency))
        self._session: aiohttp.ClientSession | None = None

    # -- lifecycle

    async def __aenter__(self) -> ImageFleetClient:
        if self._session is not None:
            raise RuntimeError("this ImageFleetClient is already open")
        if self._ca_file is not None:
            self._pinned = pinned_context(self._ca_file)
        # The semaphore caps requests; the connector must not add a second, hidden cap.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=self.timeout.total,
                # DNS + TCP (+ TLS); the pool never makes anyone wait, having no limit.
                connect=self.timeout.connect,
                sock_connect=self.timeout.connect,
                sock_read=self.timeout.read,
            ),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session (idempotent)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- plumbing

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as 'async with ImageFleetClient(...) as client'")
        return self._session

    def _url(self, path: str) -> str:
        return self.endpoint + path

    def _tls(self, url: str) -> ssl.SSLContext | bool:
        """The pinned context for our own origin; default verification for the others."""
        if self._pinned is not None and _origin(url) == _origin(self.endpoint):
            return self._pinned
        return True

    def _headers(self, url: str) -> dict[str, str]:
        # Only our own origin gets the token; presigned S3 links must not carry it.
        if self._token and _origin(url) == _origin(self.endpoint):
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    @property
    def concurrency_limit(self) -> int:
        """Requests allowed in flight now: ``concurrency``, less while the servers are busy."""
        return self._limiter.control.limit

    async def _with_retries(
        self,
        what: str,
        attempt_once: Callable[[int], Awaitable[T]],
        *,
        policy: RetryPolicy | None = None,
        on_retry: Callable[[int, float, ClientError, bool], None] | None = None,
    ) -> tuple[T, int]:
        """Run ``attempt_once(attempt)`` in a window slot, retrying as the policy allows.

        Returns (value, attempts made). The last error is raised with ``attempts`` set
        (every HTTP attempt, back-pressure ones included).
        """
        policy = policy or self.retry
        attempt = 1
        faults = 0
        busy_since: float | None = None
        while True:
            async with self._limiter.slot() as slot:
                try:
                    with _mapped_transport_errors(what):
                        value = await attempt_once(attempt)
                except ClientError as exc:
                    error = exc
                    slot.outcome = "busy" if is_backpressure(exc) else "other"
                else:
                    slot.outcome = "ok"
                    return value, attempt
            error.attempts = attempt
            now = time.monotonic()
            busy = is_backpressure(error)
            if busy and busy_since is None:
                busy_since = now
            elif not busy:
                faults += 1
            step = next_retry(
                policy,
                error,
                faults=faults,
                busy_for=None if busy_since is None else now - busy_since,
                rand=self._rng.random(),
            )
            if not step.retry:
                if step.reason and busy:
                    # Say why a busy-but-working server still failed the request.
                    error.args = (f"{error.args[0]}; {step.reason}",)
                raise error
            log.info("%s failed (%s); attempt %d in %.2f s", what, error, attempt + 1, step.delay)
            if on_retry is not None:
                on_retry(attempt, step.delay, error, step.busy)
            await asyncio.sleep(step.delay)
            attempt += 1

    async def _get_json(self, path: str) -> dict[str, Any]:
        url = self._url(path)
        what = f"GET {url}"

        async def once(_attempt: int) -> dict[str, Any]:
            async with self._http.get(url, headers=self._headers(url),
                                      ssl=self._tls(url)) as resp:
                if resp.status >= 400:
                    raise await _server_error(resp)
                return await _read_json(resp, what)

        body, _ = await self._with_retries(what, once)
        return body

    async def _post_json(self, path: str, payload: Any) -> dict[str, Any]:
        url = self._url(path)
        what = f"POST {url}"

        async def once(_attempt: int) -> dict[str, Any]:
            async with self._http.post(url, json=payload, headers=self._headers(url),
                                       ssl=self._tls(url)) as resp:
                if resp.status >= 400:
                    raise await _server_error(resp)
                return await _read_json(resp, what)

        body, _ = await self._with_retries(what, once)
        return body

    # -- API

    async def health(self, *, retry: bool = False) -> Health:
        """``GET /health``. A draining server (503 with a health body) is returned, not raised.

        One attempt by default, since health is usually polled; ``retry=True`` applies
        the client's retry policy. A 503 without a health body (a balancer with no
        healthy target) raises ServerError.
        """
        policy = self.retry if retry else RetryPolicy(attempts=1, overload_patience=0)
        url = self._url("/health")
        what = f"GET {url}"

        async def once(_attempt: int) -> dict[str, Any]:
            async with self._http.get(url, headers=self._headers(url),
                                      ssl=self._tls(url)) as resp:
                if resp.status == 503:
                    # A draining server says so in a health body; a balancer with no
                    # healthy target answers a JSON error instead.
                    raw = await resp.read()
                    with contextlib.suppress(ValueError):
                        body = json.loads(raw)
                        if isinstance(body, dict) and "status" in body:
                            return body
                    raise await _server_error(resp)
                if resp.status >= 400:
                    raise await _server_error(resp)
                return await _read_json(resp, what)

        body, _ = await self._with_retries(what, once, policy=policy)
        return parse_health(body)

    async def operations(self) -> list[OperationSpec]:
        """``GET /operations``: what the servers can do and each parameter's type and range."""
        return parse_operations(await self._get_json("/operations"))

    async def process(
        self,
        image: bytes | Path,
        *,
        operation: str | None = None,
        params: Mapping[str, Any] | None = None,
        steps: Iterable[Mapping[str, Any]] | None = None,
        format: str | None = None,
        quality: int | None = None,
        expires_in: int | None = None,
        progress: ProgressCallback | None = None,
        name: str | None = None,
        progressive: bool | None = None,
        subsampling: str | None = None,
        lossless: bool | None = None,
        icc: str | None = None,
        metadata: str | None = None,
    ) -> ProcessResult:
        """``POST /process`` one image; returns the result's link and facts.

        ``image``: the encoded image (bytes) or a file path. Give ``operation`` (with
        optional ``params``) or ``steps`` (a list of ``{"op": name, **params}``).
        ``format``: ``png``, ``jpeg``, ``webp`` or ``avif`` (default: the input's),
        ``quality`` 1–100, ``expires_in``: link lifetime in seconds. ``progress`` gets
        ``uploading``/``processing``/``retrying`` and finally ``done`` or ``failed``.
        Encoder options (None: the server's default): ``progressive`` (JPEG),
        ``subsampling`` ``"4:4:4"``/``"4:2:2"``/``"4:2:0"`` (JPEG, AVIF), ``lossless``
        (WebP); ``icc`` ``"srgb"`` (convert to sRGB, the default) or ``"keep"`` (keep the
        embedded profile); ``metadata`` ``"strip"`` (default), ``"keep-no-location"`` or
        ``"keep"``.
        """
        job = Job(image, operation, params, _steps_tuple(steps), format, quality, expires_in, name,
                  progressive, subsampling, lossless, icc, metadata)
        report = _Reporter(progress, 0, job.label)
        try:
            result = await self._process_job(job, report)
        except ClientError as exc:
            report("failed", 0.0, exc.attempts, str(exc))
            raise
        report("done", 1.0, result.attempts)
        return result

    async def _process_job(self, job: Job, report: _Reporter) -> ProcessResult:
        fields = form_fields(
            operation=job.operation,
            params=job.params,
            steps=job.steps,
            format=job.format,
            quality=job.quality,
            expires_in=job.expires_in,
            progressive=job.progressive,
            subsampling=job.subsampling,
            lossless=job.lossless,
            icc=job.icc,
            metadata=job.metadata,
        )
        data = await _load_image(job.image)
        filename = _upload_filename(job.label, job.image)
        url = self._url("/process")
        what = f"POST {url}"
        started = time.monotonic()

        async def once(attempt: int) -> dict[str, Any]:
            def on_sent(sent: int, total: int) -> None:
                report("uploading", sent / total if total else 1.0, attempt)
                if sent >= total:
                    report("processing", 0.0, attempt)

            report("uploading", 0.0, attempt)
            body = _multipart(fields, data, filename, on_sent, self.timeout.read)
            async with self._http.post(url, data=body, headers=self._headers(url),
                                       ssl=self._tls(url)) as resp:
                if resp.status >= 400:
                    raise await _server_error(resp)
                return await _read_json(resp, what)

        body, attempts = await self._with_retries(what, once, on_retry=report.retrying)
        return parse_process_result(
            body,
            base_url=self.endpoint,
            elapsed_s=time.monotonic() - started,
            attempts=attempts,
        )

    async def download(
        self,
        url: str,
        *,
        expected_bytes: int | None = None,
        check_image: bool = True,
        progress: ProgressCallback | None = None,
        name: str = "download",
    ) -> bytes:
        """GET a result link and return its bytes, checked.

        Checks: the byte count equals ``Content-Length`` (else ConnectionLost, which
        is retried), equals ``expected_bytes`` when given, and (``check_image``) the
        bytes decode as an image (else InvalidResponse). An expired or tampered link
        raises ServerError 403. Sends the token only to the endpoint's own origin.
        """
        report = _Reporter(progress, 0, name)
        return await self._download(url, expected_bytes, check_image, report)

    async def download_result(
        self, result: ProcessResult, *, progress: ProgressCallback | None = None
    ) -> bytes:
        """Download ``result.url`` and check it against ``result.bytes``."""
        return await self.download(
            result.url, expected_bytes=result.bytes, progress=progress, name=result.key
        )

    async def _download(
        self, url: str, expected_bytes: int | None, check_image: bool, report: _Reporter
    ) -> bytes:
        what = f"GET {url.split('?', 1)[0]}"  # the query holds the signature: keep it out of logs
        headers = {**self._headers(url), "Accept-Encoding": "identity"}

        async def once(attempt: int) -> bytes:
            report("downloading", 0.0, attempt)
            # encoded=True: send the link byte for byte as it was signed (yarl would
            # otherwise re-quote it, e.g. %2F to / in a presigned S3 query).
            async with self._http.get(URL(url, encoded=True), headers=headers,
                                      ssl=self._tls(url)) as resp:
                if resp.status >= 400:
                    raise await _server_error(resp)
                declared = resp.content_length
                chunks = []
                received = 0
                async for chunk in resp.content.iter_chunked(_DOWNLOAD_CHUNK):
                    chunks.append(chunk)
                    received += len(chunk)
                    if declared:
                        report("downloading", min(1.0, received / declared), attempt)
                encoded = "Content-Encoding" in resp.headers
                if declared is not None and not encoded and received != declared:
                    raise ConnectionLost(
                        f"{what}: got {received} bytes, Content-Length says {declared}"
                    )
                return b"".join(chunks)

        data, attempts = await self._with_retries(what, once, on_retry=report.retrying)
        if expected_bytes is not None and len(data) != expected_bytes:
            error = InvalidResponse(
                f"{what}: got {len(data)} bytes, the server said the result has {expected_bytes}"
            )
            error.attempts = attempts
            raise error
        if check_image:
            check_image_bytes(data, what)
        return data

    async def iter_process(
        self,
        jobs: Iterable[Job],
        *,
        download: bool = False,
        progress: ProgressCallback | None = None,
    ) -> AsyncIterator[JobOutcome]:
        """Process many jobs, ``concurrency`` at a time; yield each outcome as it finishes.

        Failures become outcomes with ``error`` set: one job failing never stops the
        others. With ``download=True`` each result is downloaded and checked into
        ``outcome.data``. Progress events carry the job's index in ``jobs``. Jobs are
        pulled from the iterable lazily. Wrap in ``contextlib.aclosing`` if you may
        stop early, so the remaining work is cancelled promptly.
        """
        outcomes: asyncio.Queue[JobOutcome | None] = asyncio.Queue()
        source = enumerate(jobs)

        async def worker() -> None:
            try:
                # Workers share one iterator, so each job is taken exactly once.
                for index, job in source:
                    outcomes.put_nowait(await self._run_job(index, job, download, progress))
            finally:
                outcomes.put_nowait(None)

        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        try:
            running = len(workers)
            while running:
                outcome = await outcomes.get()
                if outcome is not None:
                    yield outcome
                    continue
                running -= 1
                _raise_worker_bug(workers)
            _raise_worker_bug(workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def process_many(
        self,
        jobs: Iterable[Job],
        *,
        download: bool = False,
        progress: ProgressCallback | None = None,
    ) -> list[JobOutcome]:
        """Like :meth:`iter_process`, but return all outcomes, in the order of ``jobs``."""
        results = []
        async with contextlib.aclosing(
            self.iter_process(jobs, download=download, progress=progress)
        ) as stream:
            async for outcome in stream:
                results.append(outcome)
        return sorted(results, key=lambda o: o.index)

    async def _run_job(
        self, index: int, job: Job, download: bool, progress: ProgressCallback | None
    ) -> JobOutcome:
        report = _Reporter(progress, index, job.label)
        result: ProcessResult | None = None
        try:
            result = await self._process_job(job, report)
            data = None
            if download:
                data = await self._download(result.url, result.bytes, True, report)
        except ClientError as exc:
            report("failed", 0.0, exc.attempts, str(exc))
            return JobOutcome(index, job, result, exc)
        report("done", 1.0, result.attempts)
        return JobOutcome(index, job, result, None, data)

    async def fleet(self) -> FleetState:
        """``GET /fleet`` on the fleet's admin address (the local gateway)."""
        return parse_fleet(await self._get_json("/fleet"))

    async def fleet_metrics(self, seconds: int = 900) -> dict[str, Any]:
        """``GET /fleet/metrics?seconds=N``: the manager's rolling window (samples,
        alerts, the events behind them) as the JSON the fleet sent."""
        body = await self._get_json(f"/fleet/metrics?seconds={int(seconds)}")
        if not isinstance(body, dict) or not isinstance(body.get("samples"), list):
            raise InvalidResponse("GET /fleet/metrics answer is not a metrics window")
        return body

    async def scale(self, desired: int) -> int:
        """``POST /fleet/scale {"desired": n}``; returns the desired count the fleet took.

        The fleet refuses (ServerError 400, naming its min..max) a count outside its
        range rather than clamping it. Retried like other requests: setting the desired
        count twice is harmless.
        """
        if isinstance(desired, bool) or not isinstance(desired, int) or desired < 0:
            raise InvalidRequest(f"desired must be a whole number >= 0, got {desired!r}")
        body = await self._post_json("/fleet/scale", {"desired": desired})
        return _Fields(body, "POST /fleet/scale answer").int("desired")

    async def terminate(self, instance_id: str) -> str:
        """``POST /fleet/instances/<id>/terminate``; returns the fleet's status for it.

        The manager replaces the instance first, then drains it (status
        ``"replacing"``). An unknown id raises ServerError 404.
        """
        if not instance_id:
            raise InvalidRequest("instance_id must not be empty")
        path = f"/fleet/instances/{quote(instance_id, safe='')}/terminate"
        body = await self._post_json(path, {})
        return _Fields(body, "POST /fleet/instances/<id>/terminate answer").str("status")


def _raise_worker_bug(workers: Iterable[asyncio.Task[None]]) -> None:
    """Re-raise what a finished batch worker died of: a bug must surface, not vanish."""
    for task in workers:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error


def _steps_tuple(
    steps: Iterable[Mapping[str, Any]] | None,
) -> tuple[Mapping[str, Any], ...] | None:
    return None if steps is None else tuple(steps)

