"""Chaos for a local fleet: SIGKILL a serving worker at a fixed interval, and the chaos
batch (the batch command over a folder while that happens). Shared by the chaos test
(``tests/test_fleet_overload.py``) and the benchmarks (``scripts/bench_chaos.py``,
``scripts/bench_fleet.py``), so they measure the same thing.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np

from fleet.local.runtime import LocalFleet

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT.parent / "shared" / "testdata" / "images"
CHAOS_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
# The chaos run: 200 640x480 JPEGs. A fast fleet finishes them in about 3.5 s,
# so the first kill comes after FIRST_KILL_S, not after a whole interval: every run then
# sees at least two kills. (Larger images make runs longer and kills many more; see the
# README for what that costs.)
CHAOS_IMAGE_SIZE = (640, 480)
FIRST_KILL_S = 0.5


def distinct_jpegs(count: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """``count`` different JPEGs of ``size`` cut from the test photographs: distinct
    bytes each, so the fleet's result cache never answers."""
    photos = [cv2.imread(str(IMAGES / name)) for name in CHAOS_PHOTOS]
    rng = np.random.default_rng(11)
    out = []
    for i in range(count):
        photo = cv2.resize(photos[i % len(photos)], (size[0] + 64, size[1] + 64))
        x, y = rng.integers(0, 64, 2)
        crop = np.ascontiguousarray(photo[y:y + size[1], x:x + size[0]])
        crop[0, 0] = (i % 256, i // 256 % 256, 7)
        out.append(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    return out


def write_images(folder: Path, images: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        (folder / f"img_{i:03}.jpg").write_bytes(image)
    return folder


class WorkerKiller:
    """A thread that SIGKILLs a random *serving* (healthy) worker of ``fleet`` every
    ``every`` seconds while the context is open. Only serving workers: killing a
    replacement while it still boots would test the launch backoff, not the loss of
    in-flight requests. Seeded, so a run can be repeated.

    With ``spare_last`` (the default) a kill is skipped while only one worker serves.
    Otherwise how often the killer takes the *only* worker depends on how fast this
    machine boots a replacement (about 2.5 s on an idle one, far longer on a busy one):
    then every attempt of an image can die with its worker, which the client rightly
    cannot tell from an image that kills workers, and gives up on it after its
    attempts. ``spare_last=False`` measures that regime (``bench_chaos --kill-last``)."""

    def __init__(self, fleet: LocalFleet, every: float = 2.0, seed: int = 0,
                 first_after: float | None = None, spare_last: bool = True) -> None:
        self._fleet = fleet
        self._every = every
        self._spare_last = spare_last
        self._first_after = every if first_after is None else first_after
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-killer", daemon=True)
        self.kills: list[str] = []

    def _run(self) -> None:
        wait = self._first_after
        while not self._stop.wait(wait):
            wait = self._every
            pids = self._fleet.worker_pids()
            serving = sorted(i["id"] for i in self._fleet.snapshot()["instances"]
                             if i["health"] == "healthy" and i["id"] in pids)
            if not serving or (self._spare_last and len(serving) < 2):
                continue
            victim = self._rng.choice(serving)
            try:
                os.kill(pids[victim], signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(victim)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class ChaosRun:
    returncode: int
    stderr: str
    kills: list[str] = field(default_factory=list)
    failed: int = 0


def failed_count(stderr: str) -> int:
    """Failed images from the batch command's summary line ("N ok, M failed in ..."),
    or -1 when there is none (the command did not get that far)."""
    found = re.findall(r"(\d+) failed", stderr)
    return int(found[-1]) if found else -1


def chaos_run(storage: Path, folder: Path, seed: int, *, every: float = 2.0,
              concurrency: int = 8, startup: float = 90.0, timeout: float = 400.0,
              spare_last: bool = True) -> ChaosRun:
    """The batch command (bilateral, ``concurrency`` in flight) over ``folder`` on a local
    fleet of 2 while a serving worker is SIGKILLed every ``every`` seconds (never the
    last serving one unless ``spare_last`` is false; see :class:`WorkerKiller`)."""
    with LocalFleet(workers=2, storage_dir=storage).start(startup) as fleet:
        deadline_wait(lambda: fleet.healthy_count() == 2, startup, "2 healthy workers")
        with WorkerKiller(fleet, every, seed, first_after=min(every, FIRST_KILL_S),
                          spare_last=spare_last) as killer:
            done = subprocess.run(
                [sys.executable, "-m", "scripts.process", "--endpoint", fleet.endpoint,
                 "--op", "bilateral", "--concurrency", str(concurrency), str(folder)],
                cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    return ChaosRun(done.returncode, done.stderr, killer.kills, failed_count(done.stderr))


def deadline_wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)
