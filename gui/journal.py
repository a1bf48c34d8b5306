"""The batch journal: every batch the app or the command line runs, kept in SQLite so
it survives the app closing, crashing or the machine sleeping. No Tk import here.

Where: ``journal.sqlite3`` in the user's data folder (platformdirs'
``user_data_dir("ImageFleet")``; ``$XDG_DATA_HOME/ImageFleet`` on Linux), or in
``$IMAGEFLEET_DATA_DIR`` when that is set.

What a batch holds: its id, when it was made, the endpoint, the job spec (JSON, opaque
here: operation or steps, output settings), its inputs (path, size, mtime, and a content
hash once an image is done) and, per input and per output, the state (pending, done,
failed + error), the result key, link, its expiry, the instance, the saved path and the
result's format, width, height and size in bytes.

Writing: one ``JournalWriter`` thread per process owns the only writing connection.
Callers (the Tk thread, the asyncio loop) only put a record on its queue, which costs a
few microseconds. The thread writes whatever is queued in one transaction, so a burst of
finished images is one commit, not one per image. The database is in WAL mode with
``synchronous=NORMAL``: a commit is a ``write()`` into the WAL, not an fsync, and a
process killed with SIGKILL loses only the records still on the queue (the images that
finished in the last moment); a power cut can lose the last commits too. Reading uses
its own short-lived connections (WAL readers do not block the writer), so the app reads
off its UI thread and the command line reads before it starts.

Deciding what a resume sends is a pure function (``resume_plan``) of the stored inputs
and what the files look like now.

Retention: ``prune(days)`` deletes the batches that are done with (finished, or with no
image left to do) and whose last activity is older than ``days`` (0: none), with their
inputs and outputs; which ones is a pure function (``batches_to_prune``). A batch that can
still be resumed is never pruned. SQLite reuses the freed pages for later records, so the
file stops growing; it is not rewritten (no VACUUM).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

APP_NAME = "ImageFleet"
JOURNAL_FILE = "journal.sqlite3"
DATA_DIR_ENV = "IMAGEFLEET_DATA_DIR"
BUSY_TIMEOUT_MS = 10_000  # the app and a command line may write the same journal at once
MAX_OPS_PER_COMMIT = 2000
HASH_CHUNK = 1 << 20
DEFAULT_HISTORY_DAYS = 90  # how long a finished batch stays; 0: for ever
HISTORY_DAYS_RANGE = (0, 3650)
HISTORY_DAYS_ENV = "IMAGEFLEET_HISTORY_DAYS"  # the command line's retention
# Pruning deletes at most this many images' rows per transaction, so a first prune of a
# year of 10,000-image batches does not hold the write lock for longer than the other
# process's busy timeout.
PRUNE_IMAGES_PER_COMMIT = 20_000
DAY_S = 86_400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    source TEXT NOT NULL,            -- 'app' or 'cli'
    endpoint TEXT NOT NULL,
    spec TEXT NOT NULL,              -- JSON, opaque to the journal
    spec_key TEXT NOT NULL,          -- hash of the canonical spec: finds a batch to resume
    inputs_key TEXT NOT NULL,        -- hash of the input paths, in order
    outputs TEXT NOT NULL,           -- JSON list of output names ('' = the one output)
    out_dir TEXT,
    state TEXT NOT NULL,             -- running, finished, cancelled
    total INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_time ON batches (created_at DESC);
CREATE INDEX IF NOT EXISTS batches_by_spec ON batches (spec_key, inputs_key, state);
CREATE TABLE IF NOT EXISTS inputs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER,                    -- NULL: the file was missing when recorded
    mtime_ns INTEGER,
    hash TEXT,                       -- blake2b of the bytes, recorded when it is done
    PRIMARY KEY (batch_id, idx)
);
CREATE TABLE IF NOT EXISTS outputs (
    batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    output TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending, done, failed
    error TEXT,
    key TEXT,
    url TEXT,
    expires_at TEXT,                 -- ISO 8601
    instance_id TEXT,
    format TEXT,                     -- the result's format (png, jpeg, webp)
    saved_path TEXT,
    updated_at REAL NOT NULL,
    width INTEGER,                   -- the result's facts (schema 1); NULL: not recorded
    height INTEGER,
    bytes INTEGER,
    PRIMARY KEY (batch_id, idx, output)
);
CREATE INDEX IF NOT EXISTS outputs_by_state ON outputs (batch_id, state);
"""

