"""What the batch journal costs, and what a SIGKILL loses.

    python scripts/bench_journal.py [--records 20000] [--kills 7] [--rate 200]

Prints:
- the cost of one record for the caller (a queue put on the UI or event-loop thread),
  median over batches of records;
- the writer's throughput: records committed per second while a burst is queued;
- what a SIGKILL loses: a child process journals images as they "finish" at ``--rate``
  per second and says on stdout after each record; the parent kills it with SIGKILL at a
  random moment and counts the records the child had reported that are not on disk. The
  median and maximum over ``--kills`` kills.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gui.journal import ItemState, Journal

SPEC = {"kind": "bench", "operation": "grayscale"}


def make_inputs(folder: Path, count: int) -> list[Path]:
    paths = []
    for n in range(count):
        path = folder / f"img{n:05}.png"
        path.write_bytes(b"x")
        paths.append(path)
    return paths


def record_cost(folder: Path, records: int) -> tuple[float, float]:
    """(µs per record for the caller, records committed per second)."""
    inputs = make_inputs(folder, records)
    journal = Journal(folder / "journal.sqlite3")
    try:
        batch = journal.begin(SPEC, inputs, endpoint="bench", source="bench")
        journal.flush()
        per_call = []
        chunk = 1000
        t_all = time.perf_counter()
        for start in range(0, records, chunk):
            t0 = time.perf_counter()
            for index in range(start, min(records, start + chunk)):
                journal.record_done(batch, index, key=f"k{index}", url=f"u{index}",
                                    expires_at=None)
            per_call.append((time.perf_counter() - t0) / chunk * 1e6)
        journal.flush(timeout=120)
        throughput = records / (time.perf_counter() - t_all)
        return statistics.median(per_call), throughput
    finally:
        journal.close()


CHILD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from gui.journal import Journal
path, rate, count = Path(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
inputs = sorted(path.parent.glob("img*.png"))[:count]
journal = Journal(path)
batch = journal.begin({"kind": "bench"}, inputs, endpoint="bench", source="bench")
journal.flush()
print("ready", batch, flush=True)
start = time.monotonic()
for index in range(count):
    due = start + index / rate
    while time.monotonic() < due:  # a steady rate of finished images
        time.sleep(min(0.002, max(0.0, due - time.monotonic())))
    journal.record_done(batch, index, key=f"k{index}", url=f"u{index}", expires_at=None)
    print(index, flush=True)
"""


def one_kill(folder: Path, rate: float, count: int, rng: random.Random) -> int:
    path = folder / "journal.sqlite3"
    path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    child = subprocess.Popen([sys.executable, "-c", CHILD, root, str(path), str(rate),
                              str(count)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        head = child.stdout.readline().split()
        batch = head[1]
        kill_after = rng.randint(rate // 2, rate * 2)  # records, i.e. 0.5–2 s in
        reported = 0
        for line in child.stdout:
            reported = int(line) + 1
            if reported >= kill_after:
                break
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    journal = Journal(path)
    try:
        inputs = journal.inputs(batch)
        done = sum(1 for r in inputs if r.outputs and r.outputs[0].state is ItemState.DONE)
    finally:
        journal.close()
    return max(0, reported - done)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--kills", type=int, default=7)
    parser.add_argument("--rate", type=int, default=200, help="images finished per second")
    args = parser.parse_args(argv)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        per_call, throughput = record_cost(folder, args.records)
        print(f"record, caller's cost: {per_call:.1f} µs (median per 1000)")
        print(f"writer: {throughput:,.0f} records committed per second (burst of "
              f"{args.records:,})")
        kill_dir = folder / "kill"
        kill_dir.mkdir()
        make_inputs(kill_dir, args.rate * 3)
        lost = [one_kill(kill_dir, args.rate, args.rate * 3, rng) for _ in range(args.kills)]
        print(f"SIGKILL at {args.rate} images/s: lost records median "
              f"{statistics.median(lost):g}, max {max(lost)} over {args.kills} kills "
              f"({lost})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
