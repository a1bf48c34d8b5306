"""A whole local fleet under a burst beyond its capacity and under repeated kills: busy
must never look like dead, and nothing is lost. Real gateway, real workers, real CLI."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import requests
from helpers_fleet import REPO, free_port
from waiting import wait_until

from scripts.chaos import CHAOS_IMAGE_SIZE, chaos_run, distinct_jpegs, write_images

pytestmark = pytest.mark.slow
STARTUP = 90.0


class FleetProcess:
    """``python -m fleet local --workers 2`` as its own process, stopped by its pid."""

    def __init__(self, storage: Path, log_path: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleet", "local", "--workers", "2", "--port",
             str(self.port), "--storage", str(storage), *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)

    def state(self) -> dict:
        return requests.get(self.url + "/fleet", timeout=10).json()

    def healthy(self) -> list[dict]:
        return [i for i in self.state()["instances"]
                if i["health"] == "healthy" and i["state"] == "running"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def fleet_process(tmp_path: Path):
    fleet = FleetProcess(tmp_path / "storage", tmp_path / "fleet.log")
    try:
        wait_until(lambda: len(fleet.healthy()) == 2, STARTUP,
                   what="python -m fleet local with 2 healthy workers")
        yield fleet
    finally:
        fleet.stop()


async def burst(url: str, images: list[bytes]) -> list[tuple[int, str | None, str]]:
    """Every image at once, one attempt each: (status, Retry-After, error code)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=300, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def one(i: int, image: bytes) -> tuple[int, str | None, str]:
            form = aiohttp.FormData()
            form.add_field("image", image, filename=f"b{i}.jpg", content_type="image/jpeg")
            form.add_field("operation", "bilateral")
            async with session.post(url + "/process", data=form) as resp:
                body = await resp.json(content_type=None)
                code = body.get("error", {}).get("code", "") if resp.status != 200 else ""
                return resp.status, resp.headers.get("Retry-After"), code

        return await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))


def test_a_burst_of_150_heavy_requests_kills_no_worker(fleet_process: FleetProcess) -> None:
    before = {i["id"] for i in fleet_process.healthy()}
    answers = asyncio.run(burst(fleet_process.url, distinct_jpegs(150)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert statuses.count(200) >= 12, statuses.count(200)  # both workers' capacity at least
    shed = [(retry, code) for status, retry, code in answers if status == 503]
    assert all(code == "overloaded" and retry == "1" for retry, code in shed), set(shed)
    state = fleet_process.state()
    assert {i["id"] for i in state["instances"]} == before, state["instances"]
    kinds = {e["kind"] for e in state["events"]}
    assert not kinds & {"instance_unhealthy", "instance_died", "replaced"}, state["events"]


# The batch command at concurrency 64 over 160 images: tests/test_overload_client.py.


def test_chaos_a_worker_killed_every_2_s_loses_no_image(tmp_path: Path) -> None:
    """200 images through the batch command while a worker is SIGKILLed every 2 s, twice.
    (``python -m scripts.bench_chaos`` repeats this 20 times; see the README.)"""
    folder = write_images(tmp_path / "in", distinct_jpegs(200, CHAOS_IMAGE_SIZE))
    for run in range(2):
        done = chaos_run(tmp_path / f"storage-{run}", folder, seed=run, startup=STARTUP)
        assert done.returncode == 0, f"run {run}: {done.stderr[-3000:]}"
        assert done.failed == 0, f"run {run}: {done.stderr[-3000:]}"
        assert len(done.kills) >= 2, f"run {run}: the batch outran the killer ({done.kills})"
