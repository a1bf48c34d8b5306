"""The local gateway in front of real ``python -m server`` processes on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers_fleet import IMAGES, ServerProcess, free_port
from PIL import Image

from fleet.local.gateway import Gateway, HealthCheckConfig
from fleet.manager import FleetManager
from fleet.model import FleetSpec, Health
from fleet.providers.memory import InMemoryProvider

pytestmark = pytest.mark.slow

FAST_CHECKS = HealthCheckConfig(interval_s=0.2, timeout_s=0.5, healthy_threshold=2,
                                unhealthy_threshold=2)
PNG = (IMAGES / "astronaut.png").read_bytes()
TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> list[ServerProcess]:
    storage = tmp_path_factory.mktemp("gateway") / "storage"
    started = [ServerProcess(storage, f"s{n}") for n in (1, 2)]
    try:
        for server in started:
            server.wait_healthy()
        yield started
    finally:
        for server in started:
            server.close()


@asynccontextmanager
async def running_gateway(targets: list[ServerProcess] = (), **options) -> AsyncIterator[Gateway]:
    gateway = Gateway(health=FAST_CHECKS, **options)
    await gateway.start()
    try:
        for server in targets:
            gateway.register(server.instance_id, server.address)
        await until(lambda: gateway.healthy_count() == len(targets), "targets healthy")
        yield gateway
    finally:
        await gateway.close()


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), raw[:200]
    headers = {k.strip().lower(): v.strip()
               for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", len(rest)))
    return RawResponse(int(lines[0].split()[1]), headers, rest[:length])


async def raw_request(port: int, data: bytes, timeout: float = 10.0) -> RawResponse:
    """Send ``data`` as it is (what a well-behaved client library would refuse to send)
    and read the answer up to the connection's close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    return parse_response(raw)


