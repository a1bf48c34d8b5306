"""The History view and the start-up offer to resume, under Xvfb, with a journal of
thousands of batches: pages, counts, expired links marked, copy links, download again,
resume in the app, clear. Pure texts first."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from helpers_gui import ScriptedDialogs, app_environ, pump_until
from test_resume_cli import process_requests

from gui.history_controller import PAGE_SIZE, expiry_text, row_text, valid_links
from gui.journal import (
    BatchState,
    BatchSummary,
    Identity,
    InputRecord,
    ItemState,
    Journal,
    OutputRecord,
)
from gui.journal_controller import request_spec, spec_request
from gui.viewmodel.requests import ProcessRequest, RequestStep

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OLD_BATCHES = 3000


def summary(**changes: Any) -> BatchSummary:
    base = dict(id="20261202-120000-abcd", created_at=NOW, updated_at=NOW, source="cli",
                endpoint="e", spec={"kind": "process", "operation": "grayscale",
                                    "format": "png"},
                outputs=("",), out_dir=None, state=BatchState.FINISHED, total=3, done=3,
                failed=0, links=3, first_expiry=NOW + timedelta(hours=2),
                last_expiry=NOW + timedelta(hours=3))
    base.update(changes)
    return BatchSummary(**base)


def test_rows_say_counts_state_and_link_expiry() -> None:
    assert "grayscale · png · 3 of 3 done · links expire in 2h 00m · command line" in \
        row_text(summary(), NOW)
    interrupted = summary(state=BatchState.RUNNING, done=1, failed=1, source="app")
    assert "1 of 3 done, 1 failed · interrupted · links expire" in row_text(interrupted, NOW)
    assert expiry_text(summary(first_expiry=NOW - timedelta(1), last_expiry=NOW - timedelta(1)),
                       NOW) == "links expired"
    assert expiry_text(summary(first_expiry=NOW - timedelta(1)), NOW) == \
        "some links expired; the rest expire in 3h 00m"
    assert expiry_text(summary(links=0), NOW) == "no links"


def test_rows_say_when_links_open_on_this_computer_only() -> None:
    local = summary(sample_link="http://127.0.0.1:8765/results/k?expires=1&sig=s")
    assert "links expire in 2h 00m (this computer only) · command line" in row_text(local, NOW)
    shared = summary(sample_link="https://bucket.s3.amazonaws.com/results/k?X-Amz-Signature=s")
    assert "this computer only" not in row_text(shared, NOW)
    assert "this computer only" not in row_text(summary(), NOW)  # no link recorded


def test_requests_round_trip_through_the_journal_spec() -> None:
    pipeline = ProcessRequest(None, None,
                              (RequestStep("resize", {"width": 64}), RequestStep("invert")),
                              "webp", 80, 3600)
    single = ProcessRequest("gaussian_blur", {"ksize": 5}, None, None, 90, None)
    for request in (pipeline, single):
        assert spec_request(json.loads(json.dumps(request_spec(request)))) == request
    # a command-line batch's steps carry their parameters inline
    cli = spec_request({"kind": "process", "steps": [{"op": "resize", "width": 64}],
                        "format": "png"})
    assert cli.steps == (RequestStep("resize", {"width": 64}),)
    with pytest.raises(ValueError, match="names no operation"):
        spec_request({"kind": "process"})


def test_valid_links_leave_the_expired_out() -> None:
    def record(index: int, url: str, expires: datetime | None, state=ItemState.DONE):
        return InputRecord(index, Path(f"{index}.png"), Identity(1, 1), None,
                           (OutputRecord("", state, url=url, expires_at=expires),))
    links, expired = valid_links([record(0, "a", NOW + timedelta(1)), record(1, "b", NOW),
                                  record(2, "c", None), record(3, "d", None, ItemState.FAILED)],
                                 NOW)
    assert (links, expired) == (["a", "c"], 1)


# --------------------------------------------------------------------------- the app


def process(endpoint: str, source: Path, operation: str = "grayscale") -> dict[str, Any]:
    answer = requests.post(f"{endpoint}/process", timeout=60,
                           files={"image": source.read_bytes()},
                           data={"operation": operation, "format": "png"})
    answer.raise_for_status()
    return answer.json()


@pytest.fixture(scope="module")
def history_app(x_display: str, module_server_process: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An app whose journal holds OLD_BATCHES finished batches, then three to look at:
    one with all links expired, one with one of three expired, and (newest) an app batch
    that was interrupted with one image of two done."""
    from gui.app import ImageFleetApp

    server = module_server_process()
    base = tmp_path_factory.mktemp("history")
    env = app_environ(base)
    journal = Journal(base / "data" / "ImageFleet" / "journal.sqlite3")
    photos = [IMAGES / "astronaut.png", IMAGES / "camera.png", IMAGES / "coffee.png"]
    spec = {"kind": "process", "operation": "grayscale", "params": {}, "format": "png"}
    start = NOW.timestamp() - OLD_BATCHES * 60 - 3600
    for n in range(OLD_BATCHES):
        batch = journal.begin(spec, photos[:1], endpoint=server.url, source="cli",
                              batch_id=f"old-{n:05}")
        journal.record_done(batch, 0, key="k", url="http://old/1", expires_at=NOW)
        journal.finish(batch)
    journal.flush()
    with sqlite3.connect(journal.path) as conn:  # their times: older than the three below
        conn.execute("UPDATE batches SET created_at = ? + CAST(substr(id, 5) AS REAL) * 60",
                     (start,))
    past = datetime.now(UTC) - timedelta(hours=1)
    expired = journal.begin(spec, photos[:1], endpoint=server.url, source="cli")
    journal.record_done(expired, 0, key="k", url="http://old/2", expires_at=past)
    journal.finish(expired)
    mixed = journal.begin(spec, photos, endpoint=server.url, source="cli")
    results = [process(server.url, photo) for photo in photos[:2]]
    for i, result in enumerate(results):
        journal.record_done(mixed, i, key=result["key"], url=result["url"],
                            expires_at=result["expires_at"], format="png")
    journal.record_done(mixed, 2, key="k", url="http://old/3", expires_at=past)
    journal.finish(mixed)
    journal.flush()
    app_request = ProcessRequest("grayscale", {}, None, "png", None, 3600)
    interrupted = journal.begin(request_spec(app_request), photos[:2], endpoint=server.url,
                                source="app")
    journal.record_done(interrupted, 0, key=results[0]["key"], url=results[0]["url"],
                        expires_at=results[0]["expires_at"], format="png",
                        hash_path=photos[0])
    journal.close()

    dialogs = ScriptedDialogs()
    app = ImageFleetApp(endpoint=server.url, environ=env, dialogs=dialogs)
    app.scripted = dialogs
    app.server = server
    app.links = [r["url"] for r in results]
    try:
        pump_until(app, lambda: app.connected is not None and app.journal.journal is not None,
                   60, "the connection and the journal")
        yield app
    finally:
        app.close()


