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
* **Validated answers**: every JSON answer is validated into the frozen wire models of
  :mod:`server.api`; a missing or mistyped field raises :class:`InvalidResponse`
  naming the field.
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

from gui.client.bodies import check_image_bytes, form_fields
from gui.client.client import ImageFleetClient
from gui.client.errors import (
    ClientError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    InvalidRequest,
    InvalidResponse,
    ReadTimeout,
    RequestTimeout,
    ServerError,
    TransportError,
)
from gui.client.models import (
    FleetEvent,
    FleetInstance,
    FleetState,
    Job,
    JobOutcome,
    Load,
    OperationSpec,
    ParamSpec,
    Phase,
    ProcessResult,
    ProgressCallback,
    ProgressEvent,
    ServerHealth,
)
from gui.client.parsing import parse_fleet, parse_health, parse_operations, parse_process_result
from gui.client.retry import (
    AdaptiveConcurrency,
    RetryPolicy,
    RetryStep,
    Timeout,
    backoff_delay,
    is_backpressure,
    is_retryable,
    next_retry,
)
from gui.client.transport import pinned_context

__all__ = [
    "AdaptiveConcurrency",
    "ClientError",
    "ConnectError",
    "ConnectTimeout",
    "ConnectionLost",
    "FleetEvent",
    "FleetInstance",
    "FleetState",
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
    "ServerHealth",
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
