"""The app's side of the journal (``gui.journal_controller``) without a window: a done
image is recorded with its result's facts, and a resumed batch's done images come back
with their real width, height and size (0 for outputs journaled before the journal kept
them). A fake host runs the worker-thread parts at once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gui.client.models import ProcessResult
from gui.journal import Identity, InputRecord, ItemState, Journal, OutputRecord
from gui.journal_controller import JournalController, Resumable, result_of
from gui.settings import Settings
from gui.viewmodel.batch import ImageJob, JobStatus
from gui.viewmodel.requests import ProcessRequest

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
REQUEST = ProcessRequest("grayscale", {}, None, "png", None, 3600)


def result(n: int) -> ProcessResult:
    return ProcessResult(key=f"k{n}", url=f"http://x/{n}", expires_at=NOW + timedelta(hours=1),
                         instance_id="w1", width=640 + n, height=480 + n, format="webp",
                         bytes=10_000 + n, cached=False, tiles=1, timings_ms={},
                         elapsed_s=0.25)


@dataclass
class FakeProcess:
    resumed: list[Resumable] = field(default_factory=list)

    def resume_batch(self, found: Resumable, *, rerun: bool = False) -> None:
        self.resumed.append(found)


@dataclass
class FakeHost:
    """What JournalController uses of the window; ``submit`` runs the work right away
    on this thread (the real one runs it on the worker thread)."""

    environ: dict[str, str]
    settings: Settings = field(default_factory=Settings)
    closed: bool = False
    connected: Any = True
    process: FakeProcess = field(default_factory=FakeProcess)
    errors: list[str] = field(default_factory=list)
    ready: bool = False

    def submit(self, coro: Coroutine[Any, Any, Any],
               on_success: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> None:
        try:
            value = asyncio.run(coro)
        except Exception as exc:  # handed to on_error, as the app does
            if on_error is None:
                raise
            on_error(exc)
            return
        if on_success is not None:
            on_success(value)

    def endpoint_text(self) -> str:
        return "http://127.0.0.1:1"

    def show_error(self, message: str, **_: Any) -> None:
        self.errors.append(message)

    def show_notice(self, message: str, **_: Any) -> None:
        pass

    def resolve_message(self, key: str) -> None:
        pass

    def journal_ready(self) -> None:
        self.ready = True


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(environ={"IMAGEFLEET_DATA_DIR": str(tmp_path / "data")})


def test_a_resumed_batch_shows_the_real_dimensions(host: FakeHost, tmp_path: Path) -> None:
    sources = []
    for n in range(3):
        path = tmp_path / f"img{n}.png"
        path.write_bytes(b"image %d" % n)
        sources.append(path)
    controller = JournalController(host)  # type: ignore[arg-type]
    controller.start()
    assert host.ready and controller.journal is not None, host.errors
    try:
        jobs = [ImageJob(n, path) for n, path in enumerate(sources)]
        controller.run_started(jobs, REQUEST)
        for job in jobs[:2]:  # two done, the third not yet: the batch is interrupted
            controller.job_finished(replace(job, status=JobStatus.DONE, result=result(job.id)))
        assert controller.journal.flush()

        batch_id = controller.journal.list_batches()[0].id
        controller.resume(batch_id)
        assert host.process.resumed, host.errors  # the fake runs it at once
        found = host.process.resumed[0]
        assert found.plan.keep == (0, 1) and found.plan.send == (2,)
        for index in found.plan.keep:
            restored = result_of(found.inputs[index])
            assert restored is not None
            assert (restored.width, restored.height, restored.bytes, restored.format) == (
                640 + index, 480 + index, 10_000 + index, "webp")
            assert restored.url == f"http://x/{index}"
    finally:
        controller.close()


def test_an_output_journaled_without_facts_shows_them_as_unknown() -> None:
    record = InputRecord(0, Path("a.png"), Identity(1, 1), None,
                         (OutputRecord("", ItemState.DONE, key="k", url="http://x/a",
                                       format="png"),))
    restored = result_of(record)
    assert restored is not None
    assert (restored.width, restored.height, restored.bytes) == (0, 0, 0)  # as before
    assert result_of(InputRecord(1, Path("b.png"), Identity(1, 1), None,
                                 (OutputRecord("", ItemState.PENDING),))) is None



def test_the_app_prunes_its_journal_at_start(host: FakeHost, tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    source.write_bytes(b"image")
    path = Path(host.environ["IMAGEFLEET_DATA_DIR"]) / "journal.sqlite3"
    journal = Journal(path)
    old = journal.begin({"kind": "app-request"}, [source], endpoint="e", source="app")
    recent = journal.begin({"kind": "app-request"}, [source], endpoint="e", source="app")
    for batch in (old, recent):
        journal.record_done(batch, 0, key="k", url="u", expires_at=None)
        journal.finish(batch)
    journal.close()
    with sqlite3.connect(path) as conn:  # its last activity 31 days ago
        conn.execute("UPDATE batches SET updated_at = ? WHERE id = ?",
                     (time.time() - 31 * 86_400, old))
    host.settings = Settings(history_days=30)
    controller = JournalController(host)  # type: ignore[arg-type]
    controller.start()
    try:
        assert controller.journal is not None and controller.journal.flush()
        assert [b.id for b in controller.journal.list_batches()] == [recent]
    finally:
        controller.close()
