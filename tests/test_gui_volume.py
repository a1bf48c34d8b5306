"""The desktop app at volume, under Xvfb on a real embedded local fleet: 10,000 images
in the list, scrolling, the wheel, the keyboard, sorting and filtering, and Cancel in
the middle of a real run.

One app for the module; the tests run in order (the cancel test first, while the list
is small, then the 10,000-image ones).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_gui import ScriptedDialogs, app_environ, pump_until
from PIL import Image
from waiting import wait_until

pytestmark = pytest.mark.gui

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
FLEET_START = 60.0
MANY = 10_000
MAX_ROW_WIDGETS = 20  # a 1280x800 window fits about 7 rows; never one per image


@pytest.fixture(scope="module")
def app(x_display: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from gui.app import ImageFleetApp

    env = app_environ(tmp_path_factory.mktemp("volume"))
    application = ImageFleetApp(environ=env, dialogs=ScriptedDialogs())
    try:
        pump_until(application, lambda: application.connected is not None, FLEET_START,
                   "the embedded fleet to start")
        yield application
        assert application.failures == []
    finally:
        application.close()


def _jpeg(image: Image.Image, nonce: int) -> bytes:
    out = io.BytesIO()
    # a distinct comment per file: the same pixels, bytes the server cache has not seen
    image.save(out, "JPEG", quality=85, comment=f"volume-test-{nonce}".encode())
    return out.getvalue()


def test_cancel_mid_run_acts_at_once_and_keeps_finished_results(app: Any,
                                                                tmp_path: Path) -> None:
    source = Image.open(IMAGES / "rocket.jpg").convert("RGB")
    for n in range(60):
        (tmp_path / f"r{n:02d}.jpg").write_bytes(_jpeg(source, n))
    app.process.add_images([tmp_path])
    pump_until(app, lambda: len(app.process.batch) == 60, 10, "60 images listed")
    app.process_view.select_operation("bilateral")
    # ~0.1-0.2 s of filtering per image on two workers: a run of several seconds
    app.process_view.param_controls()["diameter"].set(15)
    app.process.process_all()
    pump_until(app, lambda: app.process.batch.overall().done >= 6, 60,
               "some images to finish")
    done_before = {job.id: job.result for job in app.process.batch.done_jobs()}

    started = time.monotonic()
    app.process_view.cancel_button.invoke()
    assert not app.process.batch.running
    wait_until(lambda: app.process.in_flight == 0, 0.5, what="the requests in flight to stop")
    app.update()
    assert time.monotonic() - started <= 0.5

    overall = app.process.batch.overall()
    assert overall.done + overall.cancelled == 60
    for job_id, result in done_before.items():
        job = app.process.batch.get(job_id)
        assert job.status.value == "done" and job.result == result  # results stay
    summary = app.process_view.overall_label.cget("text")
    assert summary == f"{overall.done} of 60 done · {overall.cancelled} cancelled"
    assert app.process_view.overall_bar.get() == pytest.approx(overall.done / 60, abs=0.01)

    # nothing more arrives: the cancelled requests' late answers are ignored
    pump_until(app, lambda: True, 1, "one pass")
    assert app.process.batch.overall().done == overall.done

    # a retry of one cancelled image runs it alone; the earlier results stay
    cancelled = next(job for job in app.process.batch.jobs if job.status.value == "cancelled")
    app.process.retry_image(cancelled.id)
    pump_until(app, lambda: app.process.batch.get(cancelled.id).status.value == "done", 30,
               "the retried image")
    assert all(app.process.batch.get(i).result == r for i, r in done_before.items())

    for job in list(app.process.batch.jobs):
        app.process.remove_image(job.id)
    assert len(app.process.batch) == 0


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10,000 tiny JPEGs (the list must not decode them all to show them)."""
    folder = tmp_path_factory.mktemp("many")
    tiny = io.BytesIO()
    Image.open(IMAGES / "rocket.jpg").convert("RGB").resize((32, 24)).save(tiny, "JPEG")
    data = tiny.getvalue()
    for n in range(MANY):
        (folder / f"img_{n:05d}.jpg").write_bytes(data)
    return folder


def _row_widgets(app: Any) -> int:
    return len(app.process_view.image_list.pool)


