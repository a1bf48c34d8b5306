"""Render the desktop app's main views into PNG files for the README.

    python -m scripts.screenshots [--out assets] [--images DIR] [--display :N]

Starts its own Xvfb (unless ``--display`` names a running X server), opens the app on
an embedded local fleet with throw-away settings, adds test photographs, processes
them, and captures the Process (light and dark), Fleet and Settings views with
Pillow's ``ImageGrab`` (window capture through the X display).
"""

from __future__ import annotations

import argparse
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


def load_run(app: Any, endpoint: str, images: Path, seconds: float) -> None:
    """Four clients posting photographs for ``seconds`` (a small bench_overload), while
    the app keeps drawing, so the Fleet view's charts show a load run."""
    import threading

    import requests

    photos = [p.read_bytes() for p in sorted(images.glob("*.png"))[:4]] or [b""]
    stop = time.monotonic() + seconds

    def client(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            requests.post(endpoint + "/process", timeout=60,
                          files={"image": ("p.png", photos[(n + i) % len(photos)])},
                          data={"operation": "rotate", "params": f'{{"angle": {i % 360}}}'})

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    pump_until(app, lambda: not any(t.is_alive() for t in threads), seconds + 90, "the load")


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
            load_run(app, app.connected.endpoint, images, seconds=40.0)
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
