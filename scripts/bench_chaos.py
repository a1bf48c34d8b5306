"""The chaos run, repeated: 200 images through the batch command while a serving worker
of a local fleet of 2 is SIGKILLed every 2 s, ``--runs`` times (default 20).

    python -m scripts.bench_chaos [--runs 20] [--images 200] [--every 2]
        [--concurrency 8] [--size 640x480] [--kill-last]

Each run starts a fresh fleet (its own storage folder, so no result is served from an
earlier run's cache) and runs ``python -m scripts.process --op bilateral`` over the same
folder of distinct JPEGs (640x480 by default; the first kill after 0.5 s, then every 2 s;
a kill is skipped while only one worker serves, unless ``--kill-last``).
Prints, per run, the images lost (failed), the kills and the batch time; then the total
lost over all runs (target: 0) and the median batch time. Exit status 1 when any image
was lost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.chaos import CHAOS_IMAGE_SIZE, chaos_run, distinct_jpegs, write_images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between kills")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", default="x".join(map(str, CHAOS_IMAGE_SIZE)),
                        help="image size WxH (default: the chaos test's)")
    parser.add_argument("--kill-last", action="store_true",
                        help="also kill the only serving worker (a full outage whenever a "
                             "kill outruns the replacement)")
    args = parser.parse_args()

    width, _, height = args.size.partition("x")
    size = (int(width), int(height))
    lost_total, times, kills_total = 0, [], 0
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        folder = write_images(Path(tmp) / "in", distinct_jpegs(args.images, size))
        print(f"{args.runs} runs: {args.images} {args.size} images, batch command at concurrency "
              f"{args.concurrency}, a serving worker of 2 SIGKILLed every {args.every:g} s"
              + (" (the last one too)" if args.kill_last else " (never the last one)"))
        for run in range(args.runs):
            started = time.monotonic()
            done = chaos_run(Path(tmp) / f"storage-{run}", folder, seed=run,
                             every=args.every, concurrency=args.concurrency,
                             spare_last=not args.kill_last)
            elapsed = time.monotonic() - started
            lost = done.failed if done.failed >= 0 else args.images
            lost_total += lost
            kills_total += len(done.kills)
            times.append(elapsed)
            print(f"  run {run + 1:2}: {lost} lost, {len(done.kills)} kills, "
                  f"{elapsed:.1f} s (exit {done.returncode})", flush=True)
            if lost:
                # "[n/N] failed PATH: ERROR" lines and the "N ok, M failed in ..." summary
                for line in done.stderr.strip().splitlines():
                    if " failed " in line:
                        print("    " + line, flush=True)
    print(f"total: {lost_total} lost of {args.runs * args.images} images in {args.runs} "
          f"runs, {kills_total} kills; median run {statistics.median(times):.1f} s "
          "(fleet start included)")
    return 1 if lost_total else 0


if __name__ == "__main__":
    sys.exit(main())
