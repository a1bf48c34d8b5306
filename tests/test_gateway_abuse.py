"""The local gateway under abuse: slow and oversized uploads, idle and half-sent
connections, too many connections, no descriptors left, workers that die or keep
computing for clients that left. Real processes and sockets on loopback throughout."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import requests
from helpers_fleet import REPO, ServerProcess, free_port
from PIL import Image
from test_gateway import (
    TIMEOUT,
    held_upstreams,
    parse_response,
    process,
    raw_request,
    running_gateway,
    until,
    work,
)
from waiting import wait_until

from fleet.local.gateway import (
    Gateway,
    GatewayLimits,
    HealthCheckConfig,
    UpstreamFailure,
    all_full,
    classify_upstream_error,
    connection_cap,
    parse_health_report,
)
from fleet.manager import FleetManager
from fleet.model import FleetSpec, Health
from fleet.providers.memory import InMemoryProvider

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
# `python -m fleet` with soft = hard = 256 descriptors (no preexec_fn: unsafe with threads).
LOW_DESCRIPTOR_LIMIT = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)); "
    "sys.argv[0] = 'fleet'; runpy.run_module('fleet', run_name='__main__', alter_sys=True)")


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[ServerProcess]:
    storage = tmp_path_factory.mktemp("abuse") / "storage"
    started = [ServerProcess(storage, f"a{n}") for n in (1, 2)]
    try:
        for server in started:
            server.wait_healthy()
        yield started
    finally:
        for server in started:
            server.close()


def test_slow_uploads_hold_no_worker_and_the_gateway_keeps_answering(workers) -> None:
    """100 clients upload a few bytes a second for 15 s: bodies are buffered in the
    gateway, so they hold no upstream connection and /health keeps answering promptly."""

    async def scenario() -> tuple[list[float], list[int]]:
        async with running_gateway(workers) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            stop = asyncio.Event()
            head = (f"POST /process HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
                    f"Content-Type: multipart/form-data; boundary=b\r\n"
                    f"Content-Length: {10 * MiB}\r\n\r\n").encode()

            async def slow_upload() -> None:
                _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                try:
                    writer.write(head)
                    while not stop.is_set():
                        writer.write(b"--b\r\n")
                        await writer.drain()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), 0.5)  # the upload's pace
                finally:
                    writer.close()

            uploads = [asyncio.create_task(slow_upload()) for _ in range(100)]
            await until(lambda: gateway.open_connections >= 100, "100 slow uploads connected")
            loop = asyncio.get_running_loop()
            end = loop.time() + 15
            latencies, statuses = [], []
            rounds = 0
            while loop.time() < end:
                started = loop.time()
                async with session.get(gateway.url + "/health") as resp:
                    await resp.read()
                    statuses.append(resp.status)
                latencies.append(loop.time() - started)
                rounds += 1
                if rounds % 10 == 0:
                    status, _ = await process(session, gateway.url)
                    statuses.append(status)
                # None of the 100 uploads has taken a worker connection.
                assert sum(gateway.status(w.instance_id).inflight for w in workers) == 0
            assert gateway.open_connections >= 100  # they were all still uploading
            stop.set()
            await asyncio.gather(*uploads)
            return latencies, statuses

    latencies, statuses = asyncio.run(scenario())
    assert set(statuses) == {200}, statuses
    assert len(latencies) > 50
    assert max(latencies) < 2.0, f"slowest /health {max(latencies):.2f}s"


def test_idle_half_sent_and_stalled_connections_are_closed() -> None:
    limits = GatewayLimits(idle_timeout_s=2.0, header_timeout_s=0.5, body_timeout_s=0.5)

    async def scenario() -> None:
        async with held_upstreams("u1") as upstreams, \
                running_gateway(upstreams, limits=limits) as gateway:
            loop = asyncio.get_running_loop()
            host = f"Host: 127.0.0.1:{gateway.port}\r\n".encode()

            async def until_closed(reader: asyncio.StreamReader) -> tuple[bytes, float]:
                started = loop.time()
                data = await asyncio.wait_for(reader.read(), 10)
                return data, loop.time() - started

            async def silent() -> tuple[bytes, float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                try:
                    return await until_closed(reader)
                finally:
                    writer.close()

            async def idle_after_a_request() -> tuple[bytes, float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                try:
                    writer.write(b"GET /work HTTP/1.1\r\n" + host + b"\r\n")
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(parse_response(head).headers["content-length"])
                    assert parse_response(head + await reader.readexactly(length)).status == 200
                    return await until_closed(reader)
                finally:
                    writer.close()

            async def sends(data: bytes) -> tuple[bytes, float]:
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                try:
                    writer.write(data)
                    return await until_closed(reader)
                finally:
                    writer.close()

            (quiet, quiet_s), (kept, kept_s), (head, head_s), (body, body_s) = \
                await asyncio.gather(
                    silent(), idle_after_a_request(),
                    sends(b"GET /work HTTP/1.1\r\n" + host + b"X-Half: sent"),
                    sends(b"POST /work HTTP/1.1\r\n" + host + b"Content-Length: 1000\r\n\r\n"
                          + b"x" * 10))
            assert quiet == b"" and 1.5 <= quiet_s < 8, quiet_s
            assert kept == b"" and 1.5 <= kept_s < 8, kept_s
            # The header and body timeouts come long before the idle one.
            assert head_s < 1.8 and parse_response(head).status == 408, (head_s, head)
            assert "headers" in parse_response(head).json()["error"]["message"]
            assert body_s < 1.8 and parse_response(body).status == 408, (body_s, body)
            assert parse_response(body).json()["error"]["code"] == "request_timeout"
            assert upstreams[0].served == 1  # neither half-sent request reached it

    asyncio.run(scenario())


def test_a_connection_over_the_cap_gets_503_json_and_a_freed_slot_is_reused() -> None:
    async def scenario() -> None:
        async with running_gateway(limits=GatewayLimits(max_connections=5)) as gateway:
            assert gateway.max_connections == 5
            held = [await asyncio.open_connection("127.0.0.1", gateway.port)
                    for _ in range(5)]
            await until(lambda: gateway.open_connections == 5, "5 connections open")
            refused = await raw_request(gateway.port, b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert refused.status == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "too_many_connections"
            held.pop()[1].close()
            await until(lambda: gateway.open_connections == 4, "a connection closed")
            served = await raw_request(gateway.port, b"GET /health HTTP/1.1\r\nHost: gw\r\n"
                                       b"Connection: close\r\n\r\n")
            assert served.json()["error"]["code"] == "no_healthy_targets"  # served, not refused
            for _reader, writer in held:
                writer.close()

    asyncio.run(scenario())


def test_default_connection_cap_keeps_descriptors_in_reserve() -> None:
    assert connection_cap(256, 64) == 64  # three descriptors per busy connection
    assert connection_cap(1024, 64) == 320
    assert connection_cap(50, 64) == 1


def test_fleet_out_of_descriptors_keeps_its_workers_and_logs_little(tmp_path: Path) -> None:
    """A fleet whose process has 256 descriptors and a connection cap set above that:
    300 idle connections exhaust them. Health checks it cannot make count for nothing,
    so no worker is lost; asyncio's accept errors are logged once a second."""
    storage, port = tmp_path / "storage", free_port()
    log_path = tmp_path / "fleet.log"

    with log_path.open("wb") as log_file:
        fleet = subprocess.Popen(
            [sys.executable, "-c", LOW_DESCRIPTOR_LIMIT, "local", "--workers", "2",
             "--port", str(port), "--storage", str(storage), "--max-connections", "1000"],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    idle: list[socket.socket] = []
    try:
        def healthy_ids() -> set[str]:
            state = requests.get(base + "/fleet", timeout=2).json()
            return {i["id"] for i in state["instances"] if i["health"] == "healthy"}

        before = wait_until(lambda: len(healthy_ids()) == 2 and healthy_ids(), 90,
                            what="2 healthy workers")
        pids = json.loads((storage / ".fleet" / "workers.json").read_text())["workers"]

        def fleet_log() -> str:
            return log_path.read_text(errors="replace")

        for _ in range(300):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(lambda: "cannot accept connections" in fleet_log(), 15,
                   what="the fleet running out of descriptors")
        # Three skipped rounds of checks (one line a second) outlast the two failures
        # that would make a worker unhealthy.
        wait_until(lambda: fleet_log().count("not counted against it") >= 3, 20,
                   what="health checks skipped for want of descriptors")
        for sock in idle:
            sock.close()
        idle.clear()

        assert wait_until(healthy_ids, 30, what="/fleet answering again") == before
        response = wait_until(lambda: requests.post(
            base + "/process", files={"image": ("a.png", _png(64), "image/png")},
            data={"operation": "invert"}, timeout=30), 30, what="a processed image")
        assert response.status_code == 200, response.text
        state = requests.get(base + "/fleet", timeout=5).json()
        kinds = [e["kind"] for e in state["events"]]
        assert kinds.count("launched") == 2, kinds
        assert not {"instance_unhealthy", "instance_died"} & set(kinds), kinds
        after = json.loads((storage / ".fleet" / "workers.json").read_text())["workers"]
        assert after == pids
        text = fleet_log()
        assert len(text) < 20_000, f"{len(text)} bytes of log:\n{text[-3000:]}"
        assert "Traceback" not in text, text[-3000:]
    finally:
        for sock in idle:
            sock.close()
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGTERM)
            try:
                fleet.wait(60)
            except subprocess.TimeoutExpired:
                fleet.kill()
                fleet.wait(10)
    assert fleet.returncode == 0, log_path.read_text(errors="replace")[-3000:]


