"""Self-healing and throughput of a local fleet (gateway + ``python -m server`` workers).

    python scripts/bench_fleet.py [--trials 5] [--images 200] [--kill-every 3]

Prints medians of:
- seconds from SIGKILL of a worker to the manager noticing it (``instance_died``), and
  to its replacement passing the gateway's health checks (default checks: every 1 s,
  healthy after 2 successes) — targets <= 2 s and <= 6 s;
- the same for a hung worker (SIGSTOP): seconds to being out of rotation (two failed
  checks with a 1 s timeout), to being judged hung and killed (10 s without progress:
  busy is not dead) and to its replacement being healthy;
- a batch of ``--images`` distinct images through the gateway with gui/client/ while a
  worker is SIGKILLed every ``--kill-every`` seconds: failed images (target 0) and
  whether every result link downloads and decodes afterwards;
- batch throughput (images/s) with 1 and 2 workers, no kills.
Every job is distinct (its own bilateral sigma_color), so the result cache never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.local.runtime import LocalFleet
from gui.client import ImageFleetClient, Job, RetryPolicy
from scripts.chaos import WorkerKiller

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "images"
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg",
          "hubble_deep_field.jpg", "retina.jpg")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def healthy_ids(fleet: LocalFleet) -> set[str]:
    return {i["id"] for i in fleet.snapshot()["instances"]
            if i["health"] == "healthy" and i["state"] == "running"}


def event_time(fleet: LocalFleet, kind: str, instance_id: str | None = None,
               after: float = 0.0) -> float | None:
    from datetime import datetime

    for event in fleet.snapshot()["events"]:
        at = datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()
        if event["kind"] == kind and at >= after and (
                instance_id is None or event["instance_id"] == instance_id):
            return at
    return None


def one_recovery(fleet: LocalFleet, victim: str,
                 sig: signal.Signals = signal.SIGKILL) -> tuple[float, float, float | None]:
    """Signal ``victim``; seconds until the manager reports it (died; for a SIGSTOPped
    one: hung, after ``no_progress_timeout_s`` without progress), until a replacement
    passes its health checks, and for a SIGSTOPped one until it was out of rotation
    (the ``instance_busy`` event: failing checks, not yet judged hung)."""
    before = healthy_ids(fleet)
    pid = fleet.worker_pids()[victim]
    kind = "instance_died" if sig == signal.SIGKILL else "instance_unhealthy"
    killed_at = time.time()
    os.kill(pid, sig)
    died = wait_for(lambda: event_time(fleet, kind, victim, killed_at), 60,
                    "failure noticed")
    new = next(iter(wait_for(lambda: healthy_ids(fleet) - before, 60, "replacement healthy")))
    healthy_at = wait_for(lambda: event_time(fleet, "instance_healthy", new, killed_at), 30,
                          "healthy event")
    out = event_time(fleet, "instance_busy", victim, killed_at)
    return died - killed_at, healthy_at - killed_at, None if out is None else out - killed_at


def recovery_trials(storage: Path, trials: int, sig: signal.Signals = signal.SIGKILL,
                    ) -> tuple[list[float], list[float], list[float]]:
    """Signal one of two workers, ``trials`` times; default health-check settings."""
    detect, replace, out = [], [], []
    with LocalFleet(workers=2, storage_dir=storage).start(timeout=120) as fleet:
        for trial in range(trials):
            wait_for(lambda: len(healthy_ids(fleet)) == 2, 60, "2 healthy workers")
            detected, replaced, out_at = one_recovery(
                fleet, sorted(healthy_ids(fleet))[trial % 2], sig)
            detect.append(detected)
            replace.append(replaced)
            if out_at is not None:
                out.append(out_at)
            print(f"  trial {trial + 1}: detected {detected:.2f}s, replacement healthy "
                  f"{replaced:.2f}s", file=sys.stderr)
    return detect, replace, out


def make_jobs(count: int) -> list[Job]:
    photos = [(IMAGES / name).read_bytes() for name in PHOTOS]
    # An edge-preserving smoothing (bilateral, d=9) is a typical moderately heavy step.
    return [Job(image=photos[i % len(photos)], operation="bilateral",
                params={"diameter": 9, "sigma_color": round(20 + i * 0.1, 1)},
                name=f"job{i}")
            for i in range(count)]


async def run_batch(endpoint: str, jobs: list[Job], concurrency: int,
                    retry: RetryPolicy) -> tuple[list, float, int]:
    async with ImageFleetClient(endpoint, concurrency=concurrency, retry=retry) as client:
        started = time.monotonic()
        outcomes = await client.process_many(jobs, download=True)
        elapsed = time.monotonic() - started
        # Afterwards, every link must still download (any worker serves any result).
        fetched = 0
        for outcome in outcomes:
            if outcome.ok and outcome.result is not None:
                await client.download_result(outcome.result)
                fetched += 1
    return outcomes, elapsed, fetched


def chaos_batch(storage: Path, count: int, kill_every: float, concurrency: int,
                retry: RetryPolicy) -> dict:
    with LocalFleet(workers=2, storage_dir=storage).start(timeout=120) as fleet:
        wait_for(lambda: len(healthy_ids(fleet)) == 2, 60, "2 healthy workers")
        with WorkerKiller(fleet, kill_every, seed=7) as killer:
            outcomes, elapsed, fetched = asyncio.run(
                run_batch(fleet.endpoint, make_jobs(count), concurrency, retry))
        kills = killer.kills
    failed = [o for o in outcomes if not o.ok]
    return {"images": count, "failed": len(failed), "kills": len(kills),
            "downloaded_after": fetched, "elapsed_s": elapsed,
            "errors": [f"{o.job.label}: {o.error}" for o in failed[:5]]}


def throughput(storage: Path, workers: int, count: int, concurrency: int,
               retry: RetryPolicy) -> float:
    with LocalFleet(workers=workers, storage_dir=storage).start(timeout=120) as fleet:
        wait_for(lambda: len(healthy_ids(fleet)) == workers, 60, f"{workers} healthy")
        outcomes, elapsed, _ = asyncio.run(
            run_batch(fleet.endpoint, make_jobs(count), concurrency, retry))
    if not all(o.ok for o in outcomes):
        raise SystemExit(f"throughput run with {workers} worker(s) had failures")
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--attempts", type=int, default=RetryPolicy().attempts,
                        help="client attempts per request (default: the client's)")
    args = parser.parse_args()
    retry = RetryPolicy(attempts=args.attempts)

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        base = Path(tmp)
        print(f"recovery after SIGKILL ({args.trials} trials, 2 workers, checks every 1 s, "
              "healthy after 2):")
        detect, replace, _ = recovery_trials(base / "recovery", args.trials)
        print(f"  detection:           median {statistics.median(detect):.2f}s "
              f"(min {min(detect):.2f}, max {max(detect):.2f}; target <= 2 s)")
        print(f"  replacement healthy: median {statistics.median(replace):.2f}s "
              f"(min {min(replace):.2f}, max {max(replace):.2f}; target <= 6 s)")

        print(f"recovery after SIGSTOP (hung worker, {args.trials} trials; replaced after "
              "10 s without progress):")
        detect, replace, out = recovery_trials(base / "hung", args.trials, signal.SIGSTOP)
        if out:
            print(f"  out of rotation:     median {statistics.median(out):.2f}s "
                  f"(min {min(out):.2f}, max {max(out):.2f})")
        print(f"  judged hung, killed: median {statistics.median(detect):.2f}s "
              f"(min {min(detect):.2f}, max {max(detect):.2f})")
        print(f"  replacement healthy: median {statistics.median(replace):.2f}s "
              f"(min {min(replace):.2f}, max {max(replace):.2f})")

        print(f"{args.images}-image batch, 2 workers, a worker SIGKILLed every "
              f"{args.kill_every:g}s (client concurrency {args.concurrency}, "
              f"{retry.attempts} attempts):")
        chaos = chaos_batch(base / "chaos", args.images, args.kill_every, args.concurrency,
                            retry)
        print(f"  {chaos['failed']} failed of {chaos['images']}, {chaos['kills']} kills, "
              f"{chaos['downloaded_after']} results downloaded and decoded afterwards, "
              f"{chaos['elapsed_s']:.1f}s")
        for line in chaos["errors"]:
            print(f"    {line}")

        print(f"throughput, {args.images} images, no kills (concurrency "
              f"{args.concurrency}):")
        for workers in (1, 2):
            rate = throughput(base / f"tp{workers}", workers, args.images, args.concurrency,
                              retry)
            print(f"  {workers} worker(s): {rate:.1f} images/s")
    return 1 if chaos["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