def test_the_start_offers_to_resume_the_interrupted_batch(history_app: Any) -> None:
    app = history_app
    pump_until(app, lambda: "An unfinished batch from" in app.banner_text, 10, "the offer")
    assert "1 of 2 images done, 1 not yet." in app.banner_text
    assert any(m.action == "Resume" for m in app.messages.messages)


def test_history_pages_through_thousands_of_batches(history_app: Any) -> None:
    app = history_app
    view = app.history_view
    app.show_view("History")
    pump_until(app, lambda: len(view.texts()) == PAGE_SIZE, 20, "the first page")
    total = OLD_BATCHES + 3
    assert view.summary.cget("text") == f"Batches 1–{PAGE_SIZE} of {total}, newest first"
    rows = view.texts()
    assert "grayscale · png · 1 of 2 done · interrupted" in rows[0] and rows[0].endswith("app")
    assert "3 of 3 done · some links expired; the rest expire in" in rows[1]
    assert "1 of 1 done · links expired · command line" in rows[2]
    assert view.rows[0].buttons["resume"].winfo_manager()  # unfinished: it can be resumed
    assert not view.rows[1].buttons["resume"].winfo_manager()
    assert str(view.newer_button.cget("state")) == "disabled"

    view.older_button.invoke()
    pump_until(app, lambda: view.summary.cget("text").startswith(
        f"Batches {PAGE_SIZE + 1}–{2 * PAGE_SIZE} of"), 20, "the second page")
    assert all("links expired" in text for text in view.texts())
    view.newer_button.invoke()
    pump_until(app, lambda: view.summary.cget("text").startswith("Batches 1–"), 20,
               "the first page again")


def test_copy_links_and_download_again_leave_expired_links_out(history_app: Any,
                                                              tmp_path: Path) -> None:
    app = history_app
    view = app.history_view
    view.rows[1].buttons["copy"].invoke()
    pump_until(app, lambda: "2 links copied; 1 expired and left out." in app.banner_text, 10,
               "the links copied")
    assert app.clipboard_get().splitlines() == app.links

    app.scripted.directory = str(tmp_path)
    view.rows[1].buttons["download"].invoke()
    pump_until(app, lambda: "expired link left out" in app.banner_text, 30,
               "the results downloaded")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["astronaut.grayscale.png", "camera.grayscale.png"]
    assert (tmp_path / "camera.grayscale.png").read_bytes() == requests.get(
        app.links[1], timeout=30).content


def test_resume_from_history_sends_only_the_image_not_done(history_app: Any) -> None:
    app = history_app
    before = process_requests(app.server)
    app.history_view.rows[0].buttons["resume"].invoke()
    assert app.current_view == "Process"
    pump_until(app, lambda: len(app.process.batch) == 2 and not app.process.batch.running
               and all(j.status.value == "done" for j in app.process.batch.jobs), 60,
               "the resumed batch to finish")
    assert "1 done before, sending 1" in app.banner_text
    assert process_requests(app.server) - before == 1  # camera.png only
    assert app.process.batch.jobs[0].result.url == app.links[0]  # kept from the journal
    assert "An unfinished batch" not in app.banner_text  # the offer went with the resume

    app.show_view("History")
    pump_until(app, lambda: "2 of 2 done" in (app.history_view.texts() or [""])[0], 20,
               "the resumed batch finished in the history")
    app.scripted.confirm_answer = True
    app.history.clear_finished()
    pump_until(app, lambda: app.history_view.summary.cget("text").startswith("No batches"),
               30, "the history cleared")
    assert not app.failures
