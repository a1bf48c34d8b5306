"""The client and the batch command line against servers that shed load (503 overloaded).

Pure parts first (the retry decision and the AIMD window, as tables), then the client
against a real loopback aiohttp server with a bounded capacity: above N concurrent
requests it answers ``503 overloaded`` with ``Retry-After`` at once, like the
processing server's admission control. Last, the batch command line at
``--concurrency 64`` against a real ``python -m fleet local`` of 2 workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from aiohttp import web
from conftest import IMAGES_DIR, free_port
from test_client import LoopbackServer, error_json, png_bytes, result_json
from waiting import wait_until

from gui.client import (
    AdaptiveConcurrency,
    ConnectError,
    ImageFleetClient,
    InvalidRequest,
    Job,
    ProgressEvent,
    RetryPolicy,
    RetryStep,
    ServerError,
    is_backpressure,
    next_retry,
    parse_health,
)
from gui.client.retry import _AdaptiveLimiter

REPO = Path(__file__).resolve().parents[1]


def overloaded(retry_after: str | None = "1") -> ServerError:
    return ServerError(503, "overloaded", "at capacity",
                       retry_after=None if retry_after is None else float(retry_after))


# --------------------------------------------------------------------------- the retry decision


@pytest.mark.parametrize(
    ("error", "busy"),
    [
        (overloaded("1"), True),
        (overloaded(None), True),  # the code alone says so
        (ServerError(503, "draining", "x", retry_after=1.0), True),  # a 503 asking for time
        (ServerError(429, "too_many_requests", "x"), True),
        (ServerError(503, "no_healthy_target", "x"), False),  # a fault: attempts apply
        (ServerError(502, "bad_gateway", "x", retry_after=1.0), False),
        (ServerError(413, "too_large", "x", retry_after=1.0), False),
        (ServerError(507, "insufficient_storage", "x"), False),
        (ConnectError("refused"), False),
    ],
)
def test_backpressure_is_told_apart_from_faults(error: Exception, busy: bool) -> None:
    assert is_backpressure(error) is busy  # type: ignore[arg-type]


POLICY = RetryPolicy(attempts=3, backoff_base=0.25, backoff_max=8.0, overload_patience=60.0)


@pytest.mark.parametrize(
    ("error", "faults", "busy_for", "rand", "expected"),
    [
        # Back-pressure: Retry-After x [1, 2), whatever the fault count.
        (overloaded("1"), 0, 0.0, 0.0, RetryStep(True, 1.0, busy=True)),
        (overloaded("1"), 0, 0.0, 0.5, RetryStep(True, 1.5, busy=True)),
        (overloaded("2"), 2, 10.0, 0.25, RetryStep(True, 2.5, busy=True)),
        (overloaded("1"), 3, 0.0, 0.0, RetryStep(True, 1.0, busy=True)),  # attempts all used
        (overloaded(None), 0, 0.0, 0.0, RetryStep(True, 1.0, busy=True)),  # default 1 s
        (overloaded("0"), 0, 0.0, 0.0, RetryStep(True, 0.1, busy=True)),  # never at once
        # ...until the patience is spent: the last wait is cut to the deadline, then stop.
        (overloaded("5"), 0, 58.0, 0.0, RetryStep(True, 2.0, busy=True)),
        (overloaded("1"), 0, 60.0, 0.0,
         RetryStep(False, busy=True, reason="server still busy after 60 s (overload_patience "
                                            "60 s)")),
        # Faults: the attempt count and exponential backoff, as before.
        (ConnectError("refused"), 1, None, 0.5, RetryStep(True, 0.125)),
        (ConnectError("refused"), 2, 30.0, 1.0, RetryStep(True, 0.5)),
        (ConnectError("refused"), 3, None, 0.5, RetryStep(False, reason="3 attempts failed")),
        (ServerError(502, "bad_gateway", "x"), 3, None, 0.5,
         RetryStep(False, reason="3 attempts failed")),
        # Never retried.
        (ServerError(413, "too_large", "x"), 1, None, 0.5, RetryStep(False)),
        (ServerError(507, "insufficient_storage", "disk full"), 1, None, 0.5, RetryStep(False)),
        (ServerError(400, "bad_param", "x"), 1, None, 0.5, RetryStep(False)),
    ],
)
def test_next_retry(error: Exception, faults: int, busy_for: float | None, rand: float,
                    expected: RetryStep) -> None:
    step = next_retry(POLICY, error, faults=faults, busy_for=busy_for, rand=rand)  # type: ignore[arg-type]
    assert step == expected


def test_zero_patience_gives_up_at_the_first_busy_answer() -> None:
    policy = RetryPolicy(overload_patience=0)
    step = next_retry(policy, overloaded("1"), faults=0, busy_for=0.0, rand=0.5)
    assert step == RetryStep(False, busy=True, reason="server busy and overload_patience is 0")
    with pytest.raises(InvalidRequest, match="overload_patience must be >= 0"):
        RetryPolicy(overload_patience=-1)


# --------------------------------------------------------------------------- the AIMD window


def test_window_starts_at_the_ceiling_and_a_cut_happens_once_per_episode() -> None:
    window = AdaptiveConcurrency(ceiling=64)
    assert window.limit == 64
    sent = window.epoch
    # 52 requests sent together are turned away together: one cut, not 52.
    cuts = [window.on_overload(sent) for _ in range(52)]
    assert cuts.count(True) == 1
    assert window.limit == 44  # 64 * 0.7
    # Requests sent after the cut cut again.
    assert window.on_overload(window.epoch) is True
    assert window.limit == 31


@pytest.mark.parametrize(
    ("ceiling", "overload_episodes", "successes", "limit"),
    [
        (64, 0, 0, 64),
        (64, 0, 100, 64),  # never above the ceiling
        (64, 1, 0, 44),
        (64, 3, 0, 21),  # 64 * 0.7^3 = 21.95
        (64, 30, 0, 1),  # floor 1
        (8, 30, 1, 2),  # 1 + 1/1: from the floor, the first success doubles
        (8, 30, 3, 2),  # then +1/2 per success
        (8, 30, 4, 3),
        (10, 1, 7, 7),  # 7 + 7 * ~1/7.5 = 7.95
        (10, 1, 8, 8),
    ],
)
def test_window_table(ceiling: int, overload_episodes: int, successes: int, limit: int) -> None:
    window = AdaptiveConcurrency(ceiling=ceiling)
    for _ in range(overload_episodes):
        window.on_overload(window.epoch)
    for _ in range(successes):
        window.on_success()
    assert window.limit == limit


def test_window_refuses_bad_settings() -> None:
    with pytest.raises(InvalidRequest, match="concurrency must be >= 1"):
        AdaptiveConcurrency(ceiling=0)
    with pytest.raises(InvalidRequest, match=r"decrease must be within \(0, 1\)"):
        AdaptiveConcurrency(ceiling=4, decrease=1.0)


def test_limiter_holds_new_requests_to_the_window_and_survives_cancellation() -> None:
    async def scenario() -> None:
        limiter = _AdaptiveLimiter(AdaptiveConcurrency(ceiling=3))
        held: list[Any] = []
        entered = asyncio.Event()
        release = asyncio.Event()

        async def request(outcome: str) -> None:
            async with limiter.slot() as slot:
                held.append(slot)
                entered.set()
                await release.wait()
                slot.outcome = outcome  # type: ignore[assignment]

        first = [asyncio.create_task(request("busy")) for _ in range(3)]
        waiting = [asyncio.create_task(request("ok")) for _ in range(3)]
        await asyncio.wait_for(entered.wait(), 5)
        await asyncio.sleep(0)  # let every task reach the limiter
        assert (limiter.inflight, len(held)) == (3, 3)
        waiting[0].cancel()  # a waiter that leaves must not take a slot with it
        release.set()
        await asyncio.gather(*first)
        # Three busy answers to requests of one epoch: one cut, 3 * 0.7 -> 2.
        assert limiter.control.limit == 2
        await asyncio.gather(*waiting[1:])
        assert waiting[0].cancelled()
        assert limiter.inflight == 0
        assert len(held) == 5

    asyncio.run(scenario())


# --------------------------------------------------------------------------- a shedding server


@dataclass
class Shedding:
    """What the bounded-capacity server saw (updated on its loop's thread)."""

    admitted: int = 0
    max_admitted: int = 0
    completed: int = 0
    shed: int = 0
    arrivals: list[float] = field(default_factory=list)


def shedding_routes(capacity: int, work_s: float, retry_after: str | None = "1",
                    script: list[int] | None = None):
    """POST /process admits `capacity` requests at once, each taking `work_s`; the rest get
    503 overloaded + Retry-After at once. `script`, if given, lists statuses to answer
    first, one per request (503 = overloaded, others as errors)."""
    seen = Shedding()

    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()
        server.shedding = seen  # type: ignore[attr-defined]

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            seen.arrivals.append(time.monotonic())
            if script:
                status = script.pop(0)
                if status != 503:
                    return error_json(status, f"http_{status}", "scripted failure")
            elif seen.admitted < capacity:
                seen.admitted += 1
                seen.max_admitted = max(seen.max_admitted, seen.admitted)
                try:
                    await asyncio.sleep(work_s)  # the simulated image work
                finally:
                    seen.admitted -= 1
                seen.completed += 1
                return web.json_response(result_json(server.url, key=f"k{seen.completed}"))
            seen.shed += 1
            response = error_json(503, "overloaded", f"at capacity ({capacity}); retry later")
            if retry_after is not None:
                response.headers["Retry-After"] = retry_after
            return response

        return r

    return routes


def run_batch(url: str, jobs: int, concurrency: int, policy: RetryPolicy,
              events: list[ProgressEvent] | None = None) -> tuple[list[Any], int]:
    async def scenario() -> tuple[list[Any], int]:
        async with ImageFleetClient(url, concurrency=concurrency, retry=policy) as client:
            batch = [Job(png_bytes(), operation="grayscale", name=f"img{i}")
                     for i in range(jobs)]
            outcomes = await client.process_many(
                batch, progress=events.append if events is not None else None)
            return outcomes, client.concurrency_limit

    return asyncio.run(scenario())


def test_a_batch_far_above_capacity_finishes_without_hammering() -> None:
    """64 requests at once against room for 4 (0.1 s each): all 120 images finish with 2
    attempts for faults, and past the first burst the client sends no more than the
    server takes, so it is rarely turned away again."""
    events: list[ProgressEvent] = []
    server = LoopbackServer(shedding_routes(capacity=4, work_s=0.1))
    with server:
        started = time.monotonic()
        outcomes, limit = run_batch(server.url, jobs=120, concurrency=64,
                                    policy=RetryPolicy(attempts=2), events=events)
        elapsed = time.monotonic() - started
    seen: Shedding = server.shedding  # type: ignore[attr-defined]
    assert [o.error for o in outcomes] == [None] * 120
    assert seen.completed == 120
    assert seen.max_admitted == 4
    busy = [e for e in events if e.phase == "retrying" and e.busy]
    assert len(busy) == seen.shed
    # The first burst costs 64 - 4 busy answers whatever the client does. After it, a
    # fixed window of 64 is turned away ~50 more times here; the adaptive one ~15.
    after_first_burst = seen.shed - (64 - 4)
    assert after_first_burst < 30, f"{seen.shed} busy answers for 120 images"
    assert seen.shed < 3 * 120
    assert limit < 64
    assert elapsed < 25
    assert all(re.fullmatch(r"server busy, retrying in \d+\.\d s", e.message) for e in busy)
    assert not [e for e in events if e.phase == "failed"]


def test_busy_answers_do_not_use_up_the_attempts_meant_for_faults() -> None:
    """6 busy answers, then 2 faults (502), then success, with attempts=3: the faults are
    the 2nd and 3rd failures of a 3-attempt budget; the busy ones count for nothing."""
    script = [503] * 6 + [502, 502]
    events: list[ProgressEvent] = []
    server = LoopbackServer(shedding_routes(capacity=1, work_s=0, retry_after="0.1",
                                            script=script))
    with server:
        outcomes, _ = run_batch(server.url, jobs=1, concurrency=1, events=events,
                                policy=RetryPolicy(attempts=3, backoff_base=0.01))
    assert outcomes[0].ok, outcomes[0].error
    assert outcomes[0].result.attempts == 9
    retries = [e for e in events if e.phase == "retrying"]
    assert [e.busy for e in retries] == [True] * 6 + [False] * 2
    assert "502 http_502: scripted failure" in retries[-1].message
    assert "attempt 9 in" in retries[-1].message


def test_retry_after_is_honoured_with_jitter() -> None:
    """Each busy answer says Retry-After: 1; the next try comes 1 to 2 s later."""
    server = LoopbackServer(shedding_routes(capacity=1, work_s=0, script=[503, 503]))
    with server:
        outcomes, _ = run_batch(server.url, jobs=1, concurrency=1, policy=RetryPolicy())
    seen: Shedding = server.shedding  # type: ignore[attr-defined]
    assert outcomes[0].ok
    gaps = np.diff(seen.arrivals)
    assert len(gaps) == 2
    assert all(1.0 <= gap < 2.5 for gap in gaps), gaps  # 2 s plus scheduling slack


def test_a_server_busy_for_longer_than_the_patience_fails_the_request_clearly() -> None:
    server = LoopbackServer(shedding_routes(capacity=0, work_s=0, retry_after="0.2"))
    with server:
        started = time.monotonic()
        outcomes, _ = run_batch(server.url, jobs=1, concurrency=1,
                                policy=RetryPolicy(attempts=2, overload_patience=1.0))
        elapsed = time.monotonic() - started
    error = outcomes[0].error
    assert isinstance(error, ServerError)
    assert (error.status, error.code) == (503, "overloaded")
    assert error.attempts >= 4  # many more than the 2 attempts meant for faults
    assert "server still busy after 1 s (overload_patience 1 s)" in str(error)
    assert 1.0 <= elapsed < 5


@pytest.mark.parametrize(("status", "code"), [(413, "too_large"), (507, "insufficient_storage")])
def test_too_large_and_insufficient_storage_are_never_retried(status: int, code: str) -> None:
    def routes(server: LoopbackServer) -> web.RouteTableDef:
        r = web.RouteTableDef()

        @r.post("/process")
        async def process(request: web.Request) -> web.Response:
            await request.read()
            response = error_json(status, code, "no")
            response.headers["Retry-After"] = "1"  # even when the answer names one
            return response

        return r

    server = LoopbackServer(routes)
    with server:
        outcomes, _ = run_batch(server.url, jobs=1, concurrency=1, policy=RetryPolicy())
    error = outcomes[0].error
    assert isinstance(error, ServerError)
    assert (error.status, error.code, error.attempts) == (status, code, 1)
    assert server.stats.requests == 1


def test_health_reports_load_when_the_server_does() -> None:
    base = {"status": "ok", "instance_id": "w1", "inflight": 3, "processed": 9,
            "uptime_s": 1.0, "version": "1"}
    assert parse_health(base).load is None
    load = parse_health({**base, "load": {"busy": 2, "slots": 2, "queued": 1, "queue_limit": 4,
                                          "completed": 9, "shed": 5}}).load
    assert load is not None
    assert (load.busy, load.slots, load.queued, load.queue_limit, load.completed) == (
        2, 2, 1, 4, 9)


# --------------------------------------------------------------------------- a real local fleet

BATCH = 160
SIZE = (640, 480)


def make_inputs(folder: Path, count: int) -> list[Path]:
    """`count` distinct 640x480 JPEGs: crops at shifting offsets of the test photographs
    (scaled up where smaller), so no two share bytes and the result cache never answers."""
    folder.mkdir()
    photos = []
    for path in sorted(IMAGES_DIR.glob("*.jpg")) + sorted(IMAGES_DIR.glob("*.png")):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            continue
        scale = max((SIZE[0] + 64) / image.shape[1], (SIZE[1] + 64) / image.shape[0], 1.0)
        if scale > 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        photos.append(image)
    paths = []
    for i in range(count):
        image = photos[i % len(photos)]
        shift = i // len(photos)
        x = (shift * 7) % (image.shape[1] - SIZE[0] + 1)
        y = (shift * 5) % (image.shape[0] - SIZE[1] + 1)
        crop = np.ascontiguousarray(image[y:y + SIZE[1], x:x + SIZE[0]])
        path = folder / f"img{i:03d}.jpg"
        assert cv2.imwrite(str(path), crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
        paths.append(path)
    assert len({p.read_bytes() for p in paths}) == count
    return paths


@pytest.fixture
def local_fleet(tmp_path: Path) -> Iterator[str]:
    """`python -m fleet local --workers 2` as a subprocess; SIGTERMed and waited for."""
    port = free_port()
    log = (tmp_path / "fleet.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "local", "--workers", "2", "--port", str(port),
         "--storage", str(tmp_path / "storage")],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"

    def two_healthy() -> bool:
        assert proc.poll() is None, "the fleet exited"
        fleet = requests.get(f"{endpoint}/fleet", timeout=2).json()
        return [i["health"] for i in fleet["instances"]] == ["healthy", "healthy"]

    try:
        wait_until(two_healthy, timeout=90, interval=0.2, what="2 healthy workers")
        yield endpoint
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.slow
def test_the_batch_command_at_concurrency_64_against_two_workers(
    local_fleet: str, tmp_path: Path
) -> None:
    inputs = make_inputs(tmp_path / "in", BATCH)
    done = subprocess.run(
        [sys.executable, "-m", "scripts.process", "--endpoint", local_fleet, "--op", "bilateral",
         "--param", "diameter=9", "--concurrency", "64", str(tmp_path / "in")],
        cwd=REPO, capture_output=True, text=True, timeout=180, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == BATCH
    assert sorted(Path(row[0]).name for row in rows) == sorted(p.name for p in inputs)
    assert all(row[1].startswith(f"{local_fleet}/results/") for row in rows)
    summary = done.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{BATCH} ok, 0 failed in"), summary
    busy = re.search(r"server busy (\d+) times", summary)
    shed = int(busy.group(1)) if busy else 0
    assert shed < 3 * BATCH, summary
    assert "FAILED" not in done.stdout
    print(f"\n{summary}")
