"""The real desktop app under Xvfb, on a real embedded local fleet (gateway + worker
processes). Tk is driven by pumping ``app.update()`` until a condition holds.

Modal dialogs are answered through the app's ``Dialogs`` seam (the same methods the
buttons call), so the code under test is the app's own, end to end.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_fleet import pid_alive
from helpers_gui import (
    child_pids,
    pump_until,
    threads_now,
    threads_started_since,
)
from PIL import Image
from waiting import wait_until

pytestmark = pytest.mark.gui

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
FLEET_START = 60.0
PROCESS_TIMEOUT = 60.0


class ScriptedDialogs:
    """Stands in for the file dialogs and confirmations; records what was asked."""

    def __init__(self) -> None:
        self.open_files: list[str] = []
        self.directory: str | None = None
        self.save_as: str | None = None
        self.confirm_answer = True
        self.confirmations: list[str] = []
        self.opened_urls: list[str] = []

    def ask_open_files(self) -> list[str]:
        return self.open_files

    def ask_directory(self, title: str) -> str | None:
        return self.directory

    def ask_save_as(self, initial_name: str) -> str | None:
        return self.save_as

    def confirm(self, title: str, message: str) -> bool:
        self.confirmations.append(message)
        return self.confirm_answer

    def open_url(self, url: str) -> None:
        self.opened_urls.append(url)


@pytest.fixture(scope="module")
def display(x_display: str) -> str:
    """The session's Xvfb (conftest.py: one display for all GUI modules)."""
    return x_display


