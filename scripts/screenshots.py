"""Render the desktop app's main views into PNG files for the README.

    python -m scripts.screenshots [--out assets] [--images DIR] [--display :N]

Starts its own Xvfb (unless ``--display`` names a running X server), opens the app on
an embedded local fleet with throw-away settings, adds test photographs, processes
them, and captures the Process (light and dark), Fleet and Settings views with
Pillow's ``ImageGrab`` (window capture through the X display).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


@contextmanager
def xvfb() -> Iterator[str]:
    """A private Xvfb; ``-displayfd`` makes it pick a free display and say when ready."""
    binary = shutil.which("Xvfb")
    if binary is None:
        raise SystemExit("Xvfb is not installed (scripts/install_system_deps.sh)")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([binary, "-displayfd", str(write_fd), "-screen", "0",
                             "1280x800x24", "-nolisten", "tcp"],
                            pass_fds=(write_fd,), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()  # written once the server accepts clients
    if not number:
        proc.wait(5)
        raise SystemExit(f"Xvfb failed to start (exit {proc.returncode})")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        proc.wait(10)


def pump_until(app: Any, predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        app.update()
        time.sleep(0.01)


def settle(app: Any, seconds: float = 0.6) -> None:
    """Let redraws (and CustomTkinter's own deferred drawing) finish before a capture."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        app.update()
        time.sleep(0.01)


def capture(app: Any, display: str, path: Path) -> Path:
    from PIL import ImageGrab

    app.update()
    x, y = app.winfo_rootx(), app.winfo_rooty()
    box = (x, y, x + app.winfo_width(), y + app.winfo_height())
    ImageGrab.grab(bbox=box, xdisplay=display).save(path, optimize=True)
    print(path)
    return path


LOAD_PHASES = ((2, 30.0), (6, 30.0), (24, 30.0), (3, 30.0))  # (clients, seconds)
KILL_IN_PHASE = 2  # ten seconds into the third phase


def load_run(app: Any, endpoint: str, images: Path) -> None:
    """A small bench_overload while the app keeps drawing, so the Fleet view's charts show
    a load run: clients rising from 2 to 24 (more than the fleet admits, so some are shed)
    and back to 3, each request a distinct bilateral filter (nothing from the cache), and
    one worker killed with SIGKILL in the middle, so a dip and its replacement show."""
    import random
    import threading

    import requests

    photos = [p.read_bytes() for p in sorted(images.glob("*.png"))[:4]] or [b""]

    def client(seed: int, until: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            params = f'{{"diameter": 7, "sigma_color": {rng.randint(10, 250)}}}'
            # a connection cut by the killed worker: the next request goes on
            with contextlib.suppress(requests.RequestException):
                requests.post(endpoint + "/process", timeout=60,
                              files={"image": ("p.png", photos[seed % len(photos)])},
                              data={"operation": "bilateral", "params": params})

    threads: list[threading.Thread] = []
    for phase, (clients, seconds) in enumerate(LOAD_PHASES):
        until = time.monotonic() + seconds
        for n in range(clients):
            threads.append(threading.Thread(target=client, args=(100 * phase + n, until),
                                            daemon=True))
            threads[-1].start()
        if phase == KILL_IN_PHASE:
            settle(app, 10.0)
            kill_one_worker(endpoint)
        pump_until(app, lambda until=until: time.monotonic() >= until, seconds + 5,
                   f"load phase {phase + 1}")
    pump_until(app, lambda: not any(t.is_alive() for t in threads), 90, "the load")


def kill_one_worker(endpoint: str) -> None:
    """SIGKILL one worker of the fleet, by the pid its own /health reports."""
    import signal

    import requests

    instances = requests.get(endpoint + "/fleet", timeout=5).json()["instances"]
    address = next(i["address"] for i in instances if i["address"])
    os.kill(requests.get(f"http://{address}/health", timeout=5).json()["pid"], signal.SIGKILL)


def render(display: str, out: Path, images: Path) -> list[Path]:
    os.environ["DISPLAY"] = display
    import customtkinter as ctk

    from gui.app import ImageFleetApp

    shots = []
    with tempfile.TemporaryDirectory(prefix="imagefleet-shots-") as tmp:
        # a throw-away home: the shots show ~/.config/... and nothing of this machine
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("IMAGEFLEET_", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"))}
        env["HOME"] = tmp
        env["IMAGEFLEET_SAMPLE_INTERVAL"] = "1"  # a dense window for the Fleet view's charts
        app = ImageFleetApp(environ=env)
        try:
            app.geometry("1280x800+0+0")
            pump_until(app, lambda: app.connected is not None, 90, "the local fleet")
            app.process.add_images([images / name for name in PHOTOS if (images / name).exists()])
            pump_until(app, lambda: len(app.process.batch) > 0 and app.process.images_loaded(), 30,
                       "the thumbnails")
            view = app.process_view
            view.select_operation("sepia" if "sepia" in view.operations else
                                  next(iter(view.operations)))
            app.process.add_step()
            view.select_operation("clahe" if "clahe" in view.operations else
                                  next(iter(view.operations)))
            app.process.add_step()
            app.process.process_all()
            pump_until(app, lambda: not app.process.batch.running, 120, "processing")
            app.hide_banner()
            settle(app, 1.0)  # previews asked for while the steps were being set up
            # a processed image shows its result, not a preview
            first = app.process.batch.jobs[0].id
            app.process.select_image(first)
            # the result is downloaded and decoded when its image is selected
            pump_until(app, lambda: app.process.shown_result == first, 30, "the result")
            settle(app)
            shots.append(capture(app, display, out / "process.png"))

            view.set_preview_mode("Slider", split=0.5)
            ctk.set_appearance_mode("dark")
            app.fleet_view.apply_theme()
            settle(app)
            shots.append(capture(app, display, out / "process-dark.png"))
            view.set_preview_mode("Side by side")

            app.show_view("Fleet")
            pump_until(app, lambda: app.fleet_view.instance_ids() and all(
                app.fleet_view.health_of(i) == "healthy"
                for i in app.fleet_view.instance_ids()), 30, "a healthy fleet")
            app.fleet_view.charts._choose("5 min")
            load_run(app, app.connected.endpoint, images)
            settle(app, 1.0)
            shots.append(capture(app, display, out / "fleet.png"))

            ctk.set_appearance_mode("light")
            app.fleet_view.apply_theme()
            app.show_view("Settings")
            settle(app)
            shots.append(capture(app, display, out / "settings.png"))
        finally:
            app.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.screenshots",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "assets",
                        help="folder for the PNG files (default: assets/)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder with the test photographs")
    parser.add_argument("--display", help="use this running X display instead of an Xvfb")
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"no test photographs in {args.images}; pass --images DIR", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.display:
        render(args.display, args.out, args.images)
    else:
        with xvfb() as display:
            render(display, args.out, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