def _png(side: int) -> bytes:
    """Random pixels: a PNG that does not compress (side 1000: about 3 MB)."""
    pixels = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def test_upload_over_the_limit_gets_413_json_that_the_client_reads(workers) -> None:
    big = bytes(51 * MiB)  # the multipart form around it takes it over the 51 MiB limit
    medium = _png(1000)

    async def scenario() -> None:
        async with running_gateway(workers) as gateway:
            def post(**options) -> requests.Response:
                return requests.post(gateway.url + "/process", timeout=60, **options)

            declared = await asyncio.to_thread(
                post, files={"image": ("big.png", big, "image/png")},
                data={"operation": "invert"})
            assert declared.status_code == 413, declared.text
            assert declared.json()["error"]["code"] == "too_many_bytes"
            assert str(GatewayLimits().max_body_bytes) in declared.json()["error"]["message"]

            def chunks():  # no Content-Length: found out while reading
                for start in range(0, 52 * MiB, MiB):
                    yield big[:MiB] if start < len(big) else bytes(MiB)

            chunked = await asyncio.to_thread(post, data=chunks(), headers={
                "Content-Type": "multipart/form-data; boundary=b"})
            assert chunked.status_code == 413, chunked.text
            assert chunked.json()["error"]["code"] == "too_many_bytes"

            # Under the limit but over the in-memory part: spooled to disk, sent whole.
            assert len(medium) > GatewayLimits().memory_body_bytes
            ok = await asyncio.to_thread(
                post, files={"image": ("noise.png", medium, "image/png")},
                data={"operation": "invert"})
            assert ok.status_code == 200, ok.text
            assert (ok.json()["width"], ok.json()["height"]) == (1000, 1000)

    asyncio.run(scenario())