def test_ten_thousand_images_are_listed_at_once_with_a_bounded_number_of_rows(
        app: Any, many_files: Path) -> None:
    view = app.process_view
    pump_until(app, lambda: not app.process.thumbs.pending, 10, "earlier thumbnails")
    decoded_before = app.process.thumbs.decoded
    started = time.monotonic()
    app.process.add_images([many_files])
    pump_until(app, lambda: len(app.process.batch) == MANY and view.rows, 10,
               "10,000 images listed")
    usable = time.monotonic() - started
    assert usable < 3.0, f"the list took {usable:.2f} s to show"  # ~0.2 s here; slack for CI
    assert view.count_label.cget("text") == "10000 images"
    assert 1 <= _row_widgets(app) <= MAX_ROW_WIDGETS
    pump_until(app, app.process.images_loaded, 10, "the visible thumbnails")
    # only the rows on screen were decoded, not 10,000 files
    assert app.process.thumbs.decoded - decoded_before <= 2 * len(view.rows)
    first = app.process.batch.ids()[0]
    assert view.rows[first].name.cget("text") == "img_00000.jpg"


def test_scrolling_to_the_end_shows_the_last_image_and_it_can_be_selected(app: Any) -> None:
    view = app.process_view
    image_list = view.image_list
    image_list.scroll_to_end()
    app.update()
    last = app.process.batch.ids()[-1]
    assert last in view.rows
    row = view.rows[last]
    assert row.name.cget("text") == "img_09999.jpg" and row.winfo_ismapped()
    first, end = image_list.scrollbar.get()
    assert end == pytest.approx(1.0) and first > 0.99  # proportional to 10,000 rows
    row._canvas.event_generate("<Button-1>", x=20, y=20)  # a click on the row
    app.update()
    assert app.process.selected == last
    assert app.process_view.result_title.cget("text") == "img_09999.jpg"
    # the keyboard moves the selection, and the list follows it
    image_list.viewport.focus_force()
    image_list.viewport.event_generate("<Up>")
    app.update()
    assert app.process.selected == app.process.batch.ids()[-2]
    image_list.viewport.event_generate("<Home>")
    app.update()
    assert app.process.selected == app.process.batch.ids()[0]
    assert image_list.top == 0
    assert _row_widgets(app) <= MAX_ROW_WIDGETS
    pump_until(app, app.process.images_loaded, 10, "thumbnails after the jumps")
    assert len(app.process.thumbs.cache) <= app.process.thumbs.cache.capacity


def test_the_linux_mouse_wheel_scrolls_the_list(app: Any) -> None:
    image_list = app.process_view.image_list
    image_list.scroll_to(0)
    app.update()
    row = image_list.pool[0]
    # X11 wheel notches are buttons 4 and 5, delivered to the widget under the pointer
    row.name._label.event_generate("<Button-5>", x=5, y=5)
    row._canvas.event_generate("<Button-5>", x=5, y=5)
    app.update()
    assert image_list.top == 6
    assert image_list.visible_ids()[0] == image_list.order[6]
    assert row.name.cget("text") == f"img_{6:05d}.jpg"  # the pooled row shows another image
    image_list.viewport.event_generate("<Button-4>", x=5, y=5)
    app.update()
    assert image_list.top == 3
    image_list.pool[-1].status._label.event_generate("<MouseWheel>", delta=-120)
    app.update()
    assert image_list.top == 6  # the Windows/macOS event works on Linux's newer Tk too


def test_sorting_and_filtering_ten_thousand_rows(app: Any) -> None:
    image_list = app.process_view.image_list
    ids = app.process.batch.ids()
    started = time.monotonic()
    image_list.set_sort("name")
    app.update()
    assert image_list.order[:2] == ids[:2]
    image_list.set_sort("state", "failed")
    app.update()
    assert image_list.order == []
    assert image_list.empty_hint.cget("text") == "No failed images."
    image_list.set_sort("added", "pending")
    app.update()
    assert len(image_list.order) == MANY  # none has run: all pending
    image_list.set_sort("name", "done")
    app.update()
    assert image_list.order == []
    image_list.set_sort("added", "all")
    app.update()
    assert image_list.order == ids
    assert time.monotonic() - started < 2.0  # five re-orders of 10,000 rows
    assert _row_widgets(app) <= MAX_ROW_WIDGETS
