"""The desktop app at volume: the real app under Xvfb, N images, a real local fleet.

    python -m scripts.bench_gui [--images 10000] [--workers 2] [--concurrency 4] [--op invert]

Starts Xvfb and ``python -m fleet local`` itself, writes three sets of N small JPEGs
(320x240, derived from the test photographs; every file has its own comment segment, so
the bytes differ and the servers' result cache never answers), then:

1. runs ``python -m scripts.process`` on set A against the fleet (the reference);
2. runs the app in a child process (so its memory is its own) pointed at the same
   fleet with ``--endpoint``; the child adds set B's folder, scrolls to the end,
   processes everything with the same operation and concurrency, and reports;
3. runs the command line again on a set C; the app is compared with the mean of 1 and 3.

Prints: time until the list is usable after adding (rows on screen, scrolled to the
last image), the longest UI stall (a Tk ``after(10)`` heartbeat inside the app: the
longest gap beyond 10 ms), peak RSS of the app and of the fleet (gateway + workers),
the app's batch time against the command line's, and whether any worker was replaced
(the fleet's instance ids before and after, from ``GET /fleet``).
Targets: usable <= 1 s, stall <= 200 ms, app RSS <= 500 MB, batch <= 1.2x, none replaced.

The child is this script with ``--child`` (the driving code lives here, not in the app):
it builds ``ImageFleetApp`` and runs Tk's real ``mainloop``, steering the app with
``after`` callbacks the way a user's clicks would arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.xvfb import XvfbError, running_xvfb  # noqa: E402 - after the path above

RESULT_PREFIX = "BENCH_GUI_RESULT "
PHOTOS = ("rocket.jpg", "hubble_deep_field.jpg", "retina.jpg", "coffee.png", "chelsea.png",
          "astronaut.png", "camera.png")


# --------------------------------------------------------------------------- the child


def child(config: dict[str, Any]) -> None:
    """Run the real app, drive it through add → scroll → process, print the figures."""
    from gui.app import ImageFleetApp
    from gui.settings import Settings, save_settings, settings_path

    save_settings(Settings(concurrency=config["concurrency"]), settings_path(os.environ))
    app = ImageFleetApp(config["endpoint"])
    n = config["images"]
    figures: dict[str, Any] = {}
    beat = {"last": time.monotonic(), "max_gap": 0.0, "phase_max": {}, "phase": "start",
            "rss_max": 0}

    gc_pause = {"start": 0.0, "max": 0.0, "gen": -1}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        # the collector's pauses, to tell them from the app's own work in a stall
        if phase == "start":
            gc_pause["start"] = time.perf_counter()
        else:
            took = time.perf_counter() - gc_pause["start"]
            if took > gc_pause["max"]:
                gc_pause["max"], gc_pause["gen"] = took, info["generation"]

    gc.callbacks.append(on_gc)

    def heartbeat() -> None:
        now = time.monotonic()
        gap = now - beat["last"] - 0.010
        beat["last"] = now
        phase = beat["phase"]
        if phase != "start":  # start-up (building the window) is not a stall of use
            beat["max_gap"] = max(beat["max_gap"], gap)
            beat["phase_max"][phase] = max(beat["phase_max"].get(phase, 0.0), gap)
        app.after(10, heartbeat)

    def rss_now() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample_memory() -> None:
        beat["rss_max"] = max(beat["rss_max"], rss_now())
        app.after(100, sample_memory)

    def wait(predicate: Any, then: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout

        def poll() -> None:
            if predicate():
                then()
            elif time.monotonic() > deadline:
                figures["error"] = f"timed out waiting for {what}"
                finish()
            else:
                app.after(5, poll)

        poll()

    def start() -> None:
        figures["rss_before_add"] = rss_now()
        beat["phase"] = "add"
        started = time.monotonic()
        app.process.add_images([config["folder"]])
        view = app.process_view

        def listed() -> None:
            view.image_list.scroll_to_end()
            last = app.process.batch.ids()[-1]
            if last in view.rows:
                figures["list_usable_s"] = time.monotonic() - started
                figures["row_widgets"] = len(view.image_list.pool)
                app.after(1000, run)  # let the visible thumbnails arrive first
            else:
                figures["error"] = "the last image is not on screen after scrolling"
                finish()

        wait(lambda: len(app.process.batch) == n and view.rows, listed, 60, "the list")

    def run() -> None:
        figures["rss_after_add"] = rss_now()
        beat["phase"] = "run"
        app.process_view.select_operation(config["op"])
        started = time.monotonic()
        cpu_started = time.process_time()
        app.process.process_all()

        def ran() -> None:
            figures["batch_s"] = time.monotonic() - started
            figures["run_cpu_s"] = time.process_time() - cpu_started
            overall = app.process.batch.overall()
            figures["done"], figures["failed"] = overall.done, overall.failed
            figures["summary"] = overall.text
            beat["phase"] = "after"
            app.after(500, finish)

        wait(lambda: not app.process.batch.running, ran, 3600, "the run")

    def finish() -> None:
        figures["rss_after_run"] = rss_now()
        figures["stall_max_s"] = beat["max_gap"]
        figures["stall_by_phase_s"] = beat["phase_max"]
        figures["gc_pause_max_s"] = gc_pause["max"]
        figures["gc_pause_generation"] = gc_pause["gen"]
        figures["rss_peak"] = max(beat["rss_max"], figures["rss_after_run"])
        figures["thumbnails_decoded"] = app.process.thumbs.decoded
        figures["failures"] = [repr(f) for f in app.failures][:5]
        print(RESULT_PREFIX + json.dumps(figures), flush=True)
        app.close()

    heartbeat()
    sample_memory()
    wait(lambda: app.connected is not None, lambda: app.after(300, start), 60,
         "the connection")
    app.mainloop()


# --------------------------------------------------------------------------- the parent


@contextlib.contextmanager
def xvfb() -> Iterator[str]:
    """A private Xvfb display from :150 up (away from the GUI tests' :90 and up)."""
    try:
        with running_xvfb(150) as display:
            yield display
    except XvfbError as exc:
        raise SystemExit(str(exc)) from exc


def write_images(folder: Path, count: int, first_nonce: int) -> None:
    from scripts.benchlib import derived, jpeg, with_nonce

    folder.mkdir(parents=True)
    bases = [jpeg(derived(320, 240, name)) for name in PHOTOS]
    for i in range(count):
        data = with_nonce(bases[i % len(bases)], first_nonce + i)
        (folder / f"img_{i:05d}.jpg").write_bytes(data)


def tree_rss(pid: int) -> int:
    """RSS of ``pid`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        ppid = int(fields.get("PPid", "0").strip() or 0)
        children.setdefault(ppid, []).append(int(entry.name))
        rss[int(entry.name)] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss.get(current, 0)
        todo.extend(children.get(current, []))
    return total


def fleet_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/fleet", timeout=5) as resp:
        return json.load(resp)


def healthy_ids(url: str) -> set[str]:
    try:
        state = fleet_state(url)
    except OSError:
        return set()
    return {i["id"] for i in state.get("instances", []) if i.get("health") == "healthy"}


class Sampler:
    """Peak RSS of a process tree, sampled every 0.2 s on the caller's schedule."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._last = pid, 0, 0.0

    def sample(self) -> None:
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self.peak = max(self.peak, tree_rss(self.pid))


def run_watching(cmd: list[str], sampler: Sampler, env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to the end, sampling the fleet's memory meanwhile."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            sampler.sample()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--op", default="invert", help="operation for both runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0

    from fleet.local.provider import free_port

    with tempfile.TemporaryDirectory(prefix="imagefleet-bench-gui-") as tmp, xvfb() as display:
        base = Path(tmp)
        print(f"writing 3 x {args.images} images of 320x240…", flush=True)
        write_images(base / "cli", args.images, 0)
        write_images(base / "app", args.images, 10_000_000)
        write_images(base / "cli2", args.images, 20_000_000)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
        fleet = subprocess.Popen(
            [sys.executable, "-m", "fleet", "local", "--workers", str(args.workers),
             "--port", str(port), "--storage", str(base / "storage")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while len(healthy_ids(url)) < args.workers:
                if time.monotonic() > deadline or fleet.poll() is not None:
                    raise SystemExit("the fleet did not become healthy")
                time.sleep(0.2)
            before = healthy_ids(url)
            sampler = Sampler(fleet.pid)

            def command_line(folder: Path) -> tuple[float, str]:
                done = run_watching([sys.executable, "-m", "scripts.process", "--endpoint",
                                     url, "--op", args.op, "--concurrency",
                                     str(args.concurrency), str(folder)], sampler, env)
                found = re.search(r"(\d+) ok, (\d+) failed in ([\d.]+) s", done.stderr)
                if found is None:
                    raise SystemExit(f"scripts.process said: {done.stderr[-2000:]}")
                return float(found.group(3)), f"{found.group(1)} ok, {found.group(2)} failed"

            # the command line runs before and after the app (each on its own images), so
            # a fleet that slows as its storage fills does not favour either side
            print("command line…", flush=True)
            cli_before, cli_outcome = command_line(base / "cli")
            print("app…", flush=True)
            config = {"endpoint": url, "folder": str(base / "app"), "images": args.images,
                      "op": args.op, "concurrency": args.concurrency}
            app_env = {**env, "DISPLAY": display, "XDG_CONFIG_HOME": str(base / "config"),
                       "XDG_CACHE_HOME": str(base / "cache")}
            app = run_watching([sys.executable, "-m", "scripts.bench_gui", "--child",
                                json.dumps(config)], sampler, app_env)
            line = next((ln for ln in app.stdout.splitlines() if ln.startswith(RESULT_PREFIX)),
                        None)
            if line is None:
                raise SystemExit(f"the app reported nothing: {app.stderr[-3000:]}")
            figures = json.loads(line[len(RESULT_PREFIX):])
            print("command line again…", flush=True)
            cli_after, cli_outcome_2 = command_line(base / "cli2")
            after = healthy_ids(url)
        finally:
            os.killpg(fleet.pid, signal.SIGTERM)
            try:
                fleet.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(fleet.pid, signal.SIGKILL)

    mb = 1024 * 1024
    cli_s = (cli_before + cli_after) / 2
    ratio = figures.get("batch_s", float("nan")) / cli_s
    by_phase = ", ".join(f"{phase} {gap * 1000:.0f}"
                         for phase, gap in figures.get("stall_by_phase_s", {}).items())
    rows = [
        ("images", f"{args.images} (320x240 JPEG), {args.workers} workers, "
                   f"concurrency {args.concurrency}, op {args.op}", ""),
        ("list usable after adding", f"{figures.get('list_usable_s', float('nan')):.2f} s",
         "<= 1 s"),
        ("longest UI stall", f"{figures.get('stall_max_s', float('nan')) * 1000:.0f} ms "
         f"(by phase: {by_phase}; longest garbage-collector pause "
         f"{figures.get('gc_pause_max_s', 0) * 1000:.0f} ms)",
         "<= 200 ms"),
        ("app RSS peak", f"{figures.get('rss_peak', 0) / mb:.0f} MB (before adding "
         f"{figures.get('rss_before_add', 0) / mb:.0f}, listed "
         f"{figures.get('rss_after_add', 0) / mb:.0f}, after the run "
         f"{figures.get('rss_after_run', 0) / mb:.0f})", "<= 500 MB"),
        ("fleet RSS peak", f"{sampler.peak / mb:.0f} MB (gateway + workers)", ""),
        ("batch time", f"app {figures.get('batch_s', float('nan')):.1f} s vs command line "
         f"{cli_s:.1f} s (mean of {cli_before:.1f} before, {cli_after:.1f} after) = "
         f"{ratio:.2f}x; app CPU {figures.get('run_cpu_s', float('nan')):.1f} s",
         "<= 1.2x"),
        ("outcome", f"app: {figures.get('summary', '?')}; command line: "
         f"{cli_outcome}, then {cli_outcome_2}", ""),
        ("workers replaced", "none" if before == after else
         f"yes: {sorted(before)} -> {sorted(after)}", "none"),
        ("row widgets / thumbnails decoded",
         f"{figures.get('row_widgets', '?')} / {figures.get('thumbnails_decoded', '?')}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, target in rows:
        print(f"{name:<{width}}  {value}" + (f"   (target {target})" if target else ""))
    if figures.get("error") or figures.get("failures"):
        print(f"problems: {figures.get('error', '')} {figures.get('failures', '')}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
