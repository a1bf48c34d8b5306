"""The client itself: :class:`ImageFleetClient` (see :mod:`gui.client`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from gui.client.bodies import (
    _load_image,
    _multipart,
    _origin,
    _upload_filename,
    check_image_bytes,
    form_fields,
)
from gui.client.errors import (
    ClientError,
    ConnectionLost,
    InvalidRequest,
    InvalidResponse,
)
from gui.client.models import (
    FleetState,
    Job,
    JobOutcome,
    OperationSpec,
    ProcessResult,
    ProgressCallback,
    ServerHealth,
    _Reporter,
)
from gui.client.parsing import (
    parse_fleet,
    parse_health,
    parse_operations,
    parse_process_result,
    validate,
)
from gui.client.retry import (
    AdaptiveConcurrency,
    RetryPolicy,
    Timeout,
    _AdaptiveLimiter,
    is_backpressure,
    next_retry,
)
from gui.client.transport import (
    _json_answer,
    _mapped_transport_errors,
    _server_error,
    pinned_context,
)
from server.api import ScaleAnswer, TerminateAnswer

log = logging.getLogger(__name__)

T = TypeVar("T")

_DOWNLOAD_CHUNK = 64 * 1024


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
        timeout: Timeout = Timeout(),
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

    async def _call_json(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        """One API call with retries: send (``payload`` as a JSON body, if any), raise
        ServerError on an error status, return the JSON object answered."""
        url = self._url(path)
        what = f"{method} {url}"

        async def once(_attempt: int) -> dict[str, Any]:
            async with self._http.request(method, url, json=payload, headers=self._headers(url),
                                          ssl=self._tls(url)) as resp:
                return await _json_answer(resp, what)

        body, _ = await self._with_retries(what, once)
        return body

    # -- API

    async def health(self, *, retry: bool = False) -> ServerHealth:
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
                return await _json_answer(resp, what)

        body, _ = await self._with_retries(what, once, policy=policy)
        return parse_health(body)

    async def operations(self) -> list[OperationSpec]:
        """``GET /operations``: what the servers can do and each parameter's type and range."""
        return parse_operations(await self._call_json("GET", "/operations"))

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
                return await _json_answer(resp, what)

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
        return parse_fleet(await self._call_json("GET", "/fleet"))

    async def fleet_metrics(self, seconds: int = 900) -> dict[str, Any]:
        """``GET /fleet/metrics?seconds=N``: the manager's rolling window (samples,
        alerts, the events behind them) as the JSON the fleet sent."""
        body = await self._call_json("GET", f"/fleet/metrics?seconds={int(seconds)}")
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
        body = await self._call_json("POST", "/fleet/scale", {"desired": desired})
        return validate(ScaleAnswer, body, "POST /fleet/scale answer").desired

    async def terminate(self, instance_id: str) -> str:
        """``POST /fleet/instances/<id>/terminate``; returns the fleet's status for it.

        The manager replaces the instance first, then drains it (status
        ``"replacing"``). An unknown id raises ServerError 404.
        """
        if not instance_id:
            raise InvalidRequest("instance_id must not be empty")
        path = f"/fleet/instances/{quote(instance_id, safe='')}/terminate"
        body = await self._call_json("POST", path, {})
        return validate(TerminateAnswer, body,
                        "POST /fleet/instances/<id>/terminate answer").status


def _raise_worker_bug(workers: Iterable[asyncio.Task[None]]) -> None:
    """Re-raise what a finished batch worker died of: a bug must surface, not vanish."""
    for task in workers:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error


def _steps_tuple(
    steps: Iterable[Mapping[str, Any]] | None,
) -> tuple[Mapping[str, Any], ...] | None:
    return None if steps is None else tuple(steps)
