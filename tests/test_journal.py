"""The batch journal (gui/journal.py): records and their states, what a resume sends,
two writers on one file, and where the journal lives."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gui.journal import (
    SCHEMA_VERSION,
    BatchState,
    Change,
    Identity,
    InputRecord,
    ItemState,
    Journal,
    JournalError,
    OutputRecord,
    data_dir,
    journal_path,
    plan_resume,
    resume_plan,
)

SPEC = {"kind": "process", "operation": "grayscale", "format": "png"}


def make_inputs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:03}.png"
        path.write_bytes(b"image %d" % i)
        paths.append(path)
    return paths


@pytest.fixture
def journal(tmp_path: Path):
    opened = Journal(tmp_path / "data" / "journal.sqlite3")
    yield opened
    opened.close()


def test_the_journal_lives_in_the_data_folder_or_the_override(tmp_path: Path) -> None:
    assert data_dir({"XDG_DATA_HOME": str(tmp_path), "HOME": "/nowhere"}) == \
        tmp_path / "ImageFleet"
    assert data_dir({"HOME": str(tmp_path)}) == tmp_path / ".local" / "share" / "ImageFleet"
    assert journal_path({"IMAGEFLEET_DATA_DIR": str(tmp_path / "x"),
                         "XDG_DATA_HOME": "/elsewhere"}) == tmp_path / "x" / "journal.sqlite3"


def test_a_batch_goes_from_pending_to_done_and_failed(journal: Journal, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 3)
    expires = datetime.now(UTC) + timedelta(hours=1)
    batch = journal.begin(SPEC, inputs, endpoint="http://127.0.0.1:1", source="cli")
    journal.flush()
    summary = journal.batch(batch)
    assert summary is not None
    assert (summary.state, summary.total, summary.done, summary.failed, summary.pending) == (
        BatchState.RUNNING, 3, 0, 0, 3)
    first = journal.inputs(batch)[0]
    assert first.identity == Identity(len(b"image 0"), inputs[0].stat().st_mtime_ns)
    assert first.state is ItemState.PENDING and first.hash is None

    journal.record_done(batch, 0, key="k0", url="http://x/0", expires_at=expires,
                        instance_id="w1", saved_path=tmp_path / "out0.png", hash_path=inputs[0])
    journal.record_failed(batch, 1, "415 unsupported_media_type: not an image")
    journal.flush()
    records = journal.inputs(batch)
    assert [r.state for r in records] == [ItemState.DONE, ItemState.FAILED, ItemState.PENDING]
    done = records[0].outputs[0]
    assert (done.key, done.url, done.instance_id, done.saved_path) == (
        "k0", "http://x/0", "w1", str(tmp_path / "out0.png"))
    assert done.expires_at == expires
    assert records[0].hash is not None
    assert records[1].error == "415 unsupported_media_type: not an image"
    summary = journal.batch(batch)
    assert summary is not None and (summary.done, summary.failed, summary.links) == (1, 1, 1)
    assert summary.first_expiry == expires and summary.unfinished
    assert summary.sample_link == "http://x/0"  # whether the links open elsewhere

    # a failed image that is retried and works is done; the batch then finishes
    journal.record_done(batch, 1, key="k1", url="http://x/1", expires_at=expires)
    journal.record_done(batch, 2, key="k2", url="http://x/2", expires_at=expires)
    journal.finish(batch)
    journal.flush()
    summary = journal.batch(batch)
    assert summary is not None
    assert (summary.state, summary.done, summary.failed, summary.unfinished) == (
        BatchState.FINISHED, 3, 0, False)
    assert journal.find_resumable(SPEC, inputs) is None  # finished: nothing to resume


def test_several_outputs_per_input_are_done_only_together(journal: Journal,
                                                          tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 2)
    batch = journal.begin(SPEC, inputs, endpoint="e", source="app",
                          outputs=("large", "thumb"))
    journal.record_done(batch, 0, key="a", url="u", expires_at=None, output="large")
    journal.record_done(batch, 1, key="b", url="u", expires_at=None, output="large")
    journal.record_done(batch, 1, key="c", url="u", expires_at=None, output="thumb")
    journal.flush()
    records = journal.inputs(batch)
    assert [r.state for r in records] == [ItemState.PENDING, ItemState.DONE]
    assert [o.output for o in records[0].outputs] == ["large", "thumb"]
    summary = journal.batch(batch)
    assert summary is not None and (summary.done, summary.pending, summary.links) == (1, 1, 3)


def test_find_resumable_matches_spec_and_inputs_newest_first(journal: Journal,
                                                            tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 3)
    older = journal.begin(SPEC, inputs, endpoint="e", source="cli", batch_id="20260101-000000-aaaa")
    newer = journal.begin(SPEC, inputs, endpoint="e", source="cli", batch_id="20260102-000000-bbbb")
    journal.begin({**SPEC, "format": "webp"}, inputs, endpoint="e", source="cli")
    journal.begin(SPEC, inputs[:2], endpoint="e", source="cli")
    journal.flush()
    assert journal.find_resumable(SPEC, inputs) == newer
    journal.set_state(newer, BatchState.FINISHED)
    journal.flush()
    assert journal.find_resumable(SPEC, inputs) == older
    assert journal.find_resumable(SPEC, list(reversed(inputs))) is None  # order counts


def done_record(index: int, path: Path, identity: Identity,
                digest: str | None = "h") -> InputRecord:
    return InputRecord(index, path, identity, digest,
                       (OutputRecord("", ItemState.DONE, key="k", url="u"),))


def test_resume_plan_keeps_unchanged_done_inputs_and_resends_the_rest() -> None:
    same = Identity(10, 1000)
    inputs = [
        done_record(0, Path("a"), same),
        done_record(1, Path("b"), same),  # size changed
        done_record(2, Path("c"), same),  # mtime changed, same content
        done_record(3, Path("d"), same),  # mtime changed, other content
        InputRecord(4, Path("e"), same, None, (OutputRecord("", ItemState.PENDING),)),
        InputRecord(5, Path("f"), same, None, (OutputRecord("", ItemState.FAILED, "x"),)),
        done_record(6, Path("g"), same),  # gone
    ]
    now = {0: same, 1: Identity(11, 1000), 2: Identity(10, 2000), 3: Identity(10, 2000),
           4: same, 5: same, 6: Identity(None, None)}
    first = resume_plan(inputs, now)
    assert first.keep == (0,) and first.rehash == (2, 3)
    plan = resume_plan(inputs, now, {2: "h", 3: "other"})
    assert plan.keep == (0, 2)
    assert plan.send == (1, 3, 4, 5)
    assert plan.changed == ((1, Change.SIZE), (3, Change.MTIME_AND_CONTENT))
    assert plan.missing == (6,)
    assert plan.describe_changed(inputs) == [
        "b: its size changed since the batch ran; sending it again",
        "d: its content changed since the batch ran; sending it again"]


def test_plan_resume_reads_the_files(journal: Journal, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 4)
    batch = journal.begin(SPEC, inputs, endpoint="e", source="cli")
    for i in range(3):
        journal.record_done(batch, i, key=f"k{i}", url="u", expires_at=None, hash_path=inputs[i])
    journal.flush()
    inputs[0].write_bytes(b"a different image")  # edited: size changes
    stat = inputs[1].stat()
    os.utime(inputs[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))  # touched
    plan = plan_resume(journal.inputs(batch))
    assert plan.keep == (1, 2)
    assert plan.send == (0, 3)
    assert plan.changed == ((0, Change.SIZE),)


def test_two_writers_on_one_journal_lose_nothing(tmp_path: Path) -> None:
    """The app and a command line may journal at the same time: two writers (each its own
    connection and thread, as two processes have) write 2 x 500 records, interleaved."""
    path = tmp_path / "journal.sqlite3"
    inputs = make_inputs(tmp_path / "in", 500)
    first, second = Journal(path), Journal(path)
    try:
        batches = [first.begin(SPEC, inputs, endpoint="e", source="app"),
                   second.begin(SPEC, inputs, endpoint="e", source="cli")]

        def write(journal: Journal, batch: str) -> None:
            for i in range(len(inputs)):
                journal.record_done(batch, i, key=f"k{i}", url=f"u{i}", expires_at=None)

        threads = [threading.Thread(target=write, args=pair)
                   for pair in zip((first, second), batches, strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert first.flush(60) and second.flush(60)
        assert not first.stats.failures and not second.stats.failures
    finally:
        first.close()
        second.close()
    reader = Journal(path)
    try:
        for batch in batches:
            summary = reader.batch(batch)
            assert summary is not None and summary.done == len(inputs)
    finally:
        reader.close()
    # many records, few commits: the writer groups what is queued
    assert first.stats.commits < first.stats.ops


def test_history_pages_newest_first_and_clear_keeps_unfinished(journal: Journal,
                                                               tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 1)
    ids = [journal.begin(SPEC, inputs, endpoint="e", source="cli",
                         batch_id=f"202601{day:02}-000000-0000") for day in range(1, 8)]
    for batch in ids[:5]:
        journal.finish(batch)
    journal.flush()
    assert journal.count_batches() == 7
    assert [b.id for b in journal.list_batches(0, 3)] == ids[::-1][:3]
    assert [b.id for b in journal.list_batches(3, 3)] == ids[::-1][3:6]
    assert [b.id for b in journal.list_batches(0, 50, unfinished_only=True)] == ids[:4:-1]
    journal.clear()
    journal.flush()
    assert [b.id for b in journal.list_batches()] == ids[:4:-1]
    journal.delete([ids[5]])
    journal.flush()
    assert [b.id for b in journal.list_batches()] == [ids[6]]
    assert journal.inputs(ids[5]) == []  # its inputs went with it


def test_the_journal_file_is_private(journal: Journal) -> None:
    assert journal.path.stat().st_mode & 0o777 == 0o600


def test_a_broken_journal_file_is_named_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match=r"journal.sqlite3 is not usable .*move it away"):
        Journal(path)


def test_records_survive_a_reopen_and_the_mode_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    inputs = make_inputs(tmp_path / "in", 2)
    journal = Journal(path)
    batch = journal.begin(SPEC, inputs, endpoint="e", source="cli")
    journal.record_done(batch, 1, key="k", url="u", expires_at=None)
    journal.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = Journal(path)
    try:
        assert [r.state for r in again.inputs(batch)] == [ItemState.PENDING, ItemState.DONE]
    finally:
        again.close()


# The schema as the first version of the journal wrote it (schema 0, before the
# result's width, height and bytes were kept): copied from gui/journal.py of then.
SCHEMA_0 = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    source TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    spec TEXT NOT NULL,
    spec_key TEXT NOT NULL,
    inputs_key TEXT NOT NULL,
    outputs TEXT NOT NULL,
    out_dir TEXT,
    state TEXT NOT NULL,
    total INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (created_at DESC);
CREATE INDEX IF NOT EXISTS batches_by_spec ON batches (spec_key, inputs_key, state);
CREATE TABLE IF NOT EXISTS inputs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,
    mtime_ns INTEGER,
    hash TEXT,
    PRIMARY KEY (batch_id, idx)
);
CREATE TABLE IF NOT EXISTS outputs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    output TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    key TEXT,
    url TEXT,
    expires_at TEXT,
    instance_id TEXT,
    format TEXT,
    saved_path TEXT,
    updated_at REAL NOT NULL,
    PRIMARY KEY (batch_id, idx, output)
);
CREATE INDEX IF NOT EXISTS outputs_by_state ON outputs (batch_id, state);
"""


