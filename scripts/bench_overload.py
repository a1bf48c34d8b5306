"""Goodput and /health latency of a local fleet under overload (open-loop load).

    python -m scripts.bench_overload [--workers 2] [--loads 1,2,3,4,6,8] [--step-s 12]
        [--plot assets/overload.png] [--json FILE]

1. Starts ``python -m fleet local --workers N`` on a free port with a temporary storage
   folder (stopped by its pid with SIGTERM at the end, whatever happens).
2. Measures the fleet's capacity: successful images/s of a closed loop at a modest
   concurrency (``--capacity-concurrency``, default 4: the workers' slots) for
   ``--capacity-s`` seconds.
3. Offers load at each multiple of that capacity in ``--loads``: open loop, a fixed
   arrival rate for ``--step-s`` seconds whatever the answers, each request one attempt
   and no client retries, so what the fleet sheds counts as shed. Meanwhile GET /health
   is polled through the gateway every 100 ms (from another process, on its own
   connection, as a load balancer's checks are).
4. Prints a table (offered load, goodput, shed/s, errors, p50/p99 latency of the
   successful requests, p99 of /health) and draws ``--plot`` (goodput and /health p99
   against offered load) with Pillow.

Every request is a distinct 640x480 JPEG (a unique comment segment), so the result cache
never answers. Goodput and shed/s count what completes from 1 s after a step starts to
its end; the step's stragglers are waited for before the next step. Targets: goodput at
the highest load >= 90 % of goodput at 1x, /health p99 < 250 ms at every load. The exit
status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import math
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from scripts.benchlib import (
    ROOT,
    derived,
    free_port,
    jpeg,
    multipart_body,
    percentile,
    with_nonce,
)

HEALTH_EVERY_S = 0.1
WARMUP_S = 1.0
REQUEST_TIMEOUT_S = 30.0
HEALTH_TIMEOUT_S = 5.0
TARGET_GOODPUT_RATIO = 0.9
TARGET_HEALTH_P99_MS = 250.0


# --------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class Sample:
    """One request: when it was sent and answered (monotonic), and how it ended.

    ``outcome`` is ``ok``, ``shed`` (503 overloaded) or an error label such as
    ``502 bad_gateway`` or ``ReadTimeout``.
    """

    sent: float
    done: float
    outcome: str

    @property
    def latency(self) -> float:
        return self.done - self.sent


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    load: float
    offered_rps: float
    sent: int
    goodput: float
    shed_per_s: float
    errors: int
    error_kinds: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    health_p99_ms: float | None
    health_max_ms: float | None
    health_failed: int


def summarise(load: float, rate: float, started: float, duration: float,
              samples: Sequence[Sample], health: Sequence[tuple[float, bool]]) -> Row:
    """The table row for one step (pure): counts in the steady window, latencies of all."""
    window_start, window_end = started + WARMUP_S, started + duration
    steady = [s for s in samples if window_start <= s.done <= window_end]
    seconds = window_end - window_start
    ok = [s.latency for s in samples if s.outcome == "ok"]
    errors = Counter(s.outcome for s in samples if s.outcome not in ("ok", "shed"))
    health_ms = [latency * 1000 for latency, _ in health]
    return Row(
        load=load,
        offered_rps=rate,
        sent=len(samples),
        goodput=sum(s.outcome == "ok" for s in steady) / seconds,
        shed_per_s=sum(s.outcome == "shed" for s in steady) / seconds,
        errors=sum(errors.values()),
        error_kinds=dict(errors),
        p50_ms=percentile(ok, 0.5) * 1000 if ok else None,
        p99_ms=percentile(ok, 0.99) * 1000 if ok else None,
        health_p99_ms=percentile(health_ms, 0.99) if health_ms else None,
        health_max_ms=max(health_ms) if health_ms else None,
        health_failed=sum(not fine for _, fine in health),
    )


class Bodies:
    """Distinct multipart bodies of one 640x480 JPEG, a unique comment in each."""

    def __init__(self, operation: str, params: dict[str, object]) -> None:
        self._image = jpeg(derived(640, 480), quality=90)
        self._fields = {"operation": operation, "params": json.dumps(params)}
        self._serial = itertools.count()

    def next(self) -> tuple[bytes, str]:
        return multipart_body(with_nonce(self._image, next(self._serial)), "bench.jpg",
                              self._fields)


async def one_request(session: aiohttp.ClientSession, url: str, body: tuple[bytes, str]
                      ) -> Sample:
    data, content_type = body
    sent = time.monotonic()
    try:
        async with session.post(url, data=data, headers={"Content-Type": content_type}) as resp:
            raw = await resp.read()
            if resp.status == 200:
                outcome = "ok"
            else:
                code = ""
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    code = json.loads(raw)["error"]["code"]
                outcome = "shed" if resp.status == 503 and code == "overloaded" else \
                    f"{resp.status} {code}".strip()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        outcome = type(exc).__name__
    return Sample(sent, time.monotonic(), outcome)


def new_session() -> aiohttp.ClientSession:
    # No pool cap: an open loop must never queue in the client, or it is not open.
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S, connect=5.0),
        skip_auto_headers=("User-Agent",),
    )


async def measure_capacity(endpoint: str, bodies: Bodies, concurrency: int,
                           duration: float) -> tuple[float, Counter[str]]:
    """Successful images/s of a closed loop of ``concurrency`` requests."""
    url = f"{endpoint}/process"
    samples: list[Sample] = []
    stop_at = time.monotonic() + duration
    async with new_session() as session:

        async def loop() -> None:
            while time.monotonic() < stop_at:
                samples.append(await one_request(session, url, bodies.next()))

        started = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return sum(s.outcome == "ok" for s in samples) / elapsed, Counter(s.outcome for s in samples)


async def open_loop(endpoint: str, bodies: Bodies, rate: float, duration: float
                    ) -> tuple[float, list[Sample]]:
    """Send ``rate`` requests/s for ``duration`` s whatever the answers; wait for all."""
    url = f"{endpoint}/process"
    count = max(1, round(rate * duration))
    async with new_session() as session:
        tasks = []
        started = time.monotonic()
        for i in range(count):
            # Fixed arrival times: a late tick sends at once rather than shifting the rest.
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(session, url, bodies.next())))
        samples = list(await asyncio.gather(*tasks))
    return started, samples


def poll_health(host: str, port: int, samples: multiprocessing.Queue,
                stop: threading.Event) -> None:
    """The poller process: GET /health every 100 ms on one keep-alive connection, and
    put (sent at, latency s, answered 200/503 with JSON) on ``samples`` for each poll; a
    failure counts with the time it took (at most HEALTH_TIMEOUT_S)."""
    conn: http.client.HTTPConnection | None = None
    next_at = time.monotonic()
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=HEALTH_TIMEOUT_S)
        sent = time.monotonic()
        fine = False
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            json.loads(resp.read())
            fine = resp.status in (200, 503)
        except (OSError, http.client.HTTPException, ValueError):
            conn.close()
            conn = None
        done = time.monotonic()
        samples.put((sent, done - sent, fine))
        next_at = max(next_at + HEALTH_EVERY_S, done)
        stop.wait(max(0.0, next_at - time.monotonic()))
    if conn is not None:
        conn.close()


class HealthPoller:
    """:func:`poll_health` in its own process, as a load balancer's checks are: a thread
    here would wait for this process's GIL behind the load generator and measure the
    benchmark, not the fleet. (``time.monotonic`` is system-wide on Linux and macOS, so
    the poller's timestamps compare with the steps'.)"""

    def __init__(self, endpoint: str) -> None:
        host, _, port = endpoint.removeprefix("http://").partition(":")
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(target=poll_health, name="health-poller",
                                        args=(host, int(port), self._queue, self._stop),
                                        daemon=True)
        self._samples: list[tuple[float, float, bool]] = []  # (at, latency, fine)

    def __enter__(self) -> HealthPoller:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._drain()
        self._process.join(HEALTH_TIMEOUT_S + 5)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)

    def _drain(self) -> None:
        while True:
            try:
                self._samples.append(self._queue.get_nowait())
            except queue.Empty:
                return

    def between(self, start: float, end: float) -> list[tuple[float, bool]]:
        self._drain()
        return [(latency, fine) for at, latency, fine in self._samples if start <= at <= end]


# --------------------------------------------------------------------------- the fleet


@dataclass
class Fleet:
    endpoint: str
    proc: subprocess.Popen
    log_path: Path
    log_file: object = field(repr=False)


def healthy_workers(endpoint: str) -> int:
    try:
        conn = http.client.HTTPConnection(endpoint.removeprefix("http://"), timeout=2)
        conn.request("GET", "/fleet")
        state = json.loads(conn.getresponse().read())
        conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return 0
    return sum(i["health"] == "healthy" for i in state.get("instances", []))


def start_fleet(base: Path, workers: int) -> Fleet:
    port = free_port()
    log_path = base / "fleet.log"
    log_file = log_path.open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "local", "--workers", str(workers), "--port",
         str(port), "--storage", str(base / "storage")],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    fleet = Fleet(f"http://127.0.0.1:{port}", proc, log_path, log_file)
    deadline = time.monotonic() + 90
    while healthy_workers(fleet.endpoint) < workers:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_fleet(fleet)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the fleet did not get {workers} healthy workers:\n{tail}")
        time.sleep(0.2)
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    """SIGTERM the fleet by its pid and wait: it drains and stops its own workers."""
    if fleet.proc.poll() is None:
        fleet.proc.send_signal(signal.SIGTERM)
    try:
        fleet.proc.wait(60)
    except subprocess.TimeoutExpired:
        fleet.proc.kill()
        fleet.proc.wait(10)
    fleet.log_file.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def running_fleet(workers: int) -> Iterator[Fleet]:
    with tempfile.TemporaryDirectory(prefix="bench-overload-") as tmp:
        fleet = start_fleet(Path(tmp), workers)
        try:
            yield fleet
        finally:
            stop_fleet(fleet)


# --------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(rows: Sequence[Row], capacity: float) -> str:
    base = rows[0].goodput if rows else 0.0
    lines = [
        f"capacity (closed loop): {capacity:.1f} images/s",
        "offered        | goodput          | shed/s | errors | latency ms p50 / p99 "
        "| /health p99 (max) ms",
        "---------------+------------------+--------+--------+----------------------"
        "+---------------------",
    ]
    for row in rows:
        share = f"{100 * row.goodput / base:.0f} %" if base else "-"
        lines.append(
            f"{row.load:>4g}x {row.offered_rps:>5.1f} r/s | {row.goodput:>5.1f} img/s "
            f"{share:>5} | {row.shed_per_s:>6.1f} | {row.errors:>6} | "
            f"{_ms(row.p50_ms):>9} / {_ms(row.p99_ms):<8} | "
            f"{_ms(row.health_p99_ms):>6} ({_ms(row.health_max_ms)})")
    for row in rows:
        if row.error_kinds or row.health_failed:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(row.error_kinds.items()))
            lines.append(f"  {row.load:g}x errors: {kinds or 'none'}; /health polls failed: "
                         f"{row.health_failed}")
    return "\n".join(lines)


def verdict(rows: Sequence[Row]) -> tuple[bool, str]:
    if not rows:
        return False, "no load steps ran"
    first, last = rows[0], rows[-1]
    ratio = last.goodput / first.goodput if first.goodput else 0.0
    worst = max((r.health_p99_ms or math.inf) for r in rows)
    goodput_ok = ratio >= TARGET_GOODPUT_RATIO
    health_ok = worst < TARGET_HEALTH_P99_MS and not any(r.health_failed for r in rows)
    text = (f"goodput at {last.load:g}x is {100 * ratio:.0f} % of {first.load:g}x "
            f"(target >= {100 * TARGET_GOODPUT_RATIO:.0f} %): "
            f"{'met' if goodput_ok else 'MISSED'}; worst /health p99 {worst:.0f} ms "
            f"(target < {TARGET_HEALTH_P99_MS:.0f} ms): {'met' if health_ok else 'MISSED'}")
    return goodput_ok and health_ok, text


def nice_axis(top: float, ticks: int = 4) -> float:
    """The smallest round number (1, 2, 2.5 or 5 x 10^k per tick) at or above ``top``."""
    raw = max(top, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return step * ticks


def plot(rows: Sequence[Row], capacity: float, path: Path, workers: int = 2) -> None:
    """Two panels against offered load: goodput (with capacity and the 90 % line) and
    /health p99 (with the 250 ms target). Drawn with Pillow: no plotting dependency."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin_left, margin_right = 900, 640, 80, 30
    panel_h, top = 230, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=17)
    draw.text((margin_left, 14), f"Local fleet of {workers} workers under open-loop overload "
              f"(capacity {capacity:.1f} images/s)", fill="black", font=title_font)
    max_load = max(r.load for r in rows)
    x_of = lambda load: margin_left + (width - margin_left - margin_right) * load / max_load  # noqa: E731

    def panel(y0: int, label: str, values: list[float | None], y_max: float,
              guides: list[tuple[float, str, str]], colour: str) -> None:
        y1 = y0 + panel_h
        y_max = nice_axis(y_max)
        y_of = lambda v: y1 - panel_h * min(v, y_max) / y_max  # noqa: E731
        draw.rectangle((margin_left, y0, width - margin_right, y1), outline="#888")
        for i in range(5):
            value = y_max * i / 4
            y = y_of(value)
            draw.line((margin_left, y, width - margin_right, y), fill="#eee")
            draw.text((margin_left - 8, y), f"{value:g}", fill="#444", font=font,
                      anchor="rm")
        for load in sorted({r.load for r in rows}):
            x = x_of(load)
            draw.line((x, y0, x, y1), fill="#f3f3f3")
            draw.text((x, y1 + 6), f"{load:g}x", fill="#444", font=font, anchor="mt")
        for n, (value, text, guide_colour) in enumerate(guides):
            y = y_of(value)
            for x in range(margin_left, width - margin_right, 12):
                draw.line((x, y, x + 6, y), fill=guide_colour, width=2)
            # At the left, where no data point sits; close guides alternate above/below.
            above = n % 2 == 0
            draw.text((margin_left + 6, y - 4 if above else y + 4), text, fill=guide_colour,
                      font=font, anchor="lb" if above else "lt")
        points = [(x_of(r.load), y_of(v)) for r, v in zip(rows, values, strict=True)
                  if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        for x, y in points:
            draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill=colour)
        draw.text((margin_left, y0 - 20), label, fill="black", font=font)

    goodputs = [r.goodput for r in rows]
    base = rows[0].goodput
    panel(top + 10, "goodput (successful images/s)", list(goodputs),
          max(*goodputs, capacity) * 1.15,
          [(capacity, "capacity", "#999"),
           (TARGET_GOODPUT_RATIO * base, f"90 % of {rows[0].load:g}x", "#d08000")], "#1f6fb4")
    health = [r.health_p99_ms for r in rows]
    worst = max((h for h in health if h is not None), default=0.0)
    panel(top + panel_h + 80, "GET /health p99 through the gateway (ms)", health,
          max(worst, TARGET_HEALTH_P99_MS) * 1.1,
          [(TARGET_HEALTH_P99_MS, "target 250 ms", "#c03030")], "#2a9d4a")
    draw.text((width // 2, height - 22), "offered load (multiples of capacity)",
              fill="black", font=font, anchor="mm")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


# --------------------------------------------------------------------------- main


def parse_loads(text: str) -> list[float]:
    try:
        loads = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--loads must be numbers like 1,2,4,8: {text!r}") from None
    if not loads or any(not 0 < x <= 50 for x in loads):
        raise argparse.ArgumentTypeError("--loads must be multiples of capacity in (0, 50]")
    return loads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loads", type=parse_loads, default=parse_loads("1,2,3,4,6,8"),
                        help="offered loads, as multiples of the measured capacity")
    parser.add_argument("--step-s", type=float, default=12.0, help="seconds per load step")
    parser.add_argument("--capacity-s", type=float, default=8.0)
    parser.add_argument("--capacity-concurrency", type=int, default=4)
    parser.add_argument("--op", default="bilateral")
    parser.add_argument("--params", type=json.loads, default={"diameter": 9},
                        help='operation parameters as JSON (default {"diameter": 9})')
    parser.add_argument("--plot", type=Path, default=ROOT / "assets" / "overload.png")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    bodies = Bodies(args.op, args.params)
    began = time.monotonic()
    rows: list[Row] = []
    with running_fleet(args.workers) as fleet:
        print(f"fleet of {args.workers} workers on {fleet.endpoint}; {args.op} "
              f"{json.dumps(args.params)} on 640x480 JPEGs", flush=True)
        capacity, outcomes = asyncio.run(measure_capacity(
            fleet.endpoint, bodies, args.capacity_concurrency, args.capacity_s))
        print(f"capacity at concurrency {args.capacity_concurrency}: {capacity:.1f} images/s "
              f"({dict(outcomes)})", flush=True)
        if capacity <= 0:
            raise SystemExit("no request succeeded while measuring capacity")
        with HealthPoller(fleet.endpoint) as poller:
            for load in args.loads:
                rate = load * capacity
                started, samples = asyncio.run(open_loop(fleet.endpoint, bodies, rate,
                                                         args.step_s))
                health = poller.between(started, started + args.step_s)
                row = summarise(load, rate, started, args.step_s, samples, health)
                rows.append(row)
                print(f"  {load:g}x: {row.goodput:.1f} img/s ok, {row.shed_per_s:.1f} shed/s, "
                      f"{row.errors} errors, /health p99 {_ms(row.health_p99_ms)} ms", flush=True)
    print()
    print(table(rows, capacity))
    met, text = verdict(rows)
    print(text)
    print(f"total {time.monotonic() - began:.0f} s")
    plot(rows, capacity, args.plot, args.workers)
    print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"capacity": capacity,
                                         "rows": [asdict(r) for r in rows]}, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
