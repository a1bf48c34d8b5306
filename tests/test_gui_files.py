"""Never the wrong file, in the real app under Xvfb on a real embedded local fleet:
Save all with inputs sharing a stem and the conflict setting, the preview's request is
the one that runs, stale results and the Save all question, files that are not images,
the whole error text on selection, and a preview that cannot be made.

One app for the module; the tests run in order and each clears the list first.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_gui import ScriptedDialogs, app_environ, pump_until
from PIL import Image

from gui.viewmodel.batch import status_text

pytestmark = pytest.mark.gui

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
FLEET_START = 60.0
PROCESS_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def app(x_display: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module's app (overrides conftest's Flask ``app``) on the session's display."""
    from gui.app import ImageFleetApp

    env = app_environ(tmp_path_factory.mktemp("gui-files"))
    dialogs = ScriptedDialogs()
    instance = ImageFleetApp(environ=env, dialogs=dialogs)
    instance.scripted = dialogs
    try:
        pump_until(instance, lambda: instance.connected is not None, FLEET_START,
                   "the embedded fleet to start and the operations to load")
        yield instance
        assert instance.failures == []  # no callback of the whole module raised
    finally:
        instance.close()


def clear_list(app: Any) -> None:
    pump_until(app, lambda: not app.process.batch.running and not app.process.preview_busy,
               PROCESS_TIMEOUT, "an idle list and no preview on its way")
    for job in list(app.process.batch.jobs):
        app.process.remove_image(job.id)
    app.process.clear_pipeline()


def add(app: Any, paths: list[Path]) -> list[Any]:
    before = len(app.process.batch)
    app.process.add_images(paths)
    pump_until(app, lambda: len(app.process.batch) == before + len(paths)
               and app.process.images_loaded(), 20, f"{len(paths)} images in the list")
    return app.process.batch.jobs[before:]


def process_all(app: Any) -> None:
    app.process.process_all()
    pump_until(app, lambda: not app.process.batch.running, PROCESS_TIMEOUT, "the run to end")


def settle(app: Any) -> None:
    """Run the debounced settings change now (stale marks, preview) instead of waiting."""
    app.unschedule("preview")
    app.process._settings_settled()