def app_environ(base: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    env["XDG_CONFIG_HOME"] = str(base / "config")
    env["XDG_CACHE_HOME"] = str(base / "cache")
    return env


@pytest.fixture(scope="module")
def baseline(display: str) -> dict[str, Any]:
    """Threads and child processes before any app exists (Xvfb is a child already)."""
    return {"threads": threads_now(), "children": set(child_pids())}


@pytest.fixture(scope="module")
def fleet_app(display: str, baseline: dict[str, Any],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One app on an embedded local fleet, shared by the tests of this module in order;
    the last test closes it and checks nothing is left."""
    from gui.app import ImageFleetApp

    dialogs = ScriptedDialogs()
    app = ImageFleetApp(environ=app_environ(tmp_path_factory.mktemp("gui")), dialogs=dialogs)
    app.scripted = dialogs
    try:
        pump_until(app, lambda: app.connected is not None, FLEET_START,
                   "the embedded fleet to start and the operations to load")
        yield app
    finally:
        app.close()


def test_process_two_photographs_end_to_end(fleet_app: Any, tmp_path: Path) -> None:
    app = fleet_app
    assert app.connected.embedded
    operations = {op.name for op in app.connected.operations}
    assert "grayscale" in operations

    # the menu item and Ctrl+O call this; the dialog answers with two photographs
    app.scripted.open_files = [str(IMAGES / "astronaut.png"), str(IMAGES / "rocket.jpg")]
    app.process.add_files_dialog()
    pump_until(app, lambda: len(app.process_view.rows) == 2 and app.process.images_loaded(),
               20, "two image rows with thumbnails")
    assert [job.name for job in app.process.batch.jobs] == ["astronaut.png", "rocket.jpg"]

    app.process_view.select_operation("grayscale")
    app.event_generate("<Control-Return>")  # the Process shortcut
    pump_until(app, lambda: app.process.batch.jobs and not app.process.batch.running,
               PROCESS_TIMEOUT, "both images to finish")
    jobs = app.process.batch.jobs
    assert [job.status.value for job in jobs] == ["done", "done"], [j.message for j in jobs]
    assert app.process_view.overall_bar.get() == pytest.approx(1.0)
    assert "2 of 2 done" in app.process_view.overall_label.cget("text")
    for job in jobs:
        assert app.process_view.rows[job.id].bar.get() == pytest.approx(1.0)

    # the selected image's result: instance, time, expiry and link are on screen
    app.process.select_image(jobs[1].id)
    pump_until(app, lambda: app.process_view.link_entry.get() == jobs[1].result.url, 5,
               "the selected result's link")
    meta = app.process_view.result_meta.cget("text")
    assert f"Instance {jobs[1].result.instance_id}" in meta
    assert re.search(r"\d+ ms|\d+\.\d\d s", meta), meta
    assert "link expires in" in app.process_view.expiry_label.cget("text")

    # the link downloads and decodes to the processed image
    response = requests.get(jobs[1].result.url, timeout=30)
    assert response.status_code == 200
    image = Image.open(io.BytesIO(response.content))
    image.load()
    assert image.size == (jobs[1].result.width, jobs[1].result.height)

    # before/after: side by side, then as a slider over one composite (the result is
    # downloaded and decoded when its image is selected, not kept for every image)
    view = app.process_view
    pump_until(app, lambda: app.process.shown_result == jobs[1].id, 20,
               "the selected result in the before/after view")
    assert view.before_label.winfo_ismapped() and view.after_label.winfo_ismapped()
    view.set_preview_mode("Slider", split=0.3)
    app.update()
    assert view.split.winfo_ismapped() and not view.after_label.winfo_ismapped()
    view.set_preview_mode("Side by side")

    app.process.open_link()
    assert app.scripted.opened_urls == [jobs[1].result.url]

    # Ctrl+Shift+C copies the selected link
    app.clipboard_clear()
    app.event_generate("<Control-Shift-C>")
    app.update()
    assert app.clipboard_get() == jobs[1].result.url

    # save all: files named <stem>.<op>.<ext> with the downloaded bytes
    app.scripted.directory = str(tmp_path)
    app.process.save_all()
    pump_until(app, lambda: len(app.process.saved_paths) == 2, 20, "both results saved")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["astronaut.grayscale.png", "rocket.grayscale.jpg"]
    assert (tmp_path / "rocket.grayscale.jpg").read_bytes() == response.content


def test_saving_to_a_missing_folder_shows_the_error(fleet_app: Any, tmp_path: Path) -> None:
    app = fleet_app
    app.hide_banner()
    app.scripted.save_as = str(tmp_path / "no-such-folder" / "out.png")
    app.process.save_as()
    pump_until(app, lambda: "Could not save" in app.banner_text, 10, "the save error banner")
    assert "no-such-folder" in app.banner_text


def test_changing_a_parameter_updates_the_quick_preview(fleet_app: Any) -> None:
    app = fleet_app
    app.process_view.select_operation("gaussian_blur")
    controls = app.process_view.param_controls()
    assert controls, "the blur operation's parameters come from the server's schema"
    name, control = next(iter(controls.items()))
    shown_before = app.process.previews_shown
    spec = control.spec
    control.set(spec.maximum if spec.maximum is not None else spec.default)
    app.process.params_changed()
    pump_until(app, lambda: app.process.previews_shown > shown_before, 20, "a new quick preview")
    assert "Quick preview" in app.process_view.preview_caption.cget("text")
    assert app.process.current_request(preview=True).params[name] == control.value()


def test_failed_image_shows_server_message_and_retry(fleet_app: Any, tmp_path: Path) -> None:
    app = fleet_app
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    app.clipboard_clear()
    app.clipboard_append(f"file://{broken}\n")  # as a file manager copies it
    app.process.paste_paths()
    pump_until(app, lambda: len(app.process.batch) == 3 and app.process.images_loaded(), 10,
               "the broken file in the list")
    assert any("broken.png: not a readable image" in m for m in app.errors_shown)
    job = next(j for j in app.process.batch.jobs if j.name == "broken.png")
    app.process_view.select_operation("invert")
    app.process.retry_image(job.id)  # the Retry button; also runs a never-processed image
    pump_until(app, lambda: app.process.batch.get(job.id).status.value == "failed", PROCESS_TIMEOUT,
               "the broken image to fail")
    row = app.process_view.rows[job.id]
    assert "415" in row.status.cget("text")
    assert row.retry_button.winfo_ismapped()
    app.process.remove_image(job.id)
    pump_until(app, lambda: job.id not in app.process_view.rows, 5, "the row to go")


def test_cancel_stops_the_run_at_once(fleet_app: Any, tmp_path: Path
                                                       ) -> None:
    app = fleet_app
    app.apply_settings({**app.settings_view.raw_values(), "concurrency": "1"})
    pump_until(app, lambda: app.connected is not None and app.settings.concurrency == 1, 30,
               "the reconnect with one image at a time")
    for job in list(app.process.batch.jobs):
        app.process.remove_image(job.id)
    # copies, so the server's result cache cannot answer instantly
    names = ["retina.jpg", "hubble_deep_field.jpg", "chelsea.png", "coffee.png"]
    copies = []
    for name in names:
        copy = tmp_path / f"c-{name}"
        copy.write_bytes((IMAGES / name).read_bytes())
        copies.append(copy)
    app.process.add_images(copies)
    pump_until(app, lambda: len(app.process.batch) == 4, 10, "four images")
    app.process_view.select_operation("bilateral")
    # ~0.3 s of filtering on the first (largest) image: long enough to see it running
    app.process_view.param_controls()["diameter"].set(15)
    app.process.process_all()
    first = app.process.batch.jobs[0].id
    pump_until(app, lambda: app.process.batch.get(first).status.value in ("uploading",
                                                                         "processing"),
               20, "the first image to start")
    app.process_view.cancel_button.invoke()
    # Cancel stops the request in flight too (it used to run on for seconds) and the
    # waiting ones are never sent
    statuses = [job.status.value for job in app.process.batch.jobs]
    assert statuses == ["cancelled"] * 4, statuses
    assert not app.process.batch.running
    wait_until(lambda: app.process.in_flight == 0, 0.5, what="the request in flight to stop")
    app.update()
    assert "0 of 4 done · 4 cancelled" in app.process_view.overall_label.cget("text")
    assert app.process_view.overall_bar.get() == pytest.approx(0.0)
    assert all(app.process_view.rows[j.id].retry_button.winfo_ismapped()
               for j in app.process.batch.jobs)


def test_terminate_in_fleet_view_leads_to_a_replacement(fleet_app: Any) -> None:
    app = fleet_app
    app.show_view("Fleet")
    view = app.fleet_view
    pump_until(app, lambda: len(view.instance_ids()) >= 2 and all(
        view.health_of(i) == "healthy" for i in view.instance_ids()), 30,
               "two healthy instances in the table")
    assert view.totals.cget("text") == "2 healthy / 2 desired · min 2 · max 2"
    view.desired_entry.delete(0, "end")
    view.desired_entry.insert(0, "5")
    view.apply_button.invoke()
    assert "fixed size of 2" in view.message.cget("text")

    original = set(view.instance_ids())
    victim = sorted(original)[0]
    view.select_instance(victim)

    app.scripted.confirm_answer = False
    view.terminate_button.invoke()
    assert app.scripted.confirmations and victim in app.scripted.confirmations[-1]
    pump_until(app, lambda: "cancelled" in view.message.cget("text"), 5, "cancel note")
    assert victim in view.instance_ids()

    app.scripted.confirm_answer = True
    view.terminate_button.invoke()
    pump_until(app, lambda: set(view.instance_ids()) - original, 40,
               "a replacement instance in the table")
    pump_until(app, lambda: any(view.health_of(i) == "healthy"
                                for i in set(view.instance_ids()) - original), 40,
               "the replacement to turn healthy")
    assert "terminat" in view.events.get("1.0", "end").lower()


def test_closing_the_app_leaves_nothing_running(fleet_app: Any, baseline: dict[str, Any]
                                                 ) -> None:
    app = fleet_app
    assert set(child_pids()) - baseline["children"], "the fleet's workers are children"
    assert app.failures == []  # no callback of the whole session raised
    app.close()
    assert threads_started_since(baseline["threads"]) == []
    assert set(child_pids()) - baseline["children"] == set()


def test_unreachable_endpoint_and_broken_settings_show_errors(
        display: str, baseline: dict[str, Any], tmp_path: Path) -> None:
    from gui.app import ImageFleetApp
    from gui.settings import Settings

    env = app_environ(tmp_path)
    settings_file = Path(env["XDG_CONFIG_HOME"]) / "imagefleet" / "settings.json"
    settings_file.parent.mkdir(parents=True)
    settings_file.write_text("{not json")
    app = ImageFleetApp("http://127.0.0.1:9", environ=env, dialogs=ScriptedDialogs())
    try:
        pump_until(app, lambda: "Cannot reach http://127.0.0.1:9" in app.banner_text, 30,
                   "the unreachable-endpoint error")
        assert app.status_label.cget("text") == "not connected"
        assert any("is not valid JSON" in m for m in app.errors_shown), app.errors_shown
        assert app.settings == Settings()  # defaults, not a crash
        app.apply_settings({**app.settings_view.raw_values(), "concurrency": "0"})
        assert "concurrency must be from 1 to 32" in app.settings_view.message.cget("text")
        assert app.failures == []
    finally:
        app.close()
    assert threads_started_since(baseline["threads"]) == []


def test_a_wrong_token_shows_401_until_settings_give_the_right_one(
        display: str, server_process: Any, tmp_path: Path) -> None:
    """A single server (no fleet API) that needs a token."""
    from gui.app import ImageFleetApp

    server = server_process("--token", "s3cret-token")
    env = app_environ(tmp_path)
    app = ImageFleetApp(server.url, environ=env, dialogs=ScriptedDialogs())
    try:
        pump_until(app, lambda: "(401)" in app.banner_text, 30, "the 401 message")
        assert "Set the token in Settings" in app.banner_text
        app.apply_settings({**app.settings_view.raw_values(), "token": "s3cret-token",
                            "appearance": "dark"})
        pump_until(app, lambda: app.connected is not None, 30, "the reconnect with the token")
        assert app.process_view.operations
        saved = json.loads((Path(env["XDG_CONFIG_HOME"]) / "imagefleet" /
                            "settings.json").read_text())
        assert saved["token"] == "s3cret-token" and saved["appearance"] == "dark"
        pump_until(app, lambda: "Fleet state unavailable" in app.fleet_view.totals.cget("text"),
                   10, "the fleet view to say a lone server has no fleet API")
        assert app.failures == []
    finally:
        app.close()


def test_python_m_gui_runs_an_embedded_fleet_and_sigterm_stops_it_all(
        display: str, tmp_path: Path) -> None:
    """The real entry point as a process: its fleet's workers are its children; SIGTERM
    closes the app like the window's close button and leaves no worker behind."""
    env = app_environ(tmp_path)
    env["DISPLAY"] = display
    proc = subprocess.Popen([sys.executable, "-m", "gui"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        workers = wait_until(lambda: len(child_pids(proc.pid)) >= 2 and child_pids(proc.pid),
                             timeout=FLEET_START, what="the embedded fleet's two workers")
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
        assert proc.returncode == 0, output
        assert [pid for pid in workers if pid_alive(pid)] == [], output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_without_a_display_the_app_explains_how_to_run_headless() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.run([sys.executable, "-m", "gui"], cwd=REPO_ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "DISPLAY is not set" in proc.stderr
    assert "python -m scripts.process" in proc.stderr
    assert "xvfb-run python -m gui" in proc.stderr

    # a display that is named but not there: Tk's own error, same advice
    env["DISPLAY"] = ":4999"
    proc = subprocess.run([sys.executable, "-m", "gui"], cwd=REPO_ROOT, env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "couldn't connect to display" in proc.stderr
    assert "xvfb-run python -m gui" in proc.stderr