def old_journal(path: Path, inputs: list[Path], batch_id: str = "20260101-000000-0001",
                state: str = "running", updated_at: float = 1_767_225_600.0) -> None:
    """A schema-0 journal file with one batch: its first input done, the rest pending."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA_0)
        conn.execute("INSERT INTO batches VALUES (?, ?, ?, 'cli', 'e', ?, 'sk', 'ik', "
                     "'[\"\"]', NULL, ?, ?)", (batch_id, updated_at, updated_at,
                                              json.dumps(SPEC), state, len(inputs)))
        for i, source in enumerate(inputs):
            st = source.stat()
            conn.execute("INSERT INTO inputs VALUES (?, ?, ?, ?, ?, NULL)",
                         (batch_id, i, str(source), st.st_size, st.st_mtime_ns))
            conn.execute("INSERT INTO outputs VALUES (?, ?, '', ?, NULL, ?, ?, NULL, ?, ?, "
                         "NULL, ?)", (batch_id, i, "done" if i == 0 else "pending",
                                      f"k{i}" if i == 0 else None,
                                      "http://x/0" if i == 0 else None,
                                      "w1" if i == 0 else None, "png" if i == 0 else None,
                                      updated_at))
        conn.commit()
    finally:
        conn.close()


def test_an_old_journal_is_migrated_and_its_rows_read_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite3"
    inputs = make_inputs(tmp_path / "in", 2)
    old_journal(path, inputs)
    journal = Journal(path)
    try:
        with sqlite3.connect(path) as conn:
            columns = {row[1] for row in conn.execute("PRAGMA table_info(outputs)")}
            assert {"width", "height", "bytes"} <= columns
            assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        old, pending = journal.inputs("20260101-000000-0001")
        done = old.outputs[0]
        assert (old.state, done.key, done.url, done.format) == (
            ItemState.DONE, "k0", "http://x/0", "png")
        assert (done.width, done.height, done.bytes) == (None, None, None)  # unknown
        assert pending.state is ItemState.PENDING
        # the migrated file takes the new facts
        journal.record_done("20260101-000000-0001", 1, key="k1", url="http://x/1",
                            expires_at=None, format="webp", width=640, height=480,
                            bytes=12_345)
        journal.flush()
        new = journal.inputs("20260101-000000-0001")[1].outputs[0]
        assert (new.format, new.width, new.height, new.bytes) == ("webp", 640, 480, 12_345)
    finally:
        journal.close()
    Journal(path).close()  # opening a migrated file again changes nothing


def test_a_done_output_keeps_the_results_facts(journal: Journal, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", 2)
    batch = journal.begin(SPEC, inputs, endpoint="e", source="app")
    journal.record_done(batch, 0, key="k", url="u", expires_at=None, format="jpeg",
                        width=4032, height=3024, bytes=2_000_000)
    journal.record_done(batch, 1, key="k", url="u", expires_at=None)  # facts not given
    journal.flush()
    first, second = (r.outputs[0] for r in journal.inputs(batch))
    assert (first.format, first.width, first.height, first.bytes) == (
        "jpeg", 4032, 3024, 2_000_000)
    assert (second.width, second.height, second.bytes) == (None, None, None)