# Schema versions (``PRAGMA user_version``): 0 is the first schema, 1 adds the result's
# width, height and bytes to ``outputs``. A journal of an older version is migrated when
# it is opened; the columns are nullable, so rows written before stay valid and older
# programs (which name their columns) can still write to a migrated file.
SCHEMA_VERSION = 1
_ADDED_COLUMNS = (("outputs", "width", "INTEGER"), ("outputs", "height", "INTEGER"),
                  ("outputs", "bytes", "INTEGER"))


class JournalError(Exception):
    """The journal cannot be opened or read (the message says which file and why)."""


class ItemState(StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class BatchState(StrEnum):
    RUNNING = "running"  # started and not finished: what a resume picks up
    FINISHED = "finished"  # every image ran (some may have failed)
    CANCELLED = "cancelled"  # the user stopped it; it can still be resumed by hand


# --------------------------------------------------------------------------- where


def data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The user's data folder for ImageFleet. ``IMAGEFLEET_DATA_DIR`` wins; on Linux and
    other XDG systems ``XDG_DATA_HOME`` of ``environ`` is honoured (tests and the app
    pass their own environment); elsewhere platformdirs decides."""
    env = os.environ if environ is None else environ
    if env.get(DATA_DIR_ENV):
        return Path(env[DATA_DIR_ENV]).expanduser()
    if sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd")):
        base = env.get("XDG_DATA_HOME") or str(
            Path(env.get("HOME") or Path.home()) / ".local" / "share")
        return Path(base) / APP_NAME
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def journal_path(environ: Mapping[str, str] | None = None) -> Path:
    return data_dir(environ) / JOURNAL_FILE


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Identity:
    """What a file looked like: cheap to read (one ``stat``) for 10,000 inputs."""

    size: int | None
    mtime_ns: int | None

    @property
    def missing(self) -> bool:
        return self.size is None


def identity_of(path: Path) -> Identity:
    try:
        st = path.stat()
    except OSError:
        return Identity(None, None)
    return Identity(st.st_size, st.st_mtime_ns)


def content_hash(path: Path) -> str | None:
    """blake2b-128 of the file's bytes; None when it cannot be read."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def spec_key(spec: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:32]


def inputs_key(paths: Iterable[Path | str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()[:32]


def new_batch_id(now: float | None = None) -> str:
    """``20261202-184721-3f9a``: sorts by time, short enough to type."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return f"{stamp:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


@dataclass(frozen=True)
class OutputRecord:
    output: str
    state: ItemState
    error: str | None = None
    key: str | None = None
    url: str | None = None
    expires_at: datetime | None = None
    instance_id: str | None = None
    saved_path: str | None = None
    format: str | None = None
    # The result's facts; None when not recorded (an output journaled before schema 1)
    width: int | None = None
    height: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class InputRecord:
    index: int
    path: Path
    identity: Identity
    hash: str | None
    outputs: tuple[OutputRecord, ...]

    @property
    def state(self) -> ItemState:
        """Done when every output is; failed when one failed; else pending."""
        states = {o.state for o in self.outputs}
        if states == {ItemState.DONE}:
            return ItemState.DONE
        if ItemState.FAILED in states:
            return ItemState.FAILED
        return ItemState.PENDING

    @property
    def error(self) -> str | None:
        return next((o.error for o in self.outputs if o.error), None)


@dataclass(frozen=True)
class BatchSummary:
    id: str
    created_at: datetime
    updated_at: datetime
    source: str
    endpoint: str
    spec: dict[str, Any]
    outputs: tuple[str, ...]
    out_dir: str | None
    state: BatchState
    total: int
    done: int
    failed: int
    links: int  # outputs with a link
    first_expiry: datetime | None  # the soonest a link of this batch expires
    last_expiry: datetime | None
    # One of its links (all of a batch's come from one fleet's storage): whether they
    # open on this computer only.
    sample_link: str | None = None

    @property
    def pending(self) -> int:
        return self.total - self.done - self.failed

    @property
    def unfinished(self) -> bool:
        return self.state is not BatchState.FINISHED and self.pending > 0


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _iso(value: datetime | str | None) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.isoformat()


# --------------------------------------------------------------------------- resume


class Change(StrEnum):
    MISSING = "missing"
    SIZE = "size"
    MTIME_AND_CONTENT = "content"


@dataclass(frozen=True)
class ResumePlan:
    """What a resume does with each input of a batch (indices into its inputs)."""

    keep: tuple[int, ...]  # done and unchanged: not sent again
    send: tuple[int, ...]  # not done, or changed since: sent (again)
    changed: tuple[tuple[int, Change], ...]  # done but changed since: re-sent, the user is told
    missing: tuple[int, ...]  # gone: nothing to send, reported as failed
    rehash: tuple[int, ...] = ()  # done, same size, other mtime: the content decides

    def describe_changed(self, inputs: Sequence[InputRecord]) -> list[str]:
        words = {Change.SIZE: "its size changed", Change.MTIME_AND_CONTENT:
                 "its content changed", Change.MISSING: "it is missing"}
        by_index = {item.index: item for item in inputs}
        return [f"{by_index[i].path}: {words[why]} since the batch ran; sending it again"
                for i, why in self.changed]


def resume_plan(inputs: Sequence[InputRecord], now: Mapping[int, Identity],
                hashes: Mapping[int, str | None] | None = None) -> ResumePlan:
    """Decide per input, from what was recorded and what the files look like ``now``.

    A done input whose size and mtime are unchanged is kept. One whose size changed is
    re-sent. One whose mtime alone changed (a copy, a checkout, ``touch``) is decided by
    its content: call again with ``hashes`` for the indices in ``rehash``; the same hash
    keeps it. A missing file cannot be sent at all.
    """
    hashes = hashes or {}
    keep, send, changed, missing, rehash = [], [], [], [], []
    for item in inputs:
        current = now.get(item.index, Identity(None, None))
        if current.missing:
            missing.append(item.index)
            continue
        if item.state is not ItemState.DONE:
            send.append(item.index)
            continue
        if current.size != item.identity.size:
            send.append(item.index)
            changed.append((item.index, Change.SIZE))
        elif current.mtime_ns == item.identity.mtime_ns:
            keep.append(item.index)
        elif item.index in hashes:
            if item.hash is not None and hashes[item.index] == item.hash:
                keep.append(item.index)
            else:
                send.append(item.index)
                changed.append((item.index, Change.MTIME_AND_CONTENT))
        else:
            rehash.append(item.index)
    return ResumePlan(tuple(keep), tuple(send), tuple(changed), tuple(missing), tuple(rehash))


def plan_resume(inputs: Sequence[InputRecord]) -> ResumePlan:
    """``resume_plan`` with the file system read (blocking: call off the UI thread)."""
    now = {item.index: identity_of(item.path) for item in inputs}
    plan = resume_plan(inputs, now)
    if plan.rehash:
        wanted = set(plan.rehash)
        hashes = {item.index: content_hash(item.path) for item in inputs
                  if item.index in wanted}
        plan = resume_plan(inputs, now, hashes)
    return plan


# --------------------------------------------------------------------------- retention


@dataclass(frozen=True)
class RetentionRow:
    """What the pruning decision needs of a batch."""

    id: str
    state: BatchState
    last_activity: float  # epoch seconds: the batch's updated_at
    not_done: int  # its outputs not done (pending or failed)

    @property
    def resumable(self) -> bool:
        # what --resume and the History view can still continue
        return self.state is not BatchState.FINISHED and self.not_done > 0


def prune_cutoff(now: float, days: int) -> float | None:
    """Batches last active before this are old; None: keep every batch (``days`` 0)."""
    return None if days <= 0 else now - days * DAY_S


def batches_to_prune(rows: Iterable[RetentionRow], now: float, days: int) -> list[str]:
    """The ids of the batches to delete: not resumable, and last active more than
    ``days`` before ``now``. ``days`` 0 keeps everything."""
    cutoff = prune_cutoff(now, days)
    if cutoff is None:
        return []
    return [row.id for row in rows if row.last_activity < cutoff and not row.resumable]


# --------------------------------------------------------------------------- database


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=True)
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(f"cannot open the batch journal {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _init(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        _migrate(conn)
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"the batch journal {path} is not usable ({exc}); move it away "
                           "to start a new one") from exc
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # paths and links of the user's photographs


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a journal of an older schema up to ``SCHEMA_VERSION``.

    Under the write lock (``BEGIN IMMEDIATE``), so the app and a command line opening an
    old file at once do not both add a column. The columns are read with ``PRAGMA
    table_info`` rather than trusted from ``user_version`` alone: a file made by this
    code's ``CREATE TABLE`` has them already, whatever its version says."""
    if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column, kind in _ADDED_COLUMNS:
            present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                log.info("batch journal: added %s.%s", table, column)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


@dataclass(frozen=True)
class _Op:
    kind: str
    args: tuple[Any, ...]
    done: threading.Event | None = None


@dataclass
class WriterStats:
    ops: int = 0
    commits: int = 0
    hashed: int = 0
    pruned: int = 0  # batches deleted by prune()
    failures: list[str] = field(default_factory=list)


class Journal:
    """One journal file: a writer thread for records, short-lived readers for queries.

    Every ``record_*`` call only queues; ``flush()`` waits until what was queued before
    it is committed. ``close()`` flushes and stops the thread.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        conn = _connect(path)
        try:
            _init(conn, path)
        finally:
            conn.close()
        self.stats = WriterStats()
        self._more_prune: tuple[int, float] | None = None  # the writer thread's alone
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="journal-writer", daemon=True)
        self._closed = False
        self._thread.start()

    # ------------------------------------------------------------------ writing (queued)
    def begin(self, spec: Mapping[str, Any], inputs: Sequence[Path], *, endpoint: str,
              source: str, outputs: Sequence[str] = ("",), out_dir: Path | None = None,
              batch_id: str | None = None) -> str:
        """Start a batch of ``inputs`` (their sizes and mtimes are read by the writer,
        not by the caller). Returns its id at once."""
        batch_id = batch_id or new_batch_id()
        paths = [str(p) for p in inputs]
        self._put("begin", batch_id, time.time(), source, endpoint, dict(spec), paths,
                  tuple(outputs), None if out_dir is None else str(out_dir))
        return batch_id

    def record_done(self, batch_id: str, index: int, *, key: str | None, url: str | None,
                    expires_at: datetime | str | None, instance_id: str | None = None,
                    saved_path: Path | str | None = None, output: str = "",
                    hash_path: Path | None = None, format: str | None = None,
                    width: int | None = None, height: int | None = None,
                    bytes: int | None = None) -> None:
        """An output is done. ``hash_path``: the input file, hashed by the writer (its
        bytes were just read, so they come from the page cache). ``format``, ``width``,
        ``height`` and ``bytes`` are the result's, shown again when the batch is resumed
        or looked at later."""
        self._put("done", batch_id, index, output, key, url, _iso(expires_at), instance_id,
                  None if saved_path is None else str(saved_path),
                  None if hash_path is None else str(hash_path), format, width, height,
                  bytes)

    def record_failed(self, batch_id: str, index: int, error: str, output: str = "") -> None:
        self._put("failed", batch_id, index, output, error)

    def record_saved(self, batch_id: str, index: int, saved_path: Path | str,
                     output: str = "") -> None:
        self._put("saved", batch_id, index, output, str(saved_path))

    def record_identity(self, batch_id: str, index: int, path: Path) -> None:
        """The input was re-sent after it changed: remember what it looks like now."""
        self._put("identity", batch_id, index, str(path))

    def set_state(self, batch_id: str, state: BatchState) -> None:
        self._put("state", batch_id, str(state))

    def finish(self, batch_id: str) -> None:
        self.set_state(batch_id, BatchState.FINISHED)

    def delete(self, batch_ids: Iterable[str]) -> None:
        self._put("delete", tuple(batch_ids))

    def clear(self, *, keep_unfinished: bool = True) -> None:
        self._put("clear", keep_unfinished)

    def prune(self, days: int, now: float | None = None) -> None:
        """Delete the batches done with and last active more than ``days`` ago (0: none);
        queued, so the caller does not wait (``flush()`` to wait for it)."""
        if days > 0:
            self._put("prune", days, time.time() if now is None else now)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(_Op("flush", (), done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _put(self, kind: str, *args: Any) -> None:
        if self._closed:
            log.warning("journal closed: %s record dropped", kind)
            return
        self._queue.put(_Op(kind, args))

    def _run(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                ops = [first]
                # whatever else is queued goes into the same transaction
                while len(ops) < MAX_OPS_PER_COMMIT:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is None:
                        self._queue.put(None)  # stop after this transaction
                        break
                    ops.append(nxt)
                self._write(conn, ops)
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        waiting = [op.done for op in ops if op.done is not None]
        work = [op for op in ops if op.done is None]
        if work:
            self._transaction(conn, work)
        # A long prune goes on in transactions of its own, each releasing the lock for
        # the other process; a flush queued behind it waits for all of it.
        while self._more_prune is not None:
            more, self._more_prune = self._more_prune, None
            self._transaction(conn, [_Op("prune", more)])
        for event in waiting:
            event.set()

    def _transaction(self, conn: sqlite3.Connection, work: list[_Op]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in work:
                getattr(self, "_do_" + op.kind)(conn, *op.args)
            conn.execute("COMMIT")
            self.stats.commits += 1
            self.stats.ops += len(work)
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._more_prune = None  # what was not pruned is pruned at the next start
            # the batch goes on without its journal; the app and the CLI say so
            log.error("batch journal %s: cannot write (%s)", self.path, exc)
            self.stats.failures.append(str(exc))

    # ------------------------------------------------------------------ the writer's ops
    def _do_begin(self, conn: sqlite3.Connection, batch_id: str, created: float, source: str,
                  endpoint: str, spec: dict[str, Any], paths: list[str],
                  outputs: tuple[str, ...], out_dir: str | None) -> None:
        conn.execute(
            "INSERT INTO batches (id, created_at, updated_at, source, endpoint, spec, "
            "spec_key, inputs_key, outputs, out_dir, state, total) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (batch_id, created, created, source, endpoint, canonical_json(spec),
             spec_key(spec), inputs_key(paths), json.dumps(list(outputs)), out_dir,
             str(BatchState.RUNNING), len(paths)))
        rows = []
        for index, path in enumerate(paths):
            ident = identity_of(Path(path))
            rows.append((batch_id, index, path, ident.size, ident.mtime_ns))
        conn.executemany("INSERT INTO inputs (batch_id, idx, path, size, mtime_ns) "
                         "VALUES (?, ?, ?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO outputs (batch_id, idx, output, state, updated_at) "
            "VALUES (?, ?, ?, 'pending', ?)",
            ((batch_id, index, name, created) for index in range(len(paths))
             for name in outputs))

    def _touch(self, conn: sqlite3.Connection, batch_id: str) -> None:
        conn.execute("UPDATE batches SET updated_at = ? WHERE id = ?", (time.time(), batch_id))

    def _do_done(self, conn: sqlite3.Connection, batch_id: str, index: int, output: str,
                 key: str | None, url: str | None, expires_at: str | None,
                 instance_id: str | None, saved_path: str | None,
                 hash_path: str | None, fmt: str | None, width: int | None = None,
                 height: int | None = None, size: int | None = None) -> None:
        conn.execute(
            "UPDATE outputs SET state = 'done', error = NULL, key = ?, url = ?, "
            "expires_at = ?, instance_id = ?, saved_path = COALESCE(?, saved_path), "
            "format = ?, width = ?, height = ?, bytes = ?, updated_at = ? "
            "WHERE batch_id = ? AND idx = ? AND output = ?",
            (key, url, expires_at, instance_id, saved_path, fmt, width, height, size,
             time.time(), batch_id, index, output))
        if hash_path is not None:
            digest = content_hash(Path(hash_path))
            self.stats.hashed += 1
            conn.execute("UPDATE inputs SET hash = ? WHERE batch_id = ? AND idx = ?",
                         (digest, batch_id, index))
        self._touch(conn, batch_id)

    def _do_failed(self, conn: sqlite3.Connection, batch_id: str, index: int, output: str,
                   error: str) -> None:
        conn.execute(
            "UPDATE outputs SET state = 'failed', error = ?, updated_at = ? "
            "WHERE batch_id = ? AND idx = ? AND output = ?",
            (error, time.time(), batch_id, index, output))
        self._touch(conn, batch_id)

    def _do_saved(self, conn: sqlite3.Connection, batch_id: str, index: int, output: str,
                  saved_path: str) -> None:
        conn.execute("UPDATE outputs SET saved_path = ? WHERE batch_id = ? AND idx = ? "
                     "AND output = ?", (saved_path, batch_id, index, output))

    def _do_identity(self, conn: sqlite3.Connection, batch_id: str, index: int,
                     path: str) -> None:
        ident = identity_of(Path(path))
        conn.execute("UPDATE inputs SET size = ?, mtime_ns = ?, hash = NULL "
                     "WHERE batch_id = ? AND idx = ?", (ident.size, ident.mtime_ns, batch_id,
                                                        index))

    def _do_state(self, conn: sqlite3.Connection, batch_id: str, state: str) -> None:
        conn.execute("UPDATE batches SET state = ?, updated_at = ? WHERE id = ?",
                     (state, time.time(), batch_id))

    def _do_delete(self, conn: sqlite3.Connection, batch_ids: tuple[str, ...]) -> None:
        conn.executemany("DELETE FROM batches WHERE id = ?", ((b,) for b in batch_ids))

    def _do_prune(self, conn: sqlite3.Connection, days: int, now: float) -> None:
        cutoff = prune_cutoff(now, days)
        if cutoff is None:
            return
        # only the old batches are read; their not-done count (one index range each)
        # only for those not finished
        old = conn.execute("SELECT id, state, updated_at, total FROM batches "
                           "WHERE updated_at < ? ORDER BY updated_at", (cutoff,)).fetchall()
        rows = []
        for row in old:
            state = BatchState(row["state"])
            not_done = 0 if state is BatchState.FINISHED else conn.execute(
                "SELECT COUNT(*) FROM outputs WHERE batch_id = ? AND state != 'done'",
                (row["id"],)).fetchone()[0]
            rows.append(RetentionRow(row["id"], state, row["updated_at"], not_done))
        doomed = batches_to_prune(rows, now, days)
        if not doomed:
            return
        sizes = {row["id"]: row["total"] for row in old}
        chunk, images = [], 0
        for batch_id in doomed:
            if chunk and images + sizes[batch_id] > PRUNE_IMAGES_PER_COMMIT:
                break
            chunk.append(batch_id)
            images += sizes[batch_id]
        # their inputs and outputs go with them (ON DELETE CASCADE)
        conn.executemany("DELETE FROM batches WHERE id = ?", ((b,) for b in chunk))
        self.stats.pruned += len(chunk)
        log.info("batch journal: pruned %d batches last active over %d days ago",
                 len(chunk), days)
        if len(chunk) < len(doomed):
            self._more_prune = (days, now)  # the rest after this transaction commits

    def _do_clear(self, conn: sqlite3.Connection, keep_unfinished: bool) -> None:
        if keep_unfinished:
            conn.execute("DELETE FROM batches WHERE state = 'finished'")
        else:
            conn.execute("DELETE FROM batches")

    # ------------------------------------------------------------------ reading
    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        conn = _connect(self.path)
        try:
            yield conn
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the batch journal {self.path}: {exc}") from exc
        finally:
            conn.close()

    def count_batches(self) -> int:
        with self._reader() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0])

    def list_batches(self, offset: int = 0, limit: int = 50, *,
                     unfinished_only: bool = False) -> list[BatchSummary]:
        """Newest first, one page (the counts come from an index per batch shown)."""
        where = "WHERE state != 'finished'" if unfinished_only else ""
        with self._reader() as conn:
            rows = conn.execute(
                f"SELECT * FROM batches {where} ORDER BY created_at DESC, id DESC "
                "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            summaries = [self._summary(conn, row) for row in rows]
        if unfinished_only:
            summaries = [s for s in summaries if s.pending > 0]
        return summaries

    def batch(self, batch_id: str) -> BatchSummary | None:
        with self._reader() as conn:
            row = conn.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else self._summary(conn, row)

    def find_resumable(self, spec: Mapping[str, Any], inputs: Sequence[Path]) -> str | None:
        """The newest unfinished batch with this spec and these inputs (in this order)."""
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT id FROM batches WHERE spec_key = ? AND inputs_key = ? "
                "AND state != 'finished' ORDER BY created_at DESC",
                (spec_key(spec), inputs_key(str(p) for p in inputs))).fetchall()
        return rows[0]["id"] if rows else None

    def inputs(self, batch_id: str, offset: int = 0,
               limit: int | None = None) -> list[InputRecord]:
        with self._reader() as conn:
            page = "" if limit is None else f" LIMIT {int(limit)} OFFSET {int(offset)}"
            rows = conn.execute(
                "SELECT * FROM inputs WHERE batch_id = ? ORDER BY idx" + page,
                (batch_id,)).fetchall()
            if not rows:
                return []
            low, high = rows[0]["idx"], rows[-1]["idx"]
            outs: dict[int, list[OutputRecord]] = {}
            for o in conn.execute(
                    "SELECT * FROM outputs WHERE batch_id = ? AND idx BETWEEN ? AND ? "
                    "ORDER BY idx, output", (batch_id, low, high)):
                outs.setdefault(o["idx"], []).append(OutputRecord(
                    o["output"], ItemState(o["state"]), o["error"], o["key"], o["url"],
                    _when(o["expires_at"]), o["instance_id"], o["saved_path"], o["format"],
                    o["width"], o["height"], o["bytes"]))
        return [InputRecord(r["idx"], Path(r["path"]), Identity(r["size"], r["mtime_ns"]),
                            r["hash"], tuple(outs.get(r["idx"], ()))) for r in rows]

    @staticmethod
    def _summary(conn: sqlite3.Connection, row: sqlite3.Row) -> BatchSummary:
        outputs = tuple(json.loads(row["outputs"]))
        per_image = max(1, len(outputs))
        counts = dict(conn.execute(
            "SELECT state, COUNT(*) FROM outputs WHERE batch_id = ? GROUP BY state",
            (row["id"],)).fetchall())
        links = conn.execute(
            "SELECT COUNT(url), MIN(expires_at), MAX(expires_at), MIN(url) FROM outputs "
            "WHERE batch_id = ? AND url IS NOT NULL", (row["id"],)).fetchone()
        if per_image == 1:
            done, failed = counts.get("done", 0), counts.get("failed", 0)
        else:  # an image is done when all of its outputs are
            done = conn.execute(
                "SELECT COUNT(*) FROM (SELECT idx FROM outputs WHERE batch_id = ? "
                "GROUP BY idx HAVING SUM(state != 'done') = 0)", (row["id"],)).fetchone()[0]
            failed = conn.execute(
                "SELECT COUNT(DISTINCT idx) FROM outputs WHERE batch_id = ? "
                "AND state = 'failed'", (row["id"],)).fetchone()[0]
        return BatchSummary(
            id=row["id"],
            created_at=datetime.fromtimestamp(row["created_at"], UTC),
            updated_at=datetime.fromtimestamp(row["updated_at"], UTC),
            source=row["source"], endpoint=row["endpoint"], spec=json.loads(row["spec"]),
            outputs=outputs, out_dir=row["out_dir"], state=BatchState(row["state"]),
            total=row["total"], done=done, failed=failed, links=links[0],
            first_expiry=_when(links[1]), last_expiry=_when(links[2]), sample_link=links[3])
