"""Never the wrong file, without a display: result names shared by the command line and
the app, saving with a conflict policy, stale results, the header check made when
images are added, and the texts saying what runs."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import pytest

from gui.client import ProcessResult
from gui.imagecheck import check_headers, not_an_image
from gui.naming import (
    OnConflict,
    SaveAction,
    SaveOutcome,
    batch_candidates,
    candidate_names,
    output_stems,
    save_result,
    save_summary,
    save_to_path,
)
from gui.viewmodel.batch import (
    Batch,
    JobStatus,
    StaleChoice,
    can_retry,
    short_message,
    stale_choice,
    stale_question,
    status_text,
)
from gui.viewmodel.requests import (
    ProcessRequest,
    RequestStep,
    build_request,
    describe_request,
    runs_text,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- names


def test_the_cli_and_the_app_share_one_naming_function() -> None:
    import scripts.process as cli

    assert cli.output_stems is output_stems  # imported, not copied


def test_duplicate_stems_in_a_batch_are_numbered_in_input_order() -> None:
    names = [next(c) for c in batch_candidates(
        [Path("a/photo.jpg"), Path("b/photo.png"), Path("c/Photo.webp")],
        ["invert"] * 3, ["jpeg", "png", "webp"])]
    assert names == ["photo.invert.jpg", "photo-2.invert.png", "Photo-3.invert.webp"]


def test_candidates_skip_stems_other_inputs_own() -> None:
    stems = output_stems([Path("photo.png"), Path("photo.jpg"), Path("photo-2.png")])
    assert stems == ["photo", "photo-3", "photo-2"]
    names = list(islice(candidate_names("photo", "invert", "jpeg", stems), 4))
    assert names == ["photo.invert.jpg", "photo-4.invert.jpg", "photo-5.invert.jpg",
                     "photo-6.invert.jpg"]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _save_batch(folder: Path, policy: OnConflict, payload: bytes) -> list[SaveOutcome]:
    sources = [Path("a/photo.jpg"), Path("b/photo.png")]
    return [save_result(folder, names, payload, policy, natural=f"{source.stem}.invert.jpg")
            for source, names in zip(sources, batch_candidates(sources, ["invert"] * 2,
                                                               ["jpeg", "jpeg"]), strict=True)]


def test_saving_twice_unique_then_skip_then_overwrite(tmp_path: Path) -> None:
    first = _save_batch(tmp_path, OnConflict.UNIQUE, b"one")
    # the second has to be renamed: its input shares the first one's stem
    assert [o.action for o in first] == [SaveAction.WRITTEN, SaveAction.RENAMED]
    assert _names(tmp_path) == ["photo-2.invert.jpg", "photo.invert.jpg"]
    assert save_summary(first, tmp_path) == (
        f"Saved 2 files to {tmp_path} (1 renamed, 0 skipped, 0 overwritten).")

    again = _save_batch(tmp_path, OnConflict.UNIQUE, b"two")
    assert [o.action for o in again] == [SaveAction.RENAMED, SaveAction.RENAMED]
    assert [o.path.name for o in again] == ["photo-3.invert.jpg", "photo-4.invert.jpg"]
    assert (tmp_path / "photo.invert.jpg").read_bytes() == b"one"  # untouched

    skipped = _save_batch(tmp_path, OnConflict.SKIP, b"three")
    assert [o.action for o in skipped] == [SaveAction.SKIPPED, SaveAction.SKIPPED]
    assert save_summary(skipped, tmp_path).startswith("Saved 0 files")
    assert "2 skipped" in save_summary(skipped, tmp_path)

    overwritten = _save_batch(tmp_path, OnConflict.OVERWRITE, b"four")
    assert [o.action for o in overwritten] == [SaveAction.OVERWRITTEN] * 2
    assert (tmp_path / "photo.invert.jpg").read_bytes() == b"four"
    assert (tmp_path / "photo-3.invert.jpg").read_bytes() == b"two"
    # no temporary file is left behind by any of it
    assert _names(tmp_path) == ["photo-2.invert.jpg", "photo-3.invert.jpg",
                                "photo-4.invert.jpg", "photo.invert.jpg"]


def test_a_file_that_appears_meanwhile_is_never_clobbered(tmp_path: Path) -> None:
    """The names are worked out first and the folder may change before the write: the
    final link refuses an existing name, so the newcomer stays and the next name is used."""
    names = candidate_names("photo", "invert", "png")
    (tmp_path / "photo.invert.png").write_bytes(b"someone else's")
    outcome = save_result(tmp_path, names, b"ours", OnConflict.UNIQUE)
    assert outcome == SaveOutcome(tmp_path / "photo-2.invert.png", SaveAction.RENAMED)
    assert (tmp_path / "photo.invert.png").read_bytes() == b"someone else's"


def test_save_as_replaces_atomically_and_reports_a_missing_folder(tmp_path: Path) -> None:
    target = tmp_path / "chosen.png"
    target.write_bytes(b"old")
    assert save_to_path(target, b"new").action == SaveAction.OVERWRITTEN
    assert target.read_bytes() == b"new"
    with pytest.raises(FileNotFoundError):
        save_to_path(tmp_path / "missing" / "x.png", b"data")


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    outcome = save_result(tmp_path, candidate_names("p", "invert", "png"), b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert outcome.path.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------- staleness


def result() -> ProcessResult:
    return ProcessResult(key="", url="http://x/r", expires_at=NOW + timedelta(hours=1),
                         instance_id="w1", width=10, height=10, format="png", bytes=100,
                         cached=False, tiles=1, timings_ms={}, elapsed_s=0.25)


def request(low: float = 100.0, *, fmt: str = "png", ttl: int = 3600) -> ProcessRequest:
    return build_request(operation="canny", params={"low": low, "high": 200.0},
                         pipeline=[], output_format=fmt, quality=90, expires_in=ttl)


def test_a_result_made_with_other_settings_is_stale_and_says_so() -> None:
    batch = Batch()
    batch.add([Path("/imgs/a.png"), Path("/imgs/b.png")])
    made = request()
    batch.set_current(made)
    a, b = batch.start()
    batch.finish(a.id, a.ticket, result(), "canny", made)
    assert not batch.get(a.id).stale
    assert status_text(batch.get(a.id)) == "10×10 png · 250 ms"

    assert batch.set_current(request(ttl=60)) == []  # a link's lifetime changes no pixels
    changed = batch.set_current(request(low=50.0))
    assert [job.id for job in changed] == [a.id]
    assert batch.get(a.id).stale and batch.stale_jobs() == [batch.get(a.id)]
    assert status_text(batch.get(a.id)) == "done · stale (other settings)"
    # b finishes with the old request after the change: stale at once
    batch.finish(b.id, b.ticket, result(), "canny", made)
    assert batch.get(b.id).stale
    assert batch.set_current(None) == []  # invalid settings on screen: marks stay
    back = batch.set_current(made)
    assert {job.id for job in back} == {a.id, b.id}
    assert batch.stale_jobs() == []
    # a re-run keeps the earlier result (and its mark) until the new one comes
    batch.set_current(request(fmt="webp"))
    (rerun,) = batch.start([a.id])
    assert rerun.status == JobStatus.QUEUED and rerun.made_with == made
    done = batch.finish(a.id, rerun.ticket, result(), "canny", request(fmt="webp"))
    assert not done.stale


def test_the_stale_question_maps_yes_no_cancel() -> None:
    assert stale_choice(True) is StaleChoice.RERUN
    assert stale_choice(False) is StaleChoice.INCLUDE
    assert stale_choice(None) is StaleChoice.CANCEL
    text = stale_question(2, 5)
    assert text.startswith("2 of 5 results were made with other settings")
    assert "Yes: re-run" in text and "No: save them as they are" in text


def test_what_runs_is_said_with_every_step_and_the_output() -> None:
    req = build_request(operation="canny", params={"low": 100.0, "high": 200.0},
                        pipeline=[RequestStep("resize", {"width": 64}),
                                  RequestStep("canny", {"low": 100.0})],
                        output_format="png", quality=90, expires_in=None)
    assert describe_request(req) == "resize (width=64) → canny (low=100) · png"
    assert runs_text(req, titles={"canny": "Canny edges"}) == (
        "Runs: resize (width=64) → Canny edges (low=100) · png")
    single = build_request(operation="invert", params={}, pipeline=[],
                           output_format="original", quality=80, expires_in=None)
    assert runs_text(single) == "Runs: invert · original format, quality 80"
    assert runs_text(None, "choose an operation") == "Cannot run yet: choose an operation"


# --------------------------------------------------------------------------- rows


def test_rows_show_a_short_error_and_the_details_the_whole_one() -> None:
    message = ("The server cannot read this image (415): the image data could not be "
               "decoded: libpng error: PNG input buffer is incomplete")
    short = short_message(message)
    assert len(short) <= 60 and short.endswith("…") and message.startswith(short[:-1])
    assert short_message("400 bad parameter") == "400 bad parameter"
    batch = Batch()
    batch.add([Path("/imgs/a.png")])
    (job,) = batch.start()
    failed = batch.fail(job.id, job.ticket, message)
    assert status_text(failed) == short and failed.message == message
    assert can_retry(failed)


def test_files_that_are_not_images_are_marked_at_add_and_never_run(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("shopping list: milk, eggs\n")
    whole = (IMAGES / "astronaut.png").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[:40])  # the signature and half a header
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    good = tmp_path / "good.png"
    good.write_bytes(whole)
    problems = check_headers([text, cut, empty, good])
    assert problems == {
        text: "it starts with text, not an image header",
        cut: "a PNG whose header is cut short or damaged",
        empty: "the file is empty",
    }
    assert not_an_image(good) is None

    batch = Batch()
    added = batch.add([text, good], problems).added
    bad = added[0]
    assert bad.status == JobStatus.NOT_IMAGE
    assert status_text(bad) == "not an image: it starts with text, not an image header"
    assert not can_retry(bad)
    assert [job.path.name for job in batch.start()] == ["good.png"]
    assert batch.start([bad.id]) == []  # a retry cannot send it either


def test_the_conflict_setting_is_validated_and_kept(tmp_path: Path) -> None:
    from gui.settings import Settings, SettingsError, load_settings, parse_settings, save_settings

    assert Settings().on_conflict == "unique"
    assert parse_settings({"on_conflict": "Skip"}).on_conflict == "skip"
    with pytest.raises(SettingsError, match="on_conflict must be one of unique, overwrite, skip"):
        parse_settings({"on_conflict": "replace"})
    path = tmp_path / "settings.json"
    save_settings(Settings(on_conflict="overwrite"), path)
    assert load_settings(path).settings.on_conflict == "overwrite"
