"""The batch journal prunes itself (gui/journal.py): which batches go is a pure function
of their state, last activity, the clock and the days kept (a table of cases with a
fake clock); a real journal file loses its old finished batches and keeps the
unfinished and the recent ones; the app's ``history_days`` setting and the command
line's ``IMAGEFLEET_HISTORY_DAYS`` are checked, and both prune at start."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from conftest import free_port
from test_journal import make_inputs

from gui.journal import (
    DAY_S,
    BatchState,
    Journal,
    RetentionRow,
    batches_to_prune,
)
from gui.settings import Settings, SettingsError, parse_settings
from scripts import batch_journal
from scripts.process import main

NOW = 1_796_212_800.0  # 2026-12-02 12:00 UTC: the fake clock
SPEC = {"kind": "process", "operation": "grayscale", "format": "png"}
FINISHED, RUNNING, CANCELLED = BatchState.FINISHED, BatchState.RUNNING, BatchState.CANCELLED


def days_ago(days: float, now: float = NOW) -> float:
    return now - days * DAY_S


@pytest.mark.parametrize(("state", "last_active_days_ago", "not_done", "days", "pruned"), [
    (FINISHED, 91, 0, 90, True),  # old and finished: goes
    (FINISHED, 91, 3, 90, True),  # finished with failures: nothing left to resume
    (FINISHED, 89, 0, 90, False),  # recent: stays
    (FINISHED, 90, 0, 90, False),  # exactly at the limit: not older, stays
    (FINISHED, 90.001, 0, 90, True),
    (RUNNING, 400, 5, 90, False),  # interrupted, images left: resumable, never pruned
    (CANCELLED, 400, 5, 90, False),  # cancelled: still resumable by hand
    (RUNNING, 400, 0, 90, True),  # every image done, only its state never said so
    (CANCELLED, 400, 0, 90, True),
    (FINISHED, 3000, 0, 0, False),  # 0 days: keep for ever
    (FINISHED, 2, 0, 1, True),
    (FINISHED, 0.5, 0, 1, False),
])
def test_which_batches_are_pruned(state: BatchState, last_active_days_ago: float,
                                  not_done: int, days: int, pruned: bool) -> None:
    row = RetentionRow("b", state, days_ago(last_active_days_ago), not_done)
    assert batches_to_prune([row], NOW, days) == (["b"] if pruned else [])


def test_the_decision_keeps_the_rows_order_and_ignores_the_kept() -> None:
    rows = [RetentionRow("a", FINISHED, days_ago(200), 0),
            RetentionRow("b", RUNNING, days_ago(200), 1),
            RetentionRow("c", FINISHED, days_ago(10), 0),
            RetentionRow("d", FINISHED, days_ago(100), 0)]
    assert batches_to_prune(rows, NOW, 90) == ["a", "d"]
    assert batches_to_prune([], NOW, 90) == []


# --------------------------------------------------------------------------- a real file


def add_batch(journal: Journal, inputs: list[Path], batch_id: str, *, done: int,
              state: BatchState) -> str:
    journal.begin(SPEC, inputs, endpoint="e", source="cli", batch_id=batch_id)
    for i in range(done):
        journal.record_done(batch_id, i, key=f"k{i}", url=f"http://x/{i}", expires_at=None,
                            width=10, height=10, bytes=100)
    journal.set_state(batch_id, state)
    return batch_id


def age(path: Path, ages: dict[str, float], now: float = NOW) -> None:
    """Set the batches' last activity to so many days before ``now`` (the writer stamps
    the real clock; the test moves it back instead of waiting months)."""
    with sqlite3.connect(path) as conn:
        conn.executemany("UPDATE batches SET created_at = ?, updated_at = ? WHERE id = ?",
                         ((days_ago(d, now), days_ago(d, now), b) for b, d in ages.items()))


def rows_in(path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(path) as conn:
        return tuple(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                     for table in ("batches", "inputs", "outputs"))  # type: ignore[return-value]


def journal_with_ages(path: Path, inputs: list[Path], now: float = NOW) -> dict[str, str]:
    journal = Journal(path)
    try:
        ids = {
            "old finished": add_batch(journal, inputs, "20260101-000000-0001", done=3,
                                      state=FINISHED),
            "old finished too": add_batch(journal, inputs, "20260102-000000-0002", done=3,
                                          state=FINISHED),
            "old interrupted": add_batch(journal, inputs, "20260103-000000-0003", done=1,
                                         state=RUNNING),
            "old cancelled": add_batch(journal, inputs, "20260104-000000-0004", done=2,
                                       state=CANCELLED),
            "recent finished": add_batch(journal, inputs, "20261120-000000-0005", done=3,
                                         state=FINISHED),
        }
        assert journal.flush()
    finally:
        journal.close()
    age(path, {ids["old finished"]: 300, ids["old finished too"]: 120,
               ids["old interrupted"]: 300, ids["old cancelled"]: 200,
               ids["recent finished"]: 12}, now)
    return ids


def test_a_journal_loses_its_old_finished_batches_only(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    ids = journal_with_ages(path, make_inputs(tmp_path / "in", 3))
    assert rows_in(path) == (5, 15, 15)
    journal = Journal(path)
    try:
        journal.prune(0, now=NOW)  # 0: keep for ever
        assert journal.flush()
        assert journal.count_batches() == 5
        journal.prune(90, now=NOW)
        assert journal.flush()
        kept = {b.id for b in journal.list_batches()}
        assert kept == {ids["old interrupted"], ids["old cancelled"], ids["recent finished"]}
        assert journal.stats.pruned == 2 and not journal.stats.failures
        assert journal.inputs(ids["old finished"]) == []  # its rows went with it
        assert [r.state.value for r in journal.inputs(ids["old interrupted"])] == [
            "done", "pending", "pending"]  # still resumable as it was
    finally:
        journal.close()
    assert rows_in(path) == (3, 9, 9)


def test_a_large_prune_commits_in_steps_and_the_space_is_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gui.journal.PRUNE_IMAGES_PER_COMMIT", 50)
    path = tmp_path / "journal.sqlite3"
    inputs = make_inputs(tmp_path / "in", 40)
    journal = Journal(path)
    try:
        ids = [add_batch(journal, inputs, f"202601{n + 1:02}-000000-{n:04}", done=40,
                         state=FINISHED) for n in range(6)]
        assert journal.flush()
        age(path, dict.fromkeys(ids, 100))
        with sqlite3.connect(path) as conn:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        commits = journal.stats.commits
        journal.prune(90, now=NOW)
        assert journal.flush()  # waits for every step of the prune
        assert journal.count_batches() == 0 and journal.stats.pruned == 6
        assert journal.stats.commits - commits == 6  # one 40-image batch per transaction
        # the freed pages take the next batches: the file does not grow
        for n in range(6):
            add_batch(journal, inputs, f"202612{n + 1:02}-000000-{n:04}", done=40,
                      state=FINISHED)
        assert journal.flush()
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA page_count").fetchone()[0] <= pages
    finally:
        journal.close()


# --------------------------------------------------------------------------- the settings


def test_history_days_is_a_setting_from_0_to_3650() -> None:
    assert Settings().history_days == 90
    assert parse_settings({"history_days": "0"}).history_days == 0
    assert parse_settings({"history_days": 3650}).history_days == 3650
    for bad, message in ((3651, "history_days must be from 0 to 3650, got 3651"),
                         (-1, "history_days must be from 0 to 3650, got -1"),
                         ("a year", "history_days must be a whole number from 0 to 3650"),
                         (True, "history_days must be a whole number from 0 to 3650")):
        with pytest.raises(SettingsError, match=message):
            parse_settings({"history_days": bad})


def test_the_command_line_reads_its_days_from_the_environment() -> None:
    assert batch_journal.history_days({}) == 90
    assert batch_journal.history_days({"IMAGEFLEET_HISTORY_DAYS": ""}) == 90
    assert batch_journal.history_days({"IMAGEFLEET_HISTORY_DAYS": " 7 "}) == 7
    assert batch_journal.history_days({"IMAGEFLEET_HISTORY_DAYS": "0"}) == 0
    with pytest.raises(ValueError, match="IMAGEFLEET_HISTORY_DAYS must be from 0 to 3650"):
        batch_journal.history_days({"IMAGEFLEET_HISTORY_DAYS": "9999"})


def test_a_command_line_batch_prunes_the_journal_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IMAGEFLEET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IMAGEFLEET_HISTORY_DAYS", "150")
    path = tmp_path / "data" / "journal.sqlite3"
    path.parent.mkdir()
    inputs = make_inputs(tmp_path / "in", 3)
    ids = journal_with_ages(path, inputs, now=time.time())  # the command line's clock
    # nothing listens there: the run ends at once, after the journal was opened
    code = main(["--endpoint", f"http://127.0.0.1:{free_port()}", "--attempts", "1",
                 "--op", "grayscale", str(inputs[0])])
    assert code == 1, capsys.readouterr().err
    with sqlite3.connect(path) as conn:
        kept = {row[0] for row in conn.execute("SELECT id FROM batches")}
    # 150 days: the 300-day-old finished batch goes, the 120-day-old one stays (the run
    # itself stopped before it began a batch)
    assert kept == {ids["old finished too"], ids["old interrupted"], ids["old cancelled"],
                    ids["recent finished"]}


def test_a_bad_days_variable_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IMAGEFLEET_HISTORY_DAYS", "forever")
    with pytest.raises(SystemExit) as stopped:
        main(["--endpoint", "http://h", "--op", "grayscale", "f.png"])
    assert stopped.value.code == 2
    assert "IMAGEFLEET_HISTORY_DAYS must be a whole number from 0 to 3650, got 'forever'" in \
        capsys.readouterr().err