def test_killed_worker_is_out_of_rotation_on_the_first_refused_connection(
        workers, tmp_path: Path) -> None:
    victim = ServerProcess(tmp_path / "storage", "victim").wait_healthy()
    survivor = workers[0]
    spooled = _png(1000)
    assert len(spooled) > GatewayLimits().memory_body_bytes
    # One check at registration, the next a minute later: whatever happens after the
    # kill is the passive check's doing.
    slow_checks = HealthCheckConfig(interval_s=60, timeout_s=2, healthy_threshold=1,
                                    unhealthy_threshold=2)

    async def scenario() -> list[tuple[int, str]]:
        gateway = Gateway(health=slow_checks)
        await gateway.start()
        try:
            gateway.register("victim", victim.address)
            gateway.register(survivor.instance_id, survivor.address)
            await until(lambda: gateway.healthy_count() == 2, "both healthy")
            os.killpg(victim.process.pid, signal.SIGKILL)
            victim.process.wait(10)
            answers = []
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                # The first two carry a body spooled to disk, so the one re-sent to the
                # survivor is re-read from the start.
                for _ in range(2):
                    form = aiohttp.FormData()
                    form.add_field("image", spooled, filename="noise.png",
                                   content_type="image/png")
                    form.add_field("operation", "invert")
                    async with session.post(gateway.url + "/process", data=form) as resp:
                        body = await resp.json()
                        assert body.get("width") == 1000, body
                        answers.append((resp.status, body["instance_id"]))
                for _ in range(4):
                    async with session.get(gateway.url + "/health") as resp:
                        body = await resp.json()
                        answers.append((resp.status, body.get("instance_id")
                                        or body["error"]["code"]))
            assert gateway.status("victim").health is Health.UNHEALTHY
            assert gateway.status(survivor.instance_id).health is Health.HEALTHY
            return answers
        finally:
            await gateway.close()

    try:
        answers = asyncio.run(scenario())
    finally:
        victim.close()
    # Ties rotate, so the victim was picked for one of the first two requests: its
    # connection was refused, so that request went on to the survivor (nothing had been
    # sent) and the victim stayed out of rotation for every later one.
    assert answers == [(200, survivor.instance_id)] * 6, answers