async def until(predicate, what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def multipart(operation: str = "invert") -> tuple[bytes, str]:
    boundary = "imagefleet-test-boundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="operation"\r\n\r\n'
            f'{operation}\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            f'filename="astronaut.png"\r\nContent-Type: image/png\r\n\r\n').encode()
    body += PNG + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class HeldUpstream:
    """A tiny upstream on a real loopback socket, for what the processing server cannot be
    made to do on cue: ``/work?hold=1`` keeps working until :meth:`release` — also after
    the client gave up, like a worker still computing — and ``/health`` reports how many
    requests it is working on, as the workers do."""

    def __init__(self, instance_id: str, capacity: int | None = None) -> None:
        self.instance_id = instance_id
        self.capacity = capacity  # reported in /health as the workers do (slots + queue)
        self.working = 0
        self.served = 0
        self.received = 0
        self._gate = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def start(self) -> HeldUpstream:
        async def health(request: web.Request) -> web.Response:
            body = {"status": "ok", "instance_id": self.instance_id, "inflight": self.working}
            if self.capacity is not None:
                body["load"] = {"busy": self.working, "queued": 0, "slots": self.capacity,
                                "queue_limit": 0, "completed": self.served}
            return web.json_response(body)

        async def work(request: web.Request) -> web.Response:
            self.received += 1
            await request.read()
            self.working += 1
            try:
                if request.query.get("hold"):
                    await self._gate.wait()
                self.served += 1
                return web.json_response({"instance_id": self.instance_id})
            finally:
                self.working -= 1

        app = web.Application()
        app.add_routes([web.get("/health", health), web.route("*", "/work", work)])
        # Without handler cancellation a request goes on when its client leaves.
        self._runner = web.AppRunner(app, handler_cancellation=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.address = f"127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    def release(self) -> None:
        self._gate.set()

    async def close(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def held_upstreams(*names: str, capacity: int | None = None,
                         ) -> AsyncIterator[list[HeldUpstream]]:
    upstreams = [await HeldUpstream(name, capacity).start() for name in names]
    try:
        yield upstreams
    finally:
        for upstream in upstreams:
            await upstream.close()


async def work(session: aiohttp.ClientSession, url: str, hold: bool = False):
    async with session.post(url + "/work" + ("?hold=1" if hold else ""), data=b"x" * 100) as resp:
        return resp.status, await resp.json()


async def process(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    form = aiohttp.FormData()
    form.add_field("image", PNG, filename="astronaut.png", content_type="image/png")
    form.add_field("operation", "grayscale")
    async with session.post(url + "/process", data=form) as resp:
        return resp.status, await resp.json()


def test_requests_reach_a_worker_and_its_links_work_through_the_gateway(servers) -> None:
    async def scenario() -> None:
        async with running_gateway(servers) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, result = await process(session, gateway.url)
            assert status == 200, result
            assert result["instance_id"] in {"s1", "s2"}
            # Host is passed through, so the worker signs a link to the gateway...
            assert result["url"].startswith(f"http://127.0.0.1:{gateway.port}/results/")
            # ...which any worker can serve (shared storage and secret).
            async with session.get(result["url"]) as resp:
                assert resp.status == 200
                image = Image.open(io.BytesIO(await resp.read()))
                assert image.size == (512, 512) and image.mode == "L"
            async with session.get(gateway.url + "/operations") as resp:
                assert resp.status == 200
                assert "grayscale" in {o["name"] for o in (await resp.json())["operations"]}

    asyncio.run(scenario())


def test_no_healthy_target_answers_json_503(servers) -> None:
    async def scenario() -> None:
        async with running_gateway() as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            gateway.register("closed", f"127.0.0.1:{free_port()}")  # nothing listens
            for _ in range(2):
                async with session.get(gateway.url + "/health") as resp:
                    assert resp.status == 503
                    assert resp.content_type == "application/json"
                    assert (await resp.json())["error"]["code"] == "no_healthy_targets"
            await until(lambda: gateway.status("closed").health is Health.UNHEALTHY,
                        "closed port marked unhealthy")

    asyncio.run(scenario())


def test_routes_by_least_outstanding_requests() -> None:
    async def scenario() -> None:
        async with held_upstreams("u1", "u2") as upstreams, \
                running_gateway(upstreams) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            held = asyncio.create_task(work(session, gateway.url, hold=True))
            await until(lambda: sum(gateway.status(u.instance_id).inflight
                                    for u in upstreams) == 1, "held request in flight")
            busy = next(u for u in upstreams if gateway.status(u.instance_id).inflight == 1)
            seen = set()
            for _ in range(6):
                status, result = await work(session, gateway.url)
                assert status == 200
                seen.add(result["instance_id"])
            assert seen == {u.instance_id for u in upstreams} - {busy.instance_id}
            busy.release()
            status, result = await held
            assert status == 200 and result["instance_id"] == busy.instance_id

    asyncio.run(scenario())


def test_deregistered_target_gets_no_new_requests_but_in_flight_ones_finish() -> None:
    async def scenario() -> None:
        async with held_upstreams("s1", "s2") as (first, second), \
                running_gateway([first]) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            held = asyncio.create_task(work(session, gateway.url, hold=True))
            await until(lambda: gateway.status("s1").inflight == 1, "held request in flight")
            gateway.deregister("s1")
            assert gateway.status("s1").health is Health.DRAINING
            async with session.get(gateway.url + "/health") as resp:
                assert resp.status == 503  # s1 draining, nothing else registered
            gateway.register("s2", second.address)
            await until(lambda: gateway.healthy_count() == 1, "s2 healthy")
            for _ in range(3):
                status, result = await work(session, gateway.url)
                assert (status, result["instance_id"]) == (200, "s2")
            first.release()
            status, result = await held
            assert (status, result["instance_id"]) == (200, "s1")
            assert gateway.status("s1").health is Health.UNUSED  # drained and removed

    asyncio.run(scenario())


def test_a_dead_only_target_answers_503_no_healthy_targets(tmp_path) -> None:
    """The connection is refused, so nothing reached the worker; with no other target to
    try, the answer is the retryable 503 (a 502 would cost the client one of its
    retries for a request that never ran)."""
    victim = ServerProcess(tmp_path / "storage", "victim").wait_healthy()

    async def scenario() -> None:
        async with running_gateway([victim]) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait(10)
            async with session.get(gateway.url + "/health") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["code"] == "no_healthy_targets"
            await until(lambda: gateway.status("victim").health is Health.UNHEALTHY,
                        "dead target unhealthy after 2 failed checks")

    try:
        asyncio.run(scenario())
    finally:
        victim.close()


def test_proxy_buffers_uploads_streams_downloads_and_forwards_headers() -> None:
    """Checked against a tiny echo upstream, because what a proxy does to headers and
    when it forwards body bytes cannot be seen from the processing server's answers.
    Uploads are buffered whole before they go upstream (a slow client must not hold a
    worker's connection); downloads stream."""
    seen: dict[str, str] = {}

    async def scenario() -> None:
        first_chunk_upstream = asyncio.Event()
        release_upload, release_download = asyncio.Event(), asyncio.Event()

        async def echo(request: web.Request) -> web.StreamResponse:
            seen.update(request.headers)
            first = await request.content.readany()
            first_chunk_upstream.set()
            rest = await request.content.read()
            response = web.StreamResponse()
            response.headers["X-Upstream"] = "echo"
            await response.prepare(request)
            await response.write(b"A" * 10)
            await release_download.wait()
            await response.write(first + rest)
            await response.write_eof()
            return response

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.add_routes([web.get("/health", health), web.post("/echo", echo)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            gateway = Gateway(health=FAST_CHECKS)
            await gateway.start()
            seen["gateway"] = f"127.0.0.1:{gateway.port}"
            gateway.register("echo", f"127.0.0.1:{port}")
            await until(lambda: gateway.healthy_count() == 1, "echo healthy")

            async def upload():
                yield b"x" * 100
                await release_upload.wait()
                yield b"y" * 100

            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                request = session.post(gateway.url + "/echo", data=upload(), headers={
                    "X-Test": "kept", "Connection": "keep-alive, X-Hop", "X-Hop": "dropped",
                    "X-Forwarded-For": "203.0.113.7"})
                task = asyncio.ensure_future(request.__aenter__())
                # The gateway has the first bytes; the upstream sees none of them while
                # the rest is not sent yet.
                await until(lambda: gateway.open_connections == 1, "client connected")
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(first_chunk_upstream.wait(), 0.5)
                release_upload.set()
                await asyncio.wait_for(first_chunk_upstream.wait(), 10)
                resp = await task
                assert resp.headers["X-Upstream"] == "echo"
                # The first response bytes arrive before the upstream has finished.
                assert await asyncio.wait_for(resp.content.readexactly(10), 10) == b"A" * 10
                release_download.set()
                assert await resp.content.read() == b"x" * 100 + b"y" * 100
                await request.__aexit__(None, None, None)
            await gateway.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert seen["X-Test"] == "kept"
    assert "X-Hop" not in seen
    assert seen["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert seen["Host"] == seen["gateway"]  # as the client sent it, not the worker's
    assert seen["Content-Length"] == "200"  # the buffered body's length, not chunked
    assert "Transfer-Encoding" not in seen


def test_admin_api_validates_and_answers_json(tmp_path: Path) -> None:
    spec = FleetSpec(name="adm", desired=2, min=1, max=4)

    async def scenario() -> None:
        manager = FleetManager(InMemoryProvider(clock=lambda: 0.0), spec)
        await manager.tick()  # launches m1, m2
        await manager.tick()  # observes them
        async with running_gateway(admin=manager) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            base = gateway.url + "/fleet"
            async with session.get(base) as resp:
                state = await resp.json()
                assert resp.status == 200 and state["desired"] == 2
                assert state["provider"] == "memory"
            as_json = {"Content-Type": "application/json"}
            for body, code in ((b"{nope", "invalid_json"), (b'{"desired": "3"}',
                                                              "invalid_desired"),
                               (b'{"desired": 9}', "invalid_desired"), (b"[3]",
                                                                       "invalid_desired")):
                async with session.post(base + "/scale", data=body, headers=as_json) as resp:
                    answer = await resp.json()
                    assert resp.status == 400, answer
                    assert answer["error"]["code"] == code
            async with session.post(base + "/scale", data=json.dumps({"desired": 9}),
                                    headers=as_json) as resp:
                assert "1..4" in (await resp.json())["error"]["message"]
            async with session.post(base + "/scale", json={"desired": 3}) as resp:
                assert resp.status == 200 and (await resp.json())["desired"] == 3
            assert manager.spec.desired == 3
            async with session.post(base + "/instances/ghost/terminate", json={}) as resp:
                assert resp.status == 404
                assert (await resp.json())["error"]["code"] == "unknown_instance"
            async with session.post(base + "/instances/m1/terminate", json={}) as resp:
                assert resp.status == 202
            async with session.get(base + "/nothing") as resp:
                assert resp.status == 404

        # With a token, changing state needs it; reading stays open on loopback.
        async with running_gateway(admin=manager, token="secret-token-1") as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            async with session.post(gateway.url + "/fleet/scale", json={"desired": 2}) as resp:
                assert resp.status == 401
            async with session.post(gateway.url + "/fleet/scale", json={"desired": 2}, headers={
                    "Authorization": "Bearer secret-token-1"}) as resp:
                assert resp.status == 200
            async with session.get(gateway.url + "/fleet") as resp:
                assert resp.status == 200

    asyncio.run(scenario())


def test_response_cut_short_upstream_is_cut_short_downstream(caplog) -> None:
    """An echo upstream that promises 100 bytes and dies after 10: the client must see a
    broken response, not a complete short one (the processing server cannot be made to
    die at exactly that point)."""

    async def scenario() -> None:
        async def dying(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Length": "100"})
            await response.prepare(request)
            await response.write(b"x" * 10)
            await asyncio.sleep(0.05)
            request.transport.close()
            return response

        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "ok"})

        app = web.Application()
        app.add_routes([web.get("/health", health), web.get("/dying", dying)])
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gateway = Gateway(health=FAST_CHECKS)
        try:
            await gateway.start()
            gateway.register("dying", f"127.0.0.1:{port}")
            await until(lambda: gateway.healthy_count() == 1, "upstream healthy")
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session, \
                    session.get(gateway.url + "/dying") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            await until(lambda: gateway.status("dying").inflight == 0, "request finished")
        finally:
            await gateway.close()
            await runner.cleanup()

    asyncio.run(scenario())
    assert "Error handling request" not in caplog.text
