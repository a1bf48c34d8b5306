"""The real desktop app under Xvfb, on a real embedded local fleet (gateway + worker
processes). Tk is driven by pumping ``app.update()`` until a condition holds.

Modal dialogs are answered through the app's ``Dialogs`` seam (the same methods the
buttons call), so the code under test is the app's own, end to end.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_fleet import pid_alive, pids_mentioning
from helpers_gui import (
    ScriptedDialogs,
    app_environ,
    child_pids,
    descendant_pids,
    pump_until,
    start_http_probe,
    threads_now,
    threads_started_since,
    xdnd_drop,
)
from PIL import Image
from waiting import wait_until

pytestmark = pytest.mark.gui

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
FLEET_START = 60.0
PROCESS_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def display(x_display: str) -> str:
    """The session's Xvfb (conftest.py: one display for all GUI modules)."""
    return x_display


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
    assert "this computer only" in meta  # the embedded fleet's links are loopback links
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

    app.process.open_link()  # the browser is started off the UI thread
    pump_until(app, lambda: app.scripted.opened_urls == [jobs[1].result.url], 5,
               "the link handed to the browser")

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
    # a PNG cut in half: its header passes the check made when it is added (a file that
    # is not an image at all is never uploaded: tests/test_gui_files.py), so the server
    # is asked and its answer is what the row shows
    broken = tmp_path / "broken.png"
    whole = (IMAGES / "astronaut.png").read_bytes()
    broken.write_bytes(whole[:len(whole) // 2])
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
    # the row shows the start of the message, as much as fits beside Retry; selecting
    # the image shows all of it, code included
    assert app.process.batch.get(job.id).message.startswith(
        row.status.cget("text").removesuffix("…"))
    assert row.retry_button.winfo_ismapped()
    app.process.select_image(job.id)
    app.update()
    assert "415" in app.process_view.result_meta.cget("text")
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
    # Only the rows that fit exist (messages above the list take some of its height):
    # each one shown offers Retry.
    shown = app.process_view.rows
    assert shown and all(row.retry_button.winfo_ismapped() for row in shown.values())


def test_dropping_files_on_the_window_adds_them(fleet_app: Any, tmp_path: Path) -> None:
    app = fleet_app
    assert app.drop_enabled
    assert "drop files and folders here" in app.process_view.empty_hint.cget("text")
    spaced = tmp_path / "a photo with spaces.png"
    spaced.write_bytes((IMAGES / "astronaut.png").read_bytes())
    folder = tmp_path / "dropped folder"
    folder.mkdir()
    (folder / "rocket.jpg").write_bytes((IMAGES / "rocket.jpg").read_bytes())
    before = len(app.process.batch)
    xdnd_drop(app, app.process_view.image_list, [spaced, folder])
    pump_until(app, lambda: len(app.process.batch) == before + 2, 10, "the dropped images")
    assert [job.path for job in app.process.batch.jobs[-2:]] == [spaced, folder / "rocket.jpg"]


def test_the_window_provides_what_each_controller_needs(fleet_app: Any) -> None:
    """Each controller is typed against a protocol of gui.host; the real window must
    provide every member of each (runtime_checkable: names, checked with hasattr)."""
    from gui.host import FleetHost, HistoryHost, Host, JournalHost, ProcessHost, RecipeHost

    for protocol in (Host, RecipeHost, ProcessHost, FleetHost, JournalHost, HistoryHost):
        assert isinstance(fleet_app, protocol), protocol.__name__


def test_open_in_browser_without_a_browser_offers_copy_link(fleet_app: Any) -> None:
    app = fleet_app
    job = app.process.batch.jobs[-1]  # the image dropped by the test before
    app.process_view.select_operation("invert")
    app.process.retry_image(job.id)  # runs this one image
    pump_until(app, lambda: app.process.batch.get(job.id).result is not None,
               PROCESS_TIMEOUT, "the image to be processed")
    job = app.process.batch.get(job.id)
    app.process.select_image(job.id)
    app.scripted.browser_works = False
    try:
        app.process.open_link()
        pump_until(app, lambda: "No web browser could be opened" in app.banner_text, 5,
                   "the no-browser message")
    finally:
        app.scripted.browser_works = True
    row = app.message_area.rows[0]
    assert row.action_button.winfo_manager() and row.action_button.cget("text") == "Copy link"
    app.clipboard_clear()
    row.action_button.invoke()
    assert app.clipboard_get() == job.result.url
    assert "No web browser" not in app.banner_text  # the message went with its action
    assert "Link copied" in app.banner_text


def test_the_fleet_runs_in_its_own_process_so_a_blocked_ui_costs_no_worker(
        fleet_app: Any, tmp_path: Path) -> None:
    """Tk's thread busy for 3 s, holding the GIL: the fleet, in its own process, keeps
    answering and checking its workers. (With the fleet on a thread of the app, as it
    was, the same probe waited 3.0 s for an answer.)"""
    app = fleet_app
    fleet = app.connection.fleet
    assert fleet.pid != os.getpid() and fleet.pid in child_pids()
    workers = child_pids(fleet.pid)
    assert len(workers) >= 2 and not set(workers) & set(child_pids())
    ready = json.loads(fleet.ready_file.read_text())
    assert ready["pid"] == fleet.pid and ready["endpoint"] == app.connected.endpoint
    assert stat.S_IMODE(fleet.ready_file.stat().st_mode) == 0o600

    def fleet_state() -> dict[str, Any]:
        return requests.get(app.connected.endpoint + "/fleet", timeout=5).json()

    before = fleet_state()
    healthy = {i["id"] for i in before["instances"] if i["health"] == "healthy"}
    assert len(healthy) == 2

    blocked: list[float] = []

    def block_the_main_loop() -> None:
        # Busy Python code on Tk's thread that keeps the GIL (a long switch interval), as
        # a heavy UI operation does: no other thread of this process runs meanwhile.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(10.0)
        start = time.monotonic()
        try:
            while time.monotonic() - start < 3.0:
                pass
        finally:
            sys.setswitchinterval(interval)
        blocked.append(time.monotonic() - start)

    probe_ready = tmp_path / "probe-ready"
    probe = start_http_probe(app.connected.endpoint + "/fleet", 5.0, probe_ready)
    try:
        pump_until(app, probe_ready.exists, 20, "the probe's first answer")
        app.after(0, block_the_main_loop)
        pump_until(app, lambda: blocked, 30, "the 3-s block of the main loop")
        result = json.loads(probe.communicate(timeout=60)[0])
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    assert blocked[0] >= 3.0
    assert result["longest_gap_s"] < 1.0, result  # the fleet answered all along
    # ... and it judged its workers all along: no replacement, the same two healthy
    state = fleet_state()
    assert {i["id"] for i in state["instances"] if i["health"] == "healthy"} == healthy
    seen = [json.dumps(e, sort_keys=True) for e in before["events"]]
    new = [e for e in state["events"] if json.dumps(e, sort_keys=True) not in seen]
    assert not [e for e in new if e["kind"] in ("launched", "terminated", "deregistered")
                or "unhealthy" in e["kind"]], new


def test_a_fleet_that_dies_is_reported_and_restarted(fleet_app: Any) -> None:
    app = fleet_app
    old_pid = app.connection.fleet.pid
    os.kill(old_pid, signal.SIGKILL)
    pump_until(app, lambda: "local fleet stopped" in app.status_label.cget("text"), 10,
               "the app to notice the fleet's death")
    assert "The local fleet stopped (killed by SIGKILL); starting it again" in app.banner_text
    pump_until(app, lambda: app.connected is not None, FLEET_START, "the restarted fleet")
    assert app.connection.fleet.pid != old_pid
    assert "local fleet stopped" not in app.banner_text  # resolved by the restart
    assert app.status_label.cget("text").startswith("local fleet · ")


def test_terminate_in_fleet_view_leads_to_a_replacement(fleet_app: Any) -> None:
    app = fleet_app
    app.show_view("Fleet")
    view = app.fleet_view
    pump_until(app, lambda: len(view.instance_ids()) >= 2 and all(
        view.health_of(i) == "healthy" for i in view.instance_ids()), 30,
               "two healthy instances in the table")
    assert view.totals.cget("text") == "2 healthy / 2 desired · min 2 · max 2"
    # the charts get the manager's window through the controller, off the UI thread
    pump_until(app, lambda: app.fleet.last_metrics is not None
               and view.charts.drawn_items > 20, 20, "the metrics window drawn")
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
    fleet_pid = app.connection.fleet.pid
    assert set(child_pids()) - baseline["children"] == {fleet_pid}, "one child: the fleet"
    workers = child_pids(fleet_pid)
    assert len(workers) >= 2, "the workers are the fleet process's children"
    tree = set(descendant_pids()) - baseline["children"]
    assert app.failures == []  # no callback of the whole session raised
    app.close()
    assert threads_started_since(baseline["threads"]) == []
    assert set(child_pids()) - baseline["children"] == set()
    assert [pid for pid in tree if pid_alive(pid)] == []


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


def test_opened_with_a_folder_lists_its_images_and_keeps_every_message(
        display: str, baseline: dict[str, Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m gui FOLDER MISSING``: the folder's images are listed with no fleet at
    all (the endpoint is unreachable), and the messages do not replace each other. Drag
    and drop is made unavailable, so the empty list must not offer it."""
    import gui.app
    from gui.__main__ import parse_args
    from gui.app import ImageFleetApp

    def no_tkdnd(_root: Any) -> None:
        raise RuntimeError("Unable to load tkdnd library.")

    monkeypatch.setattr(gui.app, "load_drop_support", no_tkdnd)
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.png", "rocket.jpg", "coffee.png"):
        (folder / name).write_bytes((IMAGES / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    args = parse_args(["--endpoint", "http://127.0.0.1:9", str(folder),
                       str(tmp_path / "missing.png")])
    env = app_environ(tmp_path)
    settings_file = Path(env["XDG_CONFIG_HOME"]) / "imagefleet" / "settings.json"
    settings_file.parent.mkdir(parents=True)
    settings_file.write_text("{not json")  # one more message, at once
    app = ImageFleetApp(args.endpoint, environ=env, dialogs=ScriptedDialogs(),
                        open_paths=args.paths)
    try:
        assert not app.drop_enabled
        assert "drop" not in app.process_view.empty_hint.cget("text").lower()
        pump_until(app, lambda: len(app.process.batch) == 3, 20, "the folder's three images")
        assert [j.name for j in app.process.batch.jobs] == ["astronaut.png", "coffee.png",
                                                           "rocket.jpg"]
        pump_until(app, lambda: "Skipped 1: missing.png: no such file or folder"
                   in app.banner_text, 10, "the unknown path reported")
        errors = app.message_area.texts()  # "Cannot reach ..." may have come too
        assert any("is not valid JSON" in t for t in errors), errors

        # Five at most, and infos make room before errors do; each goes with its own ✕;
        # infos go by themselves (sooner than the app's few seconds, for the test). No
        # app.update() until the checks: nothing else can post a message in between.
        app.messages = dataclasses.replace(app.messages, ttl_s=1.0)
        for n in range(6):
            app.show_info(f"note {n}")
        notes = [f"note {n}" for n in (5, 4, 3, 2, 1)][:5 - len(errors)]
        assert app.message_area.texts() == [*notes, *errors]
        app.message_area.rows[0].dismiss_button.invoke()
        assert app.message_area.texts() == [*notes[1:], *errors]
        pump_until(app, lambda: not any(t.startswith("note") for t in
                                        app.message_area.texts()), 15, "the infos to expire")
        assert set(errors) <= set(app.message_area.texts())  # errors stay
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
        assert "(401)" not in app.banner_text  # the connection error went with the success
        saved = json.loads((Path(env["XDG_CONFIG_HOME"]) / "imagefleet" /
                            "settings.json").read_text())
        assert saved["token"] == "s3cret-token" and saved["appearance"] == "dark"
        pump_until(app, lambda: "Fleet state unavailable" in app.fleet_view.totals.cget("text"),
                   10, "the fleet view to say a lone server has no fleet API")
        assert app.failures == []
    finally:
        app.close()


def start_python_m_gui(display: str, tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """``python -m gui`` as a process, once its fleet process is ready with two workers:
    returns the app's process and the pids of the fleet and its workers."""
    env = app_environ(tmp_path)
    env["DISPLAY"] = display
    proc = subprocess.Popen([sys.executable, "-m", "gui"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "gui.log").open("wb"))

    ready_file = Path(env["XDG_CACHE_HOME"]) / "imagefleet" / "local-fleet.json"

    def fleet_with_two_workers() -> list[int] | None:
        fleets = child_pids(proc.pid)
        workers = [w for f in fleets for w in child_pids(f)]
        ready = len(fleets) == 1 and len(workers) >= 2 and ready_file.exists()
        return [*fleets, *workers] if ready else None

    try:
        tree = wait_until(fleet_with_two_workers, timeout=FLEET_START,
                          what="the app's fleet process with its two workers")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, tree


def test_closing_while_the_fleet_starts_stops_it_without_waiting(
        display: str, baseline: dict[str, Any], tmp_path: Path) -> None:
    from gui.app import ImageFleetApp

    app = ImageFleetApp(environ=app_environ(tmp_path), dialogs=ScriptedDialogs())
    try:
        fleet_pid = pump_until(app, lambda: getattr(app.connection.fleet, "pid", None), 30,
                               "the fleet process to be started")
        assert app.connected is None  # still starting
        started = time.monotonic()
        tree = [fleet_pid, *descendant_pids(fleet_pid)]
    finally:
        app.close()
    assert time.monotonic() - started < 15.0
    assert [pid for pid in tree if pid_alive(pid)] == []
    assert pids_mentioning(str(tmp_path)) == []  # no worker it may have launched meanwhile
    assert set(child_pids()) - baseline["children"] == set()
    assert threads_started_since(baseline["threads"]) == []


def test_python_m_gui_runs_an_embedded_fleet_and_sigterm_stops_it_all(
        display: str, tmp_path: Path) -> None:
    """The real entry point as a process: the fleet is its child process and the workers
    are the fleet's; SIGTERM closes the app like the window's close button and leaves
    neither the fleet nor a worker behind."""
    proc, tree = start_python_m_gui(display, tmp_path)
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log = (tmp_path / "gui.log").read_text(errors="replace")
        assert proc.returncode == 0, log
        assert [pid for pid in tree if pid_alive(pid)] == [], log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_killed_app_does_not_leave_its_fleet_running(display: str, tmp_path: Path) -> None:
    """SIGKILL gives the app no chance to stop anything: the fleet notices its stdin pipe
    close and stops its workers and itself."""
    proc, tree = start_python_m_gui(display, tmp_path)
    try:
        proc.kill()
        proc.wait(timeout=10)
        wait_until(lambda: not any(pid_alive(pid) for pid in tree), timeout=30,
                   what="the fleet and its workers to exit after the app was killed")
    finally:
        for pid in tree:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


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
