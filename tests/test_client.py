"""Tests for gui/client/ against real servers on loopback.

Retry, timeout and concurrency behaviours use small real aiohttp servers defined
here (real sockets, real HTTP), because they need answers a healthy processing
server never gives: 503 on demand, stalls, truncated bodies. The end-to-end tests
at the bottom run the real processing server (`python -m server` under waitress)
and a real local fleet (gateway + worker) for the admin calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp import web
from conftest import free_port
from waiting import wait_until

from fleet.tls import self_signed_certificate
from gui.client import (
    ClientError,
    ConnectError,
    ConnectionLost,
    ConnectTimeout,
    ImageFleetClient,
    InvalidRequest,
    InvalidResponse,
    Job,
    ProgressEvent,
    ReadTimeout,
    RetryPolicy,
    ServerError,
    Timeout,
    TransportError,
    backoff_delay,
    form_fields,
    is_retryable,
    parse_fleet,
    parse_operations,
    parse_process_result,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "testdata" / "images"
FAST_RETRY = RetryPolicy(attempts=3, backoff_base=0.01, backoff_max=0.05)


def png_bytes(width: int = 8, height: int = 6) -> bytes:
    image = np.arange(width * height * 3, dtype=np.uint8).reshape(height, width, 3)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


# --------------------------------------------------------------------------- loopback servers


@dataclass
class Stats:
    """What a loopback server saw; updated on its thread, read after a wait."""

    requests: int = 0
    current: int = 0
    max_current: int = 0
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    forms: list[dict[str, Any]] = field(default_factory=list)
    disconnected: int = 0


class LoopbackServer:
    """A real aiohttp server on 127.0.0.1, run on its own loop in a background thread.

    ``routes(server)`` returns the RouteTableDef; handlers may await ``server.released``
    (set at stop) to stall until the test ends.
    """

    def __init__(self, routes: Callable[[LoopbackServer], web.RouteTableDef], port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.stats = Stats()
        self._tls = tls
        self._routes = routes
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.released: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("loopback server did not start")
        if self.error:
            raise self.error
        return self

    def stop(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "loopback server did not stop"

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.released = asyncio.Event()
        app = web.Application(middlewares=[self._count])
        app.add_routes(self._routes(self))
        runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port, ssl_context=self._tls)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        except OSError as exc:  # e.g. the port is taken
            self.error = exc
            self._ready.set()
            await runner.cleanup()
            return
        self._ready.set()
        await self._stop.wait()
        self.released.set()
        await runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.current += 1
        stats.max_current = max(stats.max_current, stats.current)
        stats.paths.append(request.raw_path)
        stats.headers.append(dict(request.headers))
        try:
            return await handler(request)
        except asyncio.CancelledError:
            stats.disconnected += 1
            raise
        finally:
            stats.current -= 1


def result_json(base: str, **overrides: Any) -> dict[str, Any]:
    body = {
        "key": "abc123",
        "url": f"{base}/results/abc123.png?expires=1&signature=x",
        "expires_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "instance_id": "fake-1",
        "width": 8,
        "height": 6,
        "format": "png",
        "bytes": len(png_bytes()),
        "cached": False,
        "tiles": 1,
        "timings_ms": {"decode": 1.5, "process": 2, "encode": 0.5},
    }
    body.update(overrides)
    return body


def error_json(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def read_form(request: web.Request) -> dict[str, Any]:
    form: dict[str, Any] = {}
    for name, value in (await request.post()).items():
        if isinstance(value, web.FileField):
            form[name] = value.file.read()
            form["filename"] = value.filename
        else:
            form[name] = value
    return form


def flaky_routes(failures: int, status: int = 503, body: str | None = None):
    """POST /process fails `failures` times with `status`, then answers a result."""

    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            server.stats.forms.append(await read_form(request))
            if server.stats.requests <= failures:
                if body is not None:
                    return web.Response(status=status, text=body, content_type="text/html")
                return error_json(status, "draining", "server is draining")
            return web.json_response(result_json(server.url))

        @r.get("/results/{name}")
        async def results(_: web.Request) -> web.Response:
            return web.Response(body=png_bytes(), content_type="image/png")

        return r

    return routes


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def process_once(url: str, **kwargs: Any) -> Any:
    progress = kwargs.pop("progress", None)
    client_kwargs = {k: kwargs.pop(k) for k in ("retry", "timeout", "token") if k in kwargs}
    client_kwargs.setdefault("retry", FAST_RETRY)
    async with ImageFleetClient(url, **client_kwargs) as client:
        kwargs.setdefault("operation", "grayscale")
        return await client.process(png_bytes(), progress=progress, **kwargs)


# --------------------------------------------------------------------------- pure parts


def test_backoff_without_jitter_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=9, backoff_base=0.25, backoff_max=8.0, jitter=False)
    delays = [backoff_delay(policy, n, rand=0.5) for n in range(1, 9)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_full_jitter_scales_the_ceiling_and_respects_retry_after() -> None:
    policy = RetryPolicy(backoff_base=1.0, backoff_max=4.0, jitter=True)
    assert backoff_delay(policy, 3, rand=0.0) == 0.0
    assert backoff_delay(policy, 3, rand=0.5) == 2.0
    assert backoff_delay(policy, 10, rand=0.999) == pytest.approx(3.996)
    assert backoff_delay(policy, 1, rand=0.0, retry_after=2.5) == 2.5
    assert backoff_delay(policy, 1, rand=0.0, retry_after=60) == 4.0  # capped


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (ConnectError("refused"), True),
        (ConnectionLost("reset"), True),
        (ReadTimeout("slow"), True),
        (ServerError(502, "bad_gateway", "x"), True),
        (ServerError(503, "draining", "x"), True),
        (ServerError(503, "overloaded", "x", retry_after=1.0), True),
        (ServerError(429, "too_many_requests", "x"), True),
        (ServerError(504, "timeout", "x"), True),
        (ServerError(500, "internal", "x"), False),
        (ServerError(400, "bad_param", "x"), False),
        (ServerError(401, "unauthorized", "x"), False),
        (ServerError(413, "too_large", "x"), False),
        (ServerError(507, "insufficient_storage", "x"), False),
        (InvalidResponse("not json"), False),
    ],
)
def test_only_transport_errors_and_gateway_statuses_are_retried(
    error: Exception, retryable: bool
) -> None:
    assert is_retryable(error) is retryable  # type: ignore[arg-type]


def test_invalid_configuration_is_refused_with_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="attempts must be >= 1"):
        RetryPolicy(attempts=0)
    with pytest.raises(InvalidRequest, match="read must be > 0"):
        Timeout(read=0)
    with pytest.raises(InvalidRequest, match="http:// or https://"):
        ImageFleetClient("ftp://example")
    with pytest.raises(InvalidRequest, match="concurrency must be >= 1"):
        ImageFleetClient("http://127.0.0.1:1", concurrency=0)


def test_form_fields_encode_operation_params_and_options() -> None:
    fields = form_fields(
        operation="blur", params={"ksize": 5}, steps=None, format="webp", quality=80,
        expires_in=600,
    )
    assert fields == {
        "operation": "blur", "params": '{"ksize": 5}', "format": "webp", "quality": "80",
        "expires_in": "600",
    }
    steps = form_fields(
        operation=None, params=None, steps=[{"op": "grayscale"}, {"op": "blur", "ksize": 3}],
        format=None, quality=None, expires_in=None,
    )
    assert json.loads(steps["steps"]) == [{"op": "grayscale"}, {"op": "blur", "ksize": 3}]
    encoded = form_fields(
        operation="invert", params=None, steps=None, format="jpeg", quality=None,
        expires_in=None, progressive=True, subsampling="4:4:4", lossless=False, icc="keep",
        metadata="keep-no-location",
    )
    assert encoded == {"operation": "invert", "format": "jpeg", "progressive": "true",
                       "subsampling": "4:4:4", "lossless": "false", "icc": "keep",
                       "metadata": "keep-no-location"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"operation": None, "steps": None}, "exactly one of 'operation' or 'steps'"),
        ({"operation": "blur", "steps": [{"op": "x"}]}, "exactly one"),
        ({"operation": None, "steps": []}, "at least one step"),
        ({"operation": None, "steps": [{"ksize": 3}]}, r"steps\[0\] needs an 'op'"),
        ({"operation": "blur", "params": {"k": object()}}, "cannot be sent as JSON"),
        ({"operation": "blur", "progressive": "yes"}, "progressive must be true or false"),
    ],
)
def test_form_fields_refuse_misuse(kwargs: dict[str, Any], message: str) -> None:
    args = {"operation": None, "params": None, "steps": None, "format": None, "quality": None,
            "expires_in": None, **kwargs}
    with pytest.raises(InvalidRequest, match=message):
        form_fields(**args)


def test_parse_process_result_types_every_field() -> None:
    body = result_json("http://h:1", expires_at="2030-01-02T03:04:05", url="/results/k?x=1")
    result = parse_process_result(body, base_url="http://h:1", elapsed_s=0.5, attempts=2)
    assert result.url == "http://h:1/results/k?x=1"
    assert result.expires_at == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert result.timings_ms == {"decode": 1.5, "process": 2.0, "encode": 0.5}
    assert (result.width, result.height, result.tiles, result.cached) == (8, 6, 1, False)
    assert result.attempts == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": None}, "field 'width' should be an integer"),
        ({"width": "8"}, "field 'width' should be an integer"),
        ({"tiles": True}, "field 'tiles' should be an integer"),
        ({"cached": "no"}, "field 'cached' should be true or false"),
        ({"expires_at": "soon"}, "field 'expires_at' is not a valid time"),
        ({"timings_ms": {"x": "1"}}, r"timings_ms\['x'\] should be a number"),
    ],
)
def test_parse_process_result_names_the_bad_field(change: dict[str, Any], message: str) -> None:
    body = {**result_json("http://h"), **change}
    with pytest.raises(InvalidResponse, match=message):
        parse_process_result(body, base_url="", elapsed_s=0, attempts=1)


def test_parse_process_result_reports_a_missing_field() -> None:
    body = result_json("http://h")
    del body["instance_id"]
    with pytest.raises(InvalidResponse, match="missing field 'instance_id'"):
        parse_process_result(body, base_url="", elapsed_s=0, attempts=1)


def test_parse_operations_and_fleet() -> None:
    ops = parse_operations({"operations": [{
        "name": "blur", "title": "Blur", "description": "Gaussian blur", "tileable": True,
        "params": [{"name": "ksize", "type": "int", "default": 5, "min": 1, "max": 99,
                    "choices": None},
                   {"name": "mode", "type": "choice", "default": "a", "choices": ["a", "b"]}],
    }]})
    assert ops[0].param("ksize").max == 99  # type: ignore[union-attr]
    assert ops[0].param("mode").choices == ("a", "b")  # type: ignore[union-attr]
    with pytest.raises(InvalidResponse, match=r"operations\[0\]: missing field 'tileable'"):
        parse_operations({"operations": [{"name": "x", "title": "", "description": "",
                                          "params": []}]})
    fleet = parse_fleet({
        "name": "local", "provider": "local", "desired": 2, "min": 1, "max": 3,
        "instances": [{"id": "w1", "state": "running", "health": "healthy",
                       "address": "127.0.0.1:9", "inflight": 0, "launched_at": 1700000000.0},
                      {"id": "w2", "state": "pending", "health": "initial", "address": None,
                       "inflight": 0, "launched_at": "2026-01-01T00:00:00+00:00"}],
        "events": [{"at": "2026-01-01T00:00:01Z", "kind": "launch", "instance_id": "w2",
                    "message": "launched"}],
    })
    assert fleet.instances[1].address is None
    assert fleet.instances[0].launched_at == datetime.fromtimestamp(1700000000, tz=UTC)
    assert fleet.events[0].kind == "launch"
    with pytest.raises(InvalidResponse, match="missing field 'desired'"):
        parse_fleet({"name": "x", "provider": "local", "instances": [], "events": []})


# --------------------------------------------------------------------------- retries


def test_503_is_retried_with_backoff_until_the_server_answers() -> None:
    events: list[ProgressEvent] = []
    with LoopbackServer(flaky_routes(failures=2)) as server:
        result = run(process_once(server.url, progress=events.append,
                                  retry=RetryPolicy(attempts=5, backoff_base=0.01)))
    assert server.stats.requests == 3
    assert result.attempts == 3
    assert result.instance_id == "fake-1"
    retries = [e for e in events if e.phase == "retrying"]
    assert [e.attempt for e in retries] == [1, 2]
    assert "503 draining: server is draining" in retries[0].message
    assert events[-1].phase == "done"


def test_retries_stop_at_the_limit_and_surface_the_last_server_error() -> None:
    server = LoopbackServer(flaky_routes(failures=100))
    with server, pytest.raises(ServerError) as caught:
        run(process_once(server.url, retry=RetryPolicy(attempts=4, backoff_base=0.01)))
    assert server.stats.requests == 4
    error = caught.value
    assert (error.status, error.code, error.message, error.attempts) == (
        503, "draining", "server is draining", 4)
    assert "after 4 attempts" in str(error)


def test_a_502_html_page_from_a_proxy_becomes_a_server_error() -> None:
    page = "<html><body>502 Bad Gateway</body></html>"
    server = LoopbackServer(flaky_routes(failures=100, status=502, body=page))
    with server, pytest.raises(ServerError) as caught:
        run(process_once(server.url))
    assert server.stats.requests == FAST_RETRY.attempts
    assert caught.value.code == "http_502"
    assert "502 Bad Gateway" in caught.value.message


@pytest.mark.parametrize("status", [400, 401, 413, 415, 500, 507])
def test_client_errors_and_500_are_not_retried(status: int) -> None:
    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            return error_json(status, "bad_param", "ksize must be odd, between 1 and 99")

        return r

    server = LoopbackServer(routes)
    with server, pytest.raises(ServerError) as caught:
        run(process_once(server.url, retry=RetryPolicy(attempts=5, backoff_base=0.01)))
    assert server.stats.requests == 1
    assert caught.value.status == status
    assert caught.value.message == "ksize must be odd, between 1 and 99"
    assert caught.value.attempts == 1


def test_retry_after_is_honoured() -> None:
    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            if server.stats.requests == 1:
                response = error_json(503, "draining", "later")
                response.headers["Retry-After"] = "0.4"
                return response
            return web.json_response(result_json(server.url))

        return r

    with LoopbackServer(routes) as server:
        started = time.monotonic()
        run(process_once(server.url, retry=RetryPolicy(attempts=3, backoff_base=0.001)))
        assert time.monotonic() - started >= 0.4
    assert server.stats.requests == 2


def test_connection_refused_is_retried_up_to_the_limit() -> None:
    port = free_port()  # nothing listens here
    events: list[ProgressEvent] = []
    with pytest.raises(ConnectError) as caught:
        run(process_once(f"http://127.0.0.1:{port}", progress=events.append))
    assert caught.value.attempts == FAST_RETRY.attempts
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)
    assert [e.phase for e in events].count("retrying") == FAST_RETRY.attempts - 1
    assert events[-1].phase == "failed"


def test_a_server_that_starts_late_is_reached_by_a_retry() -> None:
    port = free_port()
    server = LoopbackServer(flaky_routes(failures=0), port=port)
    starter = threading.Thread(target=server.start)

    def on_progress(event: ProgressEvent) -> None:
        # The first refusal starts the server; later attempts must find it.
        if event.phase == "retrying" and not starter.is_alive() and not server.port:
            starter.start()

    try:
        result = run(process_once(
            f"http://127.0.0.1:{port}", progress=on_progress,
            retry=RetryPolicy(attempts=10, backoff_base=0.05, backoff_max=1.0),
        ))
        assert result.attempts >= 2
        assert server.stats.requests == 1
    finally:
        starter.join(10)
        server.stop()


# --------------------------------------------------------------------------- timeouts


def stalling_routes(server: LoopbackServer) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.post("/process")
    async def process(request: web.Request) -> web.Response:
        await request.read()
        assert server.released is not None
        await server.released.wait()
        return web.json_response({})

    @r.get("/results/{name}")
    async def half_body(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000"})
        await response.prepare(request)
        await response.write(b"\x89PNG" + b"x" * 10)
        assert server.released is not None
        await server.released.wait()
        return response

    return r


def test_read_timeout_is_honoured_and_retried() -> None:
    with LoopbackServer(stalling_routes) as server:
        started = time.monotonic()
        with pytest.raises(ReadTimeout) as caught:
            run(process_once(server.url, timeout=Timeout(connect=2, read=0.3),
                             retry=RetryPolicy(attempts=2, backoff_base=0.01)))
        elapsed = time.monotonic() - started
    assert caught.value.attempts == 2
    assert server.stats.requests == 2
    assert 0.6 <= elapsed < 5


def test_an_upload_to_a_peer_that_stops_reading_times_out() -> None:
    # A listening socket that never accepts: the kernel completes the handshake and
    # buffers what it can, then the window closes and the upload stalls.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"

        async def scenario() -> None:
            async with ImageFleetClient(url, timeout=Timeout(connect=2, read=0.5),
                                        retry=RetryPolicy(attempts=1)) as client:
                await client.process(b"\0" * (64 * 1024 * 1024), operation="grayscale")

        started = time.monotonic()
        with pytest.raises(ReadTimeout, match="upload stalled"):
            run(scenario())
    assert time.monotonic() - started < 10


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full "
                    "accept queue")
def test_connect_timeout_is_honoured() -> None:
    # backlog 0 holds one unaccepted connection; once it is full, Linux drops further
    # SYNs, so the client's connect hangs until its own timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(2)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            _, connected, _ = select.select([], fillers[:1], [], 5)
            assert connected, "the first filler connection never completed"

            async def scenario() -> None:
                async with ImageFleetClient(f"http://127.0.0.1:{port}",
                                            timeout=Timeout(connect=0.3, read=5),
                                            retry=RetryPolicy(attempts=2,
                                                              backoff_base=0.01)) as client:
                    await client.operations()

            started = time.monotonic()
            with pytest.raises(ConnectTimeout) as caught:
                run(scenario())
            elapsed = time.monotonic() - started
        finally:
            for filler in fillers:
                filler.close()
    assert caught.value.attempts == 2
    assert "timed out while connecting" in str(caught.value)
    assert 0.6 <= elapsed < 5


def test_a_download_that_stalls_mid_body_times_out() -> None:
    async def scenario(url: str) -> None:
        async with ImageFleetClient(url, timeout=Timeout(read=0.3),
                                    retry=RetryPolicy(attempts=1)) as client:
            await client.download(f"{url}/results/x.png")

    with LoopbackServer(stalling_routes) as server, pytest.raises(ReadTimeout):
        run(scenario(server.url))


# --------------------------------------------------------------------------- downloads


def download_routes(server: LoopbackServer) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.get("/good.png")
    async def good(_: web.Request) -> web.Response:
        return web.Response(body=png_bytes(), content_type="image/png")

    @r.get("/garbage.png")
    async def garbage(_: web.Request) -> web.Response:
        return web.Response(body=b"not an image at all", content_type="image/png")

    @r.get("/short.png")
    async def short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "5000"})
        await response.prepare(request)
        await response.write(png_bytes()[:50])
        request.transport.close()  # type: ignore[union-attr]  # die mid-body
        return response

    @r.get("/expired.png")
    async def expired(_: web.Request) -> web.Response:
        return error_json(403, "link_expired", "this link expired")

    return r


def test_download_checks_size_and_decodability() -> None:
    async def scenario(url: str) -> dict[str, Any]:
        outcomes: dict[str, Any] = {}
        async with ImageFleetClient(url, retry=FAST_RETRY) as client:
            outcomes["good"] = await client.download(f"{url}/good.png")
            for name, kwargs in [("garbage", {}), ("short", {}), ("expired", {}),
                                 ("wrong_size", {"expected_bytes": 3})]:
                path = "good" if name == "wrong_size" else name
                try:
                    await client.download(f"{url}/{path}.png", **kwargs)
                except ClientError as exc:
                    outcomes[name] = exc
        return outcomes

    with LoopbackServer(download_routes) as server:
        out = run(scenario(server.url))
        paths = server.stats.paths
    assert out["good"] == png_bytes()
    assert isinstance(out["garbage"], InvalidResponse)
    assert "not a decodable image" in str(out["garbage"])
    assert paths.count("/garbage.png") == 1  # a bad image is not retried
    assert isinstance(out["short"], ConnectionLost)
    assert paths.count("/short.png") == FAST_RETRY.attempts  # a cut transfer is
    assert isinstance(out["expired"], ServerError)
    assert (out["expired"].status, out["expired"].code) == (403, "link_expired")
    assert isinstance(out["wrong_size"], InvalidResponse)
    assert "server said the result has 3" in str(out["wrong_size"])


def test_invalid_json_answers_raise_invalid_response() -> None:
    def routes(_: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.get("/operations")
        async def operations(_: web.Request) -> web.Response:
            return web.Response(text="<html>hello</html>", content_type="text/html")

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"key": "k"})

        return r

    async def scenario(url: str) -> tuple[Exception, Exception]:
        async with ImageFleetClient(url, retry=FAST_RETRY) as client:
            with pytest.raises(InvalidResponse) as not_json:
                await client.operations()
            with pytest.raises(InvalidResponse) as missing:
                await client.process(png_bytes(), operation="x")
        return not_json.value, missing.value

    with LoopbackServer(routes) as server:
        not_json, missing = run(scenario(server.url))
    assert "answer is not JSON" in str(not_json)
    assert "POST /process answer: missing field" in str(missing)


# --------------------------------------------------------------------------- requests


def echo_routes(server: LoopbackServer) -> web.RouteTableDef:
    r = web.RouteTableDef()

    @r.post("/process")
    async def process(request: web.Request) -> web.Response:
        form = await read_form(request)
        server.stats.forms.append(form)
        if form.get("operation") == "fail":
            return error_json(400, "unknown_operation", "unknown operation 'fail'")
        return web.json_response(result_json(server.url, key=f"k{len(server.stats.forms)}"))

    @r.get("/results/{name}")
    async def results(_: web.Request) -> web.Response:
        return web.Response(body=png_bytes(), content_type="image/png")

    return r


def test_upload_sends_the_designed_form_with_the_token(tmp_path: Path) -> None:
    image = (IMAGES / "astronaut.png").read_bytes()
    source = tmp_path / "astronaut.png"
    source.write_bytes(image)
    events: list[ProgressEvent] = []

    async def scenario(url: str) -> None:
        async with ImageFleetClient(url, token="s3cret") as client:
            await client.process(source, operation="blur", params={"ksize": 5}, format="jpeg",
                                 quality=90, expires_in=120, progress=events.append)
            await client.process(image, steps=[{"op": "grayscale"}, {"op": "invert"}])

    with LoopbackServer(echo_routes) as server:
        run(scenario(server.url))
    first, second = server.stats.forms
    assert first["image"] == image
    assert first["filename"] == "astronaut.png"
    assert (first["operation"], json.loads(first["params"])) == ("blur", {"ksize": 5})
    assert (first["format"], first["quality"], first["expires_in"]) == ("jpeg", "90", "120")
    assert "steps" not in first
    assert json.loads(second["steps"]) == [{"op": "grayscale"}, {"op": "invert"}]
    assert "operation" not in second
    assert all(h["Authorization"] == "Bearer s3cret" for h in server.stats.headers)

    uploads = [e.fraction for e in events if e.phase == "uploading"]
    assert len(uploads) > 3  # the image is several 64 KiB chunks
    assert uploads == sorted(uploads)
    assert uploads[-1] == 1.0
    phases = [e.phase for e in events]
    assert phases.index("processing") > phases.index("uploading")
    assert phases[-1] == "done"
    assert {e.name for e in events} == {"astronaut.png"}


def test_an_unreadable_input_fails_before_sending(tmp_path: Path) -> None:
    server = LoopbackServer(echo_routes)
    with server, pytest.raises(InvalidRequest, match=r"cannot read .*missing\.png"):
        run(_process_path(server.url, tmp_path / "missing.png"))
    assert server.stats.requests == 0


async def _process_path(url: str, path: Path) -> Any:
    async with ImageFleetClient(url) as client:
        return await client.process(path, operation="grayscale")


def test_links_are_fetched_verbatim_and_the_token_stays_with_its_origin() -> None:
    presigned = "/good.png?X-Amz-Credential=AKIA%2F20260101%2Fus-east-1&X-Amz-Signature=a%3Db"

    async def scenario(api: str, other: str) -> None:
        async with ImageFleetClient(api, token="s3cret") as client:
            await client.download(f"{api}/good.png")
            await client.download(f"{other}{presigned}")  # like a presigned S3 link

    with LoopbackServer(download_routes) as api, LoopbackServer(download_routes) as other:
        run(scenario(api.url, other.url))
    assert api.stats.headers[0].get("Authorization") == "Bearer s3cret"
    assert "Authorization" not in other.stats.headers[0]
    assert other.stats.paths == [presigned]  # not re-quoted: a signature covers these bytes


# --------------------------------------------------------------------------- batches


def gated_routes(limit: int):
    """Each request waits until `limit` requests are in flight at once (or 2 s pass)."""

    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()
        full = asyncio.Event()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            if server.stats.current >= limit:
                full.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(full.wait(), 2.0)
            return web.json_response(result_json(server.url))

        @r.get("/results/{name}")
        async def results(_: web.Request) -> web.Response:
            return web.Response(body=png_bytes(), content_type="image/png")

        return r

    return routes


def test_bounded_concurrency_is_reached_and_never_exceeded() -> None:
    async def scenario(url: str) -> list[Any]:
        async with ImageFleetClient(url, concurrency=3, retry=FAST_RETRY) as client:
            jobs = [Job(png_bytes(), operation="grayscale", name=f"img{i}") for i in range(12)]
            return await client.process_many(jobs, download=True)

    with LoopbackServer(gated_routes(limit=3)) as server:
        started = time.monotonic()
        outcomes = run(scenario(server.url))
        elapsed = time.monotonic() - started
    assert all(o.ok for o in outcomes)
    assert all(o.data == png_bytes() for o in outcomes)
    assert server.stats.max_current == 3
    assert server.stats.requests == 24  # 12 uploads + 12 downloads
    assert elapsed < 6.0  # the gate opened at 3, so nobody waited out its 2 s deadline


def test_one_failing_job_does_not_stop_the_others() -> None:
    jobs = [Job(png_bytes(), operation=op, name=f"j{i}")
            for i, op in enumerate(["grayscale", "fail", "grayscale", "grayscale"])]
    events: list[ProgressEvent] = []

    async def scenario(url: str) -> list[Any]:
        async with ImageFleetClient(url, concurrency=2, retry=FAST_RETRY) as client:
            return await client.process_many(jobs, progress=events.append)

    with LoopbackServer(echo_routes) as server:
        outcomes = run(scenario(server.url))
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert [o.ok for o in outcomes] == [True, False, True, True]
    assert isinstance(outcomes[1].error, ServerError)
    assert outcomes[1].error.code == "unknown_operation"
    assert server.stats.requests == 4
    failed = [e for e in events if e.phase == "failed"]
    assert [(e.index, e.name) for e in failed] == [(1, "j1")]
    assert sorted(e.index for e in events if e.phase == "done") == [0, 2, 3]


def test_a_bug_in_a_progress_callback_surfaces_instead_of_vanishing() -> None:
    def broken(event: ProgressEvent) -> None:
        if event.phase == "done":
            raise ValueError("bug in the caller's callback")

    async def scenario(url: str) -> None:
        async with ImageFleetClient(url, concurrency=2) as client:
            jobs = [Job(png_bytes(), operation="grayscale") for _ in range(4)]
            with pytest.raises(ValueError, match="bug in the caller's callback"):
                await client.process_many(jobs, progress=broken)
            assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    with LoopbackServer(echo_routes) as server:
        run(scenario(server.url))


def test_cancelling_a_batch_cancels_its_requests() -> None:
    with LoopbackServer(stalling_routes) as server:

        async def scenario() -> None:
            async with ImageFleetClient(server.url, concurrency=3) as client:
                jobs = [Job(png_bytes(), operation="grayscale") for _ in range(10)]
                task = asyncio.create_task(client.process_many(jobs))
                deadline = time.monotonic() + 5
                while server.stats.current < 3:
                    assert time.monotonic() < deadline, "requests never arrived"
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

        run(scenario())
        wait_until(lambda: server.stats.current == 0, timeout=5)
    assert server.stats.requests == 3
    assert server.stats.disconnected == 3


# --------------------------------------------------------------------------- health and fleet


def admin_routes(server: LoopbackServer) -> web.RouteTableDef:
    r = web.RouteTableDef()
    state = {"desired": 2}

    def fleet_body() -> dict[str, Any]:
        return {"name": "local", "provider": "local", "desired": state["desired"], "min": 1,
                "max": 4, "instances": [{"id": "w 1/a", "state": "running", "health": "healthy",
                                         "address": "127.0.0.1:9", "inflight": 1,
                                         "launched_at": "2026-01-01T00:00:00Z"}],
                "events": []}

    @r.get("/health")
    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "draining", "instance_id": "w1", "inflight": 2,
                                  "processed": 7, "uptime_s": 1.5, "version": "0.1"}, status=503)

    @r.get("/fleet")
    async def fleet(_: web.Request) -> web.Response:
        return web.json_response(fleet_body())

    @r.post("/fleet/scale")
    async def scale(request: web.Request) -> web.Response:
        body = await request.json()
        server.stats.forms.append(body)
        state["desired"] = body["desired"]
        return web.json_response({"desired": body["desired"], "min": 1, "max": 4})

    @r.post("/fleet/instances/{instance_id}/terminate")
    async def terminate(request: web.Request) -> web.Response:
        server.stats.forms.append({"terminated": request.match_info["instance_id"]})
        return web.json_response({"instance_id": "w 1/a", "status": "replacing"}, status=202)

    return r


def test_health_and_fleet_admin_calls() -> None:
    async def scenario(url: str) -> tuple[Any, ...]:
        async with ImageFleetClient(url) as client:
            health = await client.health()
            fleet = await client.fleet()
            scaled = await client.scale(3)
            status = await client.terminate("w 1/a")
            with pytest.raises(InvalidRequest):
                await client.scale(-1)
        return health, fleet, scaled, status

    with LoopbackServer(admin_routes) as server:
        health, fleet, scaled, status = run(scenario(server.url))
    assert (health.status, health.ok, health.processed) == ("draining", False, 7)
    assert fleet.instances[0].health == "healthy"
    assert (scaled, status) == (3, "replacing")
    assert server.stats.forms == [{"desired": 3}, {"terminated": "w 1/a"}]


def test_health_from_a_balancer_without_targets_is_a_server_error() -> None:
    def routes(_: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.get("/health")
        async def health(_: web.Request) -> web.Response:
            return error_json(503, "no_healthy_target", "no healthy instance")

        return r

    async def scenario(url: str) -> None:
        async with ImageFleetClient(url) as client:
            await client.health()

    with LoopbackServer(routes) as server, pytest.raises(ServerError, match="no healthy"):
        run(scenario(server.url))


# --------------------------------------------------------------------------- the real server

@pytest.fixture(scope="module")
def server_url(module_server_process: Any) -> str:
    """A real `python -m server` under waitress (tests/conftest.py), shared by the module."""
    return module_server_process().url


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., 0]


def decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image


def test_real_server_grayscale_matches_opencv(server_url: str) -> None:
    source = IMAGES / "astronaut.png"

    async def scenario() -> tuple[Any, bytes, list[Any], Any]:
        async with ImageFleetClient(server_url) as client:
            ops = await client.operations()
            result = await client.process(source, operation="grayscale", format="png")
            data = await client.download_result(result)
            again = await client.process(source, operation="grayscale", format="png")
        return result, data, ops, again

    result, data, ops, again = run(scenario())
    assert "grayscale" in {op.name for op in ops}
    ksize = next(op for op in ops if op.name == "gaussian_blur").param("ksize")
    assert ksize.odd is True and ksize.description  # kernel sizes must be odd
    expected = cv2.cvtColor(cv2.imread(str(source), cv2.IMREAD_COLOR), cv2.COLOR_BGR2GRAY)
    got = decode(data)
    if got.ndim == 3:
        got = got[..., 0]
    np.testing.assert_array_equal(got, expected)
    assert (result.width, result.height, result.format) == (512, 512, "png")
    assert result.bytes == len(data)
    assert result.expires_at > datetime.now(UTC)
    assert again.key == result.key
    assert again.cached is True


def test_a_retried_post_after_a_lost_answer_is_a_cache_hit(server_url: str) -> None:
    """A gateway that forwards the first POST but loses the answer (502): the client's
    retry reaches the server again, which serves the stored result instead of redoing it."""
    upstream_answers: list[dict[str, Any]] = []

    def proxy_routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            body = await request.read()
            headers = {"Content-Type": request.headers["Content-Type"]}
            async with aiohttp.ClientSession() as session, session.post(
                f"{server_url}/process", data=body, headers=headers
            ) as upstream:
                answer = await upstream.json()
            upstream_answers.append(answer)
            if len(upstream_answers) == 1:
                return error_json(502, "bad_gateway", "upstream answer lost")
            return web.json_response(answer)

        return r

    source = IMAGES / "coffee.png"
    events: list[ProgressEvent] = []

    async def scenario(url: str) -> Any:
        async with ImageFleetClient(url, retry=FAST_RETRY) as client:
            return await client.process(source, operation="sepia", params={"strength": 0.7},
                                        progress=events.append)

    with LoopbackServer(proxy_routes) as proxy:
        result = run(scenario(proxy.url))
    first, second = upstream_answers
    assert first["cached"] is False  # the lost attempt did the work...
    assert second["cached"] is True  # ...and the retry found it stored
    assert result.attempts == 2
    assert result.cached is True
    assert result.key == first["key"]
    assert [e.phase for e in events].count("retrying") == 1


def test_real_server_batch_of_every_test_image(server_url: str) -> None:
    sources = sorted(IMAGES.iterdir())

    async def scenario() -> list[Any]:
        async with ImageFleetClient(server_url, concurrency=3) as client:
            jobs = [Job(path, operation="invert", format="png") for path in sources]
            return await client.process_many(jobs, download=True)

    outcomes = run(scenario())
    assert [o.error for o in outcomes] == [None] * len(sources)
    for outcome, path in zip(outcomes, sources, strict=True):
        source = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert decode(outcome.data).shape[:2] == source.shape[:2]


def test_real_server_bad_requests_are_not_retried_and_explain_themselves(
    server_url: str,
) -> None:
    async def scenario() -> tuple[ServerError, ServerError, int, int]:
        async with ImageFleetClient(server_url, retry=RetryPolicy(attempts=5)) as client:
            before = (await client.health()).processed
            with pytest.raises(ServerError) as unknown:
                await client.process(png_bytes(), operation="no_such_op")
            with pytest.raises(ServerError) as not_image:
                await client.process(b"definitely not an image", operation="grayscale")
            after = (await client.health()).processed
        return unknown.value, not_image.value, before, after

    unknown, not_image, before, after = run(scenario())
    assert unknown.status == 400
    assert unknown.attempts == 1
    assert "grayscale" in unknown.message  # names the valid operations
    assert not_image.status == 415
    assert not_image.attempts == 1
    assert after == before  # nothing was processed, so nothing was retried into success


@pytest.mark.slow
def test_through_a_local_fleet_gateway_with_admin_calls(tmp_path: Path) -> None:
    from fleet.local.runtime import LocalFleet

    async def scenario(endpoint: str, token: str) -> tuple[Any, ...]:
        # The admin routes that change state need the fleet's admin token (issue 11).
        async with ImageFleetClient(endpoint, token=token) as client:
            # The gateway may see the worker healthy before the manager's next observation.
            deadline = time.monotonic() + 30
            state = await client.fleet()
            while [i.health for i in state.instances] != ["healthy"]:
                assert time.monotonic() < deadline, f"never healthy: {state.instances}"
                await asyncio.sleep(0.1)
                state = await client.fleet()
            desired = await client.scale(1)
            with pytest.raises(ServerError) as out_of_range:
                await client.scale(5)
            with pytest.raises(ServerError) as unknown:
                await client.terminate("no-such-worker")
            result = await client.process(IMAGES / "camera.png", operation="invert")
            data = await client.download_result(result)
        return state, desired, out_of_range.value, unknown.value, result, data

    with LocalFleet(workers=1, storage_dir=tmp_path / "storage") as fleet:
        state, desired, out_of_range, unknown, result, data = run(
            scenario(fleet.endpoint, fleet.admin_token))
    assert (state.provider, state.desired, state.min, state.max) == ("local", 1, 1, 1)
    assert [i.health for i in state.instances] == ["healthy"]
    assert state.instances[0].launched_at is not None
    assert desired == 1
    assert out_of_range.status == 400 and "1..1" in out_of_range.message
    assert unknown.status == 404 and state.instances[0].id in unknown.message
    assert result.instance_id == state.instances[0].id
    camera = cv2.imread(str(IMAGES / "camera.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(gray(decode(data)), 255 - gray(camera))


# --------------------------------------------------------------------------- TLS pinning


def _tls_server_context(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a fresh self-signed certificate for 127.0.0.1 and
    localhost, and the certificate's PEM file (what a client pins)."""
    made = self_signed_certificate(("127.0.0.1", "localhost"))
    cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    cert.write_text(made.certificate_pem)
    key.write_text(made.private_key_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, cert


def operations_routes(_server: LoopbackServer) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get("/operations")
    async def operations(_request: web.Request) -> web.Response:
        return web.json_response({"operations": []})

    return routes


def test_the_pinned_certificate_is_trusted_and_any_other_refused(tmp_path: Path) -> None:
    first, first_pem = _tls_server_context(tmp_path, "first")
    second, _ = _tls_server_context(tmp_path, "second")  # same names, another key

    async def operations(url: str, ca_file: Path | None) -> Any:
        async with ImageFleetClient(url, ca_file=ca_file,
                                    retry=RetryPolicy(attempts=3, backoff_base=0.01)) as client:
            return await client.operations()

    with LoopbackServer(operations_routes, tls=first) as server:
        assert run(operations(server.url, first_pem)) == []
        # Without the pin the system store is used, which does not know this certificate.
        with pytest.raises(TransportError, match="certificate"):
            run(operations(server.url, None))
        # The host name is checked too: the certificate does not name 127.0.0.2.
        other_name = server.url.replace("127.0.0.1", "127.0.0.2")
        with pytest.raises(TransportError):
            run(operations(other_name, first_pem))
    with LoopbackServer(operations_routes, tls=second) as server:
        with pytest.raises(TransportError, match="certificate verify failed") as refused:
            run(operations(server.url, first_pem))
        assert server.stats.requests == 0  # nothing was sent to it
    assert refused.value.attempts == 1  # a wrong certificate is not retried
    assert not isinstance(refused.value, ConnectError)


def test_a_bad_ca_file_is_a_clear_error_before_connecting(tmp_path: Path) -> None:
    async def open_with(ca_file: Path) -> None:
        async with ImageFleetClient("https://127.0.0.1:9", ca_file=ca_file):
            pass

    with pytest.raises(InvalidRequest, match="No such file"):
        run(open_with(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(InvalidRequest, match="holds no PEM certificate"):
        run(open_with(tmp_path / "junk.pem"))


def test_the_apps_connection_pins_the_settings_certificate(tmp_path: Path) -> None:
    """The desktop app's Connection passes the Settings' (or IMAGEFLEET_CA_FILE's)
    certificate to its clients: it connects to the server holding that certificate and
    refuses another one with the same names."""
    from gui.connection import Connection, choose_ca_file
    from gui.settings import Settings

    first, first_pem = _tls_server_context(tmp_path, "first")
    second, _ = _tls_server_context(tmp_path, "second")
    settings = Settings(ca_file=str(first_pem))
    assert choose_ca_file({}, settings) == str(first_pem)
    assert choose_ca_file({"IMAGEFLEET_CA_FILE": "/elsewhere.pem"}, settings) == "/elsewhere.pem"

    async def connect(url: str) -> Any:
        connection = Connection(tmp_path / "storage")
        try:
            return await connection.connect(url, None, 2, 1, "",
                                            choose_ca_file({}, settings))
        finally:
            await connection.close()

    with LoopbackServer(operations_routes, tls=first) as server:
        assert run(connect(server.url)).operations == []
    with LoopbackServer(operations_routes, tls=second) as server:
        with pytest.raises(TransportError, match="certificate verify failed"):
            run(connect(server.url))
        assert server.stats.requests == 0