def test_routing_counts_work_a_worker_still_does_for_a_client_that_left() -> None:
    async def scenario() -> None:
        async with held_upstreams("u1", "u2") as upstreams, \
                running_gateway(upstreams) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            impatient = asyncio.create_task(work(session, gateway.url, hold=True))
            await until(lambda: sum(u.working for u in upstreams) == 1, "held request")
            busy, idle = sorted(upstreams, key=lambda u: -u.working)
            impatient.cancel()  # the client gives up; the worker goes on computing
            with contextlib.suppress(asyncio.CancelledError):
                await impatient
            await until(lambda: gateway.status(busy.instance_id).inflight == 0,
                        "the gateway's own count back to 0")
            await until(lambda: gateway.status(busy.instance_id).reported_inflight == 1,
                        "the worker's own report read by a health check")
            seen = [(await work(session, gateway.url))[1]["instance_id"] for _ in range(4)]
            assert seen == [idle.instance_id] * 4
            assert busy.working == 1
            for upstream in upstreams:
                status = gateway.status(upstream.instance_id)
                assert status.last_progress_at is not None  # passed checks are progress
            busy.release()
            await until(lambda: gateway.status(busy.instance_id).reported_inflight == 0,
                        "the worker reports it is done")

    asyncio.run(scenario())


def test_when_every_target_is_full_the_gateway_sheds_before_forwarding() -> None:
    """Workers report what they admit (slots + queue) in /health; with every target's
    admitted work in flight, the gateway answers 503 overloaded itself: the worker would
    refuse anyway, after reading the whole body a second time."""

    async def scenario() -> None:
        async with held_upstreams("f1", capacity=1) as (upstream,), \
                running_gateway([upstream]) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await until(lambda: gateway.status("f1").capacity == 1, "capacity from /health")
            held = asyncio.create_task(work(session, gateway.url, hold=True))
            await until(lambda: upstream.working == 1, "the held request at the worker")
            for _ in range(5):
                async with session.post(gateway.url + "/work", data=b"x" * 50_000) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                    assert (await resp.json())["error"]["code"] == "overloaded"
            assert upstream.received == 1 and gateway.shed == 5
            # Requests without a body (health, links) are never shed here.
            async with session.get(gateway.url + "/health") as resp:
                assert resp.status == 200
            upstream.release()
            assert (await held)[0] == 200
            assert (await work(session, gateway.url))[0] == 200

    asyncio.run(scenario())


def test_a_gateway_whose_own_loop_lags_does_not_fail_its_targets() -> None:
    """Busy must not look like dead, also when the busy one is the gateway: checks that
    time out while its own event loop ran late are not counted against the targets."""
    checks = HealthCheckConfig(interval_s=0.2, timeout_s=0.5, healthy_threshold=2,
                               unhealthy_threshold=2)

    async def scenario() -> None:
        async with held_upstreams("l1", "l2") as upstreams:
            gateway = Gateway(health=checks)
            await gateway.start()
            try:
                for upstream in upstreams:
                    gateway.register(upstream.instance_id, upstream.address)
                await until(lambda: gateway.healthy_count() == 2, "targets healthy")
                # Saturate the gateway's loop on purpose for 4 s: every pass of the loop
                # takes 0.3 s, so a check needing a few passes (connect, send, read)
                # outlasts its 0.5 s timeout although the target answers at once (the
                # point of this test: sleeping here is the load, not a wait).
                loop = asyncio.get_running_loop()
                end = loop.time() + 4.0
                lowest = 2
                while loop.time() < end:
                    time.sleep(0.3)  # the gateway's loop is the victim
                    await asyncio.sleep(0)
                    lowest = min(lowest, gateway.healthy_count())
                assert lowest == 2, "a target was failed for the gateway's own lag"
            finally:
                await gateway.close()

    asyncio.run(scenario())


