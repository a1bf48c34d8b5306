"""The fleet admin API against web pages and careless clients: a real gateway on loopback
(with an in-memory fleet behind the admin routes) and a real ``python -m fleet local``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import requests
from helpers_fleet import REPO, free_port
from test_gateway import TIMEOUT, parse_response, raw_request, running_gateway
from waiting import wait_until

from fleet.local.gateway import Gateway
from fleet.manager import FleetManager
from fleet.model import FleetSpec
from fleet.providers.memory import InMemoryProvider

TOKEN = "test-admin-token-1"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MiB = 1024 * 1024


@asynccontextmanager
async def admin_gateway() -> AsyncIterator[tuple[Gateway, FleetManager]]:
    manager = FleetManager(InMemoryProvider(clock=lambda: 0.0),
                           FleetSpec(name="sec", desired=2, min=1, max=4))
    await manager.tick()  # launches m1, m2
    await manager.tick()  # observes them
    async with running_gateway(admin=manager, token=TOKEN) as gateway:
        yield gateway, manager


def test_changing_state_needs_the_token_reading_on_loopback_does_not() -> None:
    async def scenario() -> None:
        async with admin_gateway() as (gateway, manager), \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            base = gateway.url + "/fleet"
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Authorization": TOKEN}):  # no "Bearer"
                async with session.post(base + "/scale", json={"desired": 3},
                                        headers=headers) as resp:
                    assert resp.status == 401
                    assert (await resp.json())["error"]["code"] == "unauthorized"
                async with session.post(base + "/instances/m1/terminate", json={},
                                        headers=headers) as resp:
                    assert resp.status == 401
            assert manager.spec.desired == 2
            assert not [e for e in manager.events if e.kind == "terminate_requested"]
            async with session.get(base) as resp:
                assert resp.status == 200 and (await resp.json())["desired"] == 2
            async with session.post(base + "/scale", json={"desired": 3}, headers=AUTH) as resp:
                assert resp.status == 200
            async with session.post(base + "/instances/m1/terminate", json={},
                                    headers=AUTH) as resp:
                assert resp.status == 202
            assert manager.spec.desired == 3

    asyncio.run(scenario())


def test_foreign_host_and_origin_are_refused() -> None:
    """DNS rebinding: a web page whose name now resolves to 127.0.0.1 sends its own name
    as Host; a cross-origin page sends its Origin."""

    async def scenario() -> None:
        async with admin_gateway() as (gateway, manager), \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            base, port = gateway.url + "/fleet", gateway.port
            for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}"):
                async with session.get(base, headers={"Host": host}) as resp:
                    assert resp.status == 421, host
                    assert (await resp.json())["error"]["code"] == "misdirected_request"
                async with session.post(base + "/scale", json={"desired": 3},
                                        headers={**AUTH, "Host": host}) as resp:
                    assert resp.status == 421
            async with session.post(base + "/scale", json={"desired": 3}, headers={
                    **AUTH, "Origin": "http://evil.example"}) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["code"] == "cross_origin"
            assert manager.spec.desired == 2
            for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
                async with session.get(base, headers={"Host": host}) as resp:
                    assert resp.status == 200, host
            # Workers build links from Host, so the data path does not check it.
            async with session.get(gateway.url + "/health",
                                   headers={"Host": "example.org"}) as resp:
                assert (await resp.json())["error"]["code"] == "no_healthy_targets"

    asyncio.run(scenario())


def test_admin_bodies_must_be_small_shallow_json() -> None:
    async def scenario() -> None:
        async with admin_gateway() as (gateway, manager), \
                aiohttp.ClientSession(timeout=TIMEOUT) as session:
            scale = gateway.url + "/fleet/scale"
            for content_type in ("text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x"):
                async with session.post(scale, data=b'{"desired": 3}', headers={
                        **AUTH, "Content-Type": content_type}) as resp:
                    answer = await resp.json()
                    assert resp.status == 415, content_type
                    assert "application/json" in answer["error"]["message"]
            async with session.post(scale, data=b'{"desired": 3}', headers={
                    **AUTH, "Content-Type": "application/json; charset=utf-8"}) as resp:
                assert resp.status == 200
            deep = b'{"desired": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
            async with session.post(scale, data=deep, headers={
                    **AUTH, "Content-Type": "application/json"}) as resp:
                answer = await resp.json()
                assert resp.status == 400 and answer["error"]["code"] == "invalid_json"

            async def chunked():  # no Content-Length: caught while reading
                for _ in range(4):
                    yield b" " * 32 * 1024

            for data in (b" " * (65 * 1024), chunked()):
                async with session.post(scale, data=data, headers={
                        **AUTH, "Content-Type": "application/json"}) as resp:
                    assert resp.status == 413
                    assert (await resp.json())["error"]["code"] == "too_many_bytes"
            assert manager.spec.desired == 3

    asyncio.run(scenario())


def test_non_ascii_authorization_is_401_not_500() -> None:
    async def scenario() -> None:
        async with admin_gateway() as (gateway, manager):
            for value in (b"Bearer \xff\xfe", "Bearer tökén".encode(), b"\xc3(\xa0\xa1"):
                answer = await raw_request(gateway.port, (
                    f"POST /fleet/scale HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 14\r\n"
                    "Connection: close\r\nAuthorization: ").encode() + value
                    + b'\r\n\r\n{"desired": 3}')
                assert answer.status == 401, (value, answer)
                assert answer.json()["error"]["code"] == "unauthorized"
            assert manager.spec.desired == 2

    asyncio.run(scenario())


def flood(port: int, head: bytes, total: int) -> tuple[float, bytes, int]:
    """Send ``head`` and then up to ``total`` body bytes as fast as the server takes
    them, reading the answer meanwhile: (seconds to the answer, answer, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sent = [0]

    def send() -> None:
        chunk = b"0" * MiB
        try:
            sock.sendall(head)
            while sent[0] < total:
                sent[0] += sock.send(chunk)
        except OSError:
            pass  # the server closed: what we wanted to see

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    answer = b""
    answered_at = None
    try:
        while chunk := sock.recv(65536):
            answer += chunk
            if answered_at is None and b"\r\n\r\n" in answer:
                answered_at = time.monotonic() - started
    except OSError:
        pass  # a reset after the answer, once the drain limit is passed
    finally:
        sender.join(30)
        sock.close()
    return (answered_at if answered_at is not None else float("inf")), answer, sent[0]


def test_a_600_mb_admin_body_is_refused_at_once_and_not_read() -> None:
    async def scenario() -> list[tuple[float, bytes, int]]:
        async with admin_gateway() as (gateway, manager):
            results = []
            for auth in (TOKEN, "wrong"):  # 413 with the token, 401 without: neither reads
                head = (f"POST /fleet/scale HTTP/1.1\r\nHost: 127.0.0.1:{gateway.port}\r\n"
                        f"Authorization: Bearer {auth}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {600 * 1000 * 1000}\r\n\r\n").encode()
                results.append(await asyncio.to_thread(flood, gateway.port, head,
                                                       600 * 1000 * 1000))
            assert manager.spec.desired == 2
            return results

    for (seconds, answer, sent), status in zip(asyncio.run(scenario()), (413, 401),
                                               strict=True):
        response = parse_response(answer)
        assert response.status == status, answer[:300]
        assert response.json()["error"]["code"] in ("too_many_bytes", "unauthorized")
        assert seconds < 2.0, f"answered after {seconds:.1f}s"
        # At most the 64 MiB drain plus what socket buffers hold, not 600 MB.
        assert sent < 200 * MiB, f"{sent / MiB:.0f} MiB sent"


@pytest.mark.slow
def test_python_m_fleet_local_writes_a_private_admin_token(tmp_path: Path) -> None:
    storage, port = tmp_path / "storage", free_port()
    env = {k: v for k, v in os.environ.items() if k != "IMAGEFLEET_TOKEN"}
    fleet = subprocess.Popen(
        [sys.executable, "-m", "fleet", "local", "--workers", "1", "--port", str(port),
         "--storage", str(storage)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    token_file = storage / ".fleet" / "admin-token"
    base = f"http://127.0.0.1:{port}/fleet"
    try:
        printed = ""
        for line in fleet.stdout:  # start-up lines until the token's
            printed += line
            if "admin token" in line:
                break
        assert str(token_file) in printed, printed
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        wait_until(lambda: requests.get(base, timeout=2).status_code == 200, 30,
                   what="GET /fleet without a token")
        assert requests.post(base + "/scale", json={"desired": 1},
                             timeout=10).status_code == 401
        answer = requests.post(base + "/scale", json={"desired": 1}, timeout=10,
                               headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        # The workers need no token: only the admin API has one.
        assert "workers" in json.loads((storage / ".fleet" / "workers.json").read_text())
    finally:
        fleet.send_signal(signal.SIGTERM)
        try:
            fleet.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            fleet.kill()
            fleet.communicate(timeout=10)
    assert fleet.returncode == 0
    assert not token_file.exists()  # a token for a fleet that is gone helps no one