def copy(source: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(IMAGES / source, target)
    return target


def test_duplicate_stems_give_two_files_and_saving_again_follows_the_setting(
        app: Any, tmp_path: Path) -> None:
    clear_list(app)
    add(app, [copy("rocket.jpg", tmp_path / "a" / "photo.jpg"),
              copy("astronaut.png", tmp_path / "b" / "photo.png")])
    app.process_view.select_operation("invert")
    app.process_view.format_var.set("jpeg")  # both results are JPEGs: one name for both
    process_all(app)
    assert [j.status.value for j in app.process.batch.jobs] == ["done", "done"]
    out = tmp_path / "out"
    out.mkdir()
    app.scripted.directory = str(out)

    def save(expected_summary: str) -> None:
        app.hide_banner()
        app.process.save_all()
        pump_until(app, lambda: expected_summary in app.banner_text, 20, expected_summary)

    assert app.settings.on_conflict == "unique"  # the default
    save(f"Saved 2 files to {out} (1 renamed, 0 skipped, 0 overwritten).")
    assert sorted(p.name for p in out.iterdir()) == ["photo-2.invert.jpg", "photo.invert.jpg"]
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert first["photo.invert.jpg"] != first["photo-2.invert.jpg"]

    save(f"Saved 2 files to {out} (2 renamed, 0 skipped, 0 overwritten).")
    assert sorted(p.name for p in out.iterdir()) == [
        "photo-2.invert.jpg", "photo-3.invert.jpg", "photo-4.invert.jpg", "photo.invert.jpg"]
    assert {n: (out / n).read_bytes() for n in first} == first  # nothing replaced

    # the option next to Save all, kept in the settings file
    app.process_view.on_conflict_var.set("skip")
    app.process.on_conflict_changed(app.process_view.on_conflict())
    settings_file = app.config_path
    pump_until(app, lambda: settings_file.exists() and json.loads(
        settings_file.read_text()).get("on_conflict") == "skip", 10, "the saved setting")
    save(f"Saved 0 files to {out} (0 renamed, 2 skipped, 0 overwritten).")
    assert len(list(out.iterdir())) == 4

    app.process.on_conflict_changed("overwrite")
    save(f"Saved 2 files to {out} (0 renamed, 0 skipped, 2 overwritten).")
    assert len(list(out.iterdir())) == 4
    app.process.on_conflict_changed("unique")


def test_the_preview_request_is_the_one_that_runs(app: Any, tmp_path: Path) -> None:
    clear_list(app)
    (job,) = add(app, [copy("astronaut.png", tmp_path / "astro.png")])
    app.process.select_image(job.id)
    view = app.process_view
    view.format_var.set("original")
    view.select_operation("resize")
    view.param_controls()["width"].set(64)
    app.process.add_step()
    assert view.current_operation() is None  # the added step is not also "being edited"
    view.select_operation("canny")
    app.process.params_changed()
    request = app.process.current_request()
    assert [s.op for s in request.steps] == ["resize", "canny"]
    runs = view.runs_label.cget("text")
    assert runs.startswith("Runs: Resize (width=64") and "→ Canny edges (low=100" in runs
    assert view.preview_runs_label.cget("text") == runs  # above the preview: the same text

    shown = app.process.previews_shown
    settle(app)
    pump_until(app, lambda: app.process.previews_shown > shown, 30, "the quick preview")
    assert app.process.shown_preview_request == request
    assert view.preview_caption.cget("text").startswith("Quick preview")

    process_all(app)
    done = app.process.batch.get(job.id)
    assert done.status.value == "done", done.message
    assert done.made_with == request
    # what the server made: 64 wide, and Canny's edges (only 0 and 255)
    assert (done.result.width, done.result.height) == (64, 64)
    data = pump_until(app, lambda: app.process.result_bytes(job.id), 30,
                      "the selected result, downloaded on selection")
    result = Image.open(io.BytesIO(data))
    assert result.size == (64, 64)
    assert {value for _count, value in result.convert("L").getcolors()} == {0, 255}


def test_a_changed_parameter_marks_results_stale_and_save_all_asks(app: Any,
                                                                   tmp_path: Path) -> None:
    view = app.process_view
    (job,) = app.process.batch.jobs  # the previous test's result, made with low=100
    assert not job.stale
    view.param_controls()["low"].set(50)
    app.process.params_changed()
    settle(app)
    assert app.process.batch.get(job.id).stale
    app.process.flush_list()
    assert view.rows[job.id].status.cget("text") == "done · stale (other settings)"
    assert "Stale: made with" in view.result_meta.cget("text")

    out = tmp_path / "out"
    out.mkdir()
    app.scripted.directory = str(out)
    app.scripted.three_way_answer = None  # Cancel
    asked = len(app.scripted.confirmations)
    app.process.save_all()
    assert len(app.scripted.confirmations) == asked + 1
    assert app.scripted.confirmations[-1].startswith("1 of 1 result was made with other settings")
    app.update()
    assert list(out.iterdir()) == []

    app.scripted.three_way_answer = True  # Yes: re-run them, then save
    app.hide_banner()
    app.process.save_all()
    pump_until(app, lambda: "Saved 1 file to" in app.banner_text, PROCESS_TIMEOUT,
               "the re-run and the save")
    rerun = app.process.batch.get(job.id)
    assert not rerun.stale and rerun.made_with == app.process.current_request()
    assert rerun.made_with.steps[-1].params["low"] == 50
    assert [p.name for p in out.iterdir()] == ["astro.resize+canny.png"]

    # No: saved as it is
    view.param_controls()["low"].set(60)
    app.process.params_changed()
    settle(app)
    app.scripted.three_way_answer = False
    app.hide_banner()
    app.process.save_all()
    pump_until(app, lambda: "Saved 1 file to" in app.banner_text, 20, "the stale save")
    assert app.process.batch.get(job.id).stale  # not re-run
    assert len(list(out.iterdir())) == 2


def _processed_counts(app: Any) -> int:
    """Images the fleet's workers have processed, from each one's GET /health."""
    answer: list[Any] = []
    app.submit(app.connection.admin_client.fleet(), answer.append)
    pump_until(app, lambda: answer, 20, "the fleet state")
    total = 0
    for instance in answer[0].instances:
        if instance.health != "healthy":
            continue
        address = instance.address if "://" in instance.address else f"http://{instance.address}"
        total += int(requests.get(f"{address}/health", timeout=10).json()["processed"])
    return total


def test_files_that_are_not_images_are_marked_at_add_and_never_uploaded(
        app: Any, tmp_path: Path) -> None:
    clear_list(app)
    app.process.clear_pipeline()
    app.process_view.select_operation("invert")
    notes = tmp_path / "notes.jpg"
    notes.write_text("Shopping list: milk, eggs, bread.\n")
    cut = tmp_path / "cut.png"
    cut.write_bytes((IMAGES / "astronaut.png").read_bytes()[:40])
    app.process.params_changed()  # settle what changing the operation asks for
    settle(app)
    pump_until(app, lambda: not app.process.preview_busy, 20, "no preview on its way")
    before = _processed_counts(app)
    app.errors_shown.clear()
    jobs = add(app, [notes, cut])
    app.process.select_image(jobs[0].id)  # no preview for a file that is not an image
    assert [j.status.value for j in jobs] == ["not an image"] * 2
    app.process.flush_list()
    assert [status_text(j) for j in jobs] == [
        "not an image: it starts with text, not an image header",
        "not an image: a PNG whose header is cut short or damaged"]
    for job in jobs:  # the row shows as much as fits beside its buttons
        shown = app.process_view.rows[job.id].status.cget("text")
        assert status_text(job).startswith(shown.removesuffix("…"))
    assert app.errors_shown == [
        "2 files are not images and will not be processed: notes.jpg (it starts with text, "
        "not an image header); cut.png (a PNG whose header is cut short or damaged)."]
    for job in jobs:
        assert not app.process_view.rows[job.id].retry_button.winfo_ismapped()

    app.process.process_all()
    assert "not images" in app.banner_text
    app.process.retry_image(jobs[0].id)
    # a real image as a sentinel: once it is done, anything sent before it is counted
    add(app, [copy("chelsea.png", tmp_path / "sentinel.png")])
    process_all(app)
    assert [j.status.value for j in app.process.batch.jobs] == [
        "not an image", "not an image", "done"]
    assert all(j.ticket == 0 for j in jobs)  # never part of a run
    assert _processed_counts(app) - before == 1  # the sentinel, nothing else


def test_a_failed_image_shows_the_whole_server_message_when_selected(
        app: Any, tmp_path: Path) -> None:
    clear_list(app)
    whole = (IMAGES / "astronaut.png").read_bytes()
    broken = tmp_path / "a-picture-with-a-rather-long-name-cut-in-half.png"
    broken.write_bytes(whole[:len(whole) // 2])  # the header passes; the server says 415
    (job,) = add(app, [broken])
    process_all(app)
    failed = app.process.batch.get(job.id)
    assert failed.status.value == "failed"
    assert "(415)" in failed.message and len(failed.message) > 60
    app.process.flush_list()
    row = app.process_view.rows[job.id]
    assert len(row.status.cget("text")) <= 60 and row.status.cget("text").endswith("…")
    assert row.retry_button.winfo_ismapped()
    text = row.status.cget("text")  # ends before the Retry button: nothing under it
    assert row.status.winfo_x() + row.status.cget("font").measure(text) <= (
        row.retry_button.winfo_x())

    app.process.select_image(job.id)
    app.update()
    meta = app.process_view.result_meta
    assert meta.cget("text") == failed.message  # all of it
    # wrapped inside the details panel, not cut at its edge
    assert 0 < int(meta.cget("wraplength")) <= meta.master.winfo_width()
    assert meta.winfo_reqwidth() <= meta.master.winfo_width()


def test_choosing_resize_clears_the_old_preview_and_says_why(app: Any) -> None:
    clear_list(app)
    (job,) = add(app, [IMAGES / "coffee.png"])
    app.process.select_image(job.id)
    view = app.process_view
    view.select_operation("grayscale")
    shown = app.process.previews_shown
    settle(app)
    pump_until(app, lambda: app.process.previews_shown > shown, 30, "a grayscale preview")
    assert view.shown_after is not None

    view.select_operation("resize")  # width and height 0: the server refuses it
    app.process.params_changed()
    settle(app)
    pump_until(app, lambda: "Preview failed" in view.preview_caption.cget("text"), 30,
               "the preview's failure")
    assert "width" in view.preview_caption.cget("text")
    assert view.shown_after is None  # the grayscale result no longer stands there
    assert view.after_label.cget("text").startswith("No preview: ")


def test_output_options_follow_the_format_and_reach_the_result(app: Any, tmp_path: Path) -> None:
    from PIL import ExifTags

    view = app.process_view

    def state(widget: Any) -> str:
        return str(widget.cget("state"))

    view.format_var.set("webp")
    view._format_changed()
    assert (state(view.progressive_box), state(view.lossless_box),
            state(view.subsampling_menu)) == ("disabled", "normal", "disabled")
    view.lossless_var.set(True)
    view._format_changed()
    assert state(view.quality_slider) == "disabled"  # lossless WebP has no quality
    view.lossless_var.set(False)

    clear_list(app)
    exif = Image.Exif()
    exif[ExifTags.Base.Copyright] = "(c) GUI test"
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "S",
                                  ExifTags.GPS.GPSLatitude: (33.0, 51.0, 0.0)}
    with Image.open(IMAGES / "rocket.jpg") as photo:  # tagged Adobe RGB (1998)
        profile = photo.info["icc_profile"]
        photo.save(tmp_path / "tagged.jpg", quality=90, exif=exif, icc_profile=profile)
    (job,) = add(app, [tmp_path / "tagged.jpg"])
    view.select_operation("invert")
    view.format_var.set("jpeg")
    view._format_changed()
    assert (state(view.progressive_box), state(view.subsampling_menu)) == ("normal", "normal")
    view.progressive_var.set(True)
    view.subsampling_var.set("4:4:4")
    view.icc_var.set("Keep the profile")
    view.metadata_var.set("Keep all but location")
    app.process.params_changed()
    assert view.runs_label.cget("text").endswith(
        "· jpeg, quality 90, progressive, chroma 4:4:4, ICC profile kept, "
        "metadata kept but location")
    try:
        process_all(app)
        (done,) = app.process.batch.jobs
        assert done.id == job.id and done.status.value == "done", done.message
        data = requests.get(done.result.url, timeout=10).content
        with Image.open(io.BytesIO(data)) as result:
            assert result.info.get("progressive") == 1
            assert result.info["icc_profile"] == profile
            kept = result.getexif()
            assert kept[ExifTags.Base.Copyright] == "(c) GUI test"
            assert not kept.get_ifd(ExifTags.IFD.GPSInfo)
    finally:  # the module's app goes on with the defaults
        view.progressive_var.set(False)
        view.subsampling_var.set("4:2:0")
        view.icc_var.set("Convert to sRGB")
        view.metadata_var.set("Strip all")
        view.format_var.set("original")
        view._format_changed()