def test_front_door_shedding_only_when_every_target_is_known_full() -> None:
    assert all_full([(2, 2), (3, 3)])
    assert not all_full([(2, 2), (1, 3)])  # one has room
    assert not all_full([(9, None)])  # capacity unknown: let the worker decide
    assert not all_full([])  # nothing routable is answered as no_healthy_targets
    report = parse_health_report(json.dumps(
        {"load": {"busy": 1, "queued": 0, "slots": 2, "queue_limit": 2}}).encode())
    assert report.capacity == 4
    assert parse_health_report(b'{"inflight": 1}').capacity is None


def test_gateway_errors_are_json_without_a_version_banner() -> None:
    spec = FleetSpec(name="json", desired=1, min=1, max=2)

    async def scenario() -> None:
        manager = FleetManager(InMemoryProvider(clock=lambda: 0.0), spec)
        async with running_gateway(admin=manager) as gateway, \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            for method, path, status, code in (
                    ("GET", "/fleet/nothing", 404, "not_found"),
                    ("GET", "/fleet/scale", 405, "method_not_allowed"),
                    ("DELETE", "/fleet", 405, "method_not_allowed"),
                    ("GET", "/anything", 503, "no_healthy_targets")):
                async with session.request(method, gateway.url + path) as resp:
                    assert resp.status == status, (method, path)
                    assert resp.content_type == "application/json"
                    assert (await resp.json())["error"]["code"] == code
                    assert resp.headers["Server"] == "imagefleet-gateway"
                    if status == 405:
                        assert "POST" in resp.headers["Allow"] or "GET" in resp.headers["Allow"]
            port = gateway.port
            for raw in (b"NOT HTTP AT ALL\r\n\r\n",
                        b"GET / HTTP/1.1\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n",
                        b"POST / HTTP/1.1\r\nContent-Length: nope\r\n\r\n"):
                answer = await raw_request(port, raw)
                assert answer.status == 400, (raw[:30], answer)
                assert answer.json()["error"]["code"] == "bad_request"
                assert answer.headers["server"] == "imagefleet-gateway"
            # Expect: 100-continue for a body over the limit: 413 before it is sent.
            answer = await raw_request(port, (
                f"POST /process HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nExpect: 100-continue"
                f"\r\nContent-Length: {60 * MiB}\r\n\r\n").encode())
            assert answer.status == 413 and answer.json()["error"]["code"] == "too_many_bytes"

    asyncio.run(scenario())


def test_what_counts_against_a_target_and_what_a_health_body_says() -> None:
    key = aiohttp.client_reqrep.ConnectionKey("127.0.0.1", 1, False, True, None, None, None)
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    no_fds = aiohttp.ClientConnectorError(key, OSError(24, "Too many open files"))
    assert classify_upstream_error(refused) is UpstreamFailure.TARGET_DOWN
    assert classify_upstream_error(no_fds) is UpstreamFailure.LOCAL_RESOURCES
    assert classify_upstream_error(aiohttp.ServerDisconnectedError()) \
        is UpstreamFailure.TARGET_DOWN
    assert classify_upstream_error(TimeoutError()) is UpstreamFailure.OTHER

    report = parse_health_report(json.dumps({
        "status": "ok", "inflight": 2, "processed": 7,
        "load": {"busy": 2, "queued": 3, "completed": 9}}).encode())
    assert (report.inflight, report.completed) == (5, 9)
    assert parse_health_report(b'{"inflight": 1, "processed": 4}').completed == 4
    assert parse_health_report(b"not json").inflight is None
    assert parse_health_report(b'{"inflight": true, "load": []}').inflight is None
