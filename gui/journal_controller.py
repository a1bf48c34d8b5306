"""The desktop app's side of the batch journal (``gui.journal``): every run of Process
all is journaled as it goes, and the next start offers to resume an unfinished one.

Runs on the Tk main thread and never waits there: records are queued to the journal's
writer thread, and everything that reads (opening the file, listing batches, looking at
the input files before a resume) runs on the app's worker thread. Per event the work is
one dictionary lookup and one queue put, whatever the size of the batch.

A journal batch is one run: the images Process all started with one request. A retry
of an image with the same request stays in its batch; images run with other settings
start a new batch. Closing the app or a crash leaves a batch "running", which is what
the start-up notice offers to resume; Cancel marks it "cancelled" (the History view
still resumes it on demand).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gui.client.models import ProcessResult
from gui.host import JournalHost
from gui.journal import (
    BatchState,
    BatchSummary,
    InputRecord,
    Journal,
    JournalError,
    OutputRecord,
    ResumePlan,
    journal_path,
    plan_resume,
)
from gui.viewmodel.batch import ImageJob, JobStatus
from gui.viewmodel.requests import (
    OutputSettings,
    ProcessRequest,
    RequestStep,
    RunOutput,
    recipe_request,
)

log = logging.getLogger(__name__)

SOURCE = "app"
SPEC_KIND = "app-request"
RESUME_KEY = "resume"


# --------------------------------------------------------------------------- pure helpers


def request_spec(request: ProcessRequest) -> dict[str, Any]:
    """A request as the journal's job spec (JSON): everything ``spec_request`` needs to
    run it again, a recipe's outputs included."""
    return {
        "kind": SPEC_KIND,
        "operation": request.operation,
        "params": dict(request.params) if request.params is not None else None,
        "steps": [{"op": s.op, "params": dict(s.params)} for s in request.steps]
        if request.steps else None,
        "format": request.format,
        "quality": request.quality,
        "expires_in": request.expires_in,
        "output": asdict(request.output),
        "recipe": request.recipe,
        "outputs": [{"name": o.name, "label": o.label, "template": o.template,
                     "options": dict(o.options), "format": o.format}
                    for o in request.outputs],
    }


def _steps(raw: Iterable[Mapping[str, Any]]) -> tuple[RequestStep, ...]:
    # the app journals {"op", "params"}; the command line {"op", **params}
    return tuple(RequestStep.from_payload(s) for s in raw)


def _cli_request(spec: Mapping[str, Any]) -> ProcessRequest:
    """A batch of ``python -m scripts.process``: its recipe, or its first run's checked
    options (typed parameters) and encoder fields."""
    expires_in = spec.get("expires_in")
    if spec.get("recipe"):
        from gui.recipes import parse_recipe  # pydantic: only when a recipe is resumed

        return recipe_request(parse_recipe(spec["recipe"]), expires_in)
    runs = spec.get("runs") or [{}]
    first = runs[0]
    encoder = {k: v for k, v in (spec.get("encoder") or {}).items()
               if k in OutputSettings.__dataclass_fields__}
    output = OutputSettings(**encoder)
    steps_raw = first.get("steps") or spec.get("steps")
    fmt, quality = first.get("format", spec.get("format")), first.get(
        "quality", spec.get("quality"))
    if steps_raw:
        return ProcessRequest(None, None, _steps(steps_raw), fmt, quality, expires_in,
                              output=output)
    operation = first.get("operation") or spec.get("operation")
    if not operation:
        raise ValueError("the batch's journal entry names no operation")
    params = first.get("params", spec.get("raw_params")) or {}
    return ProcessRequest(operation, dict(params), None, fmt, quality, expires_in,
                          output=output)


def spec_request(spec: Mapping[str, Any]) -> ProcessRequest:
    """The request a journaled batch ran with, from the app's spec or the command
    line's. Raises ValueError."""
    if spec.get("kind") == "process":
        return _cli_request(spec)
    steps = _steps(spec["steps"]) if spec.get("steps") else None
    operation = spec.get("operation")
    if not steps and not operation:
        raise ValueError("the batch's journal entry names no operation")
    outputs = tuple(RunOutput(o["name"], o["label"], o["template"],
                              MappingProxyType(dict(o["options"])), o.get("format"))
                    for o in spec.get("outputs") or ())
    return ProcessRequest(None if steps else operation,
                          None if steps else dict(spec.get("params") or {}), steps,
                          spec.get("format"), spec.get("quality"), spec.get("expires_in"),
                          outputs, spec.get("recipe") or "",
                          OutputSettings(**(spec.get("output") or {})))


def _info(out: OutputRecord | None) -> ProcessResult | None:
    if out is None or out.url is None:
        return None
    # Built without validation: the app's own journal, which keeps the link, its expiry
    # (None when an entry does not say), where it came from and the result's format,
    # dimensions and size; the server's timings and tiling were not journaled and are 0,
    # as are the facts of an output journaled before the journal kept them (NULL).
    return ProcessResult.model_construct(
        key=out.key or "", url=out.url, expires_at=out.expires_at,
        instance_id=out.instance_id or "", width=out.width or 0,
        height=out.height or 0, format=out.format or "png", bytes=out.bytes or 0,
        cached=True, tiles=1, timings_ms={}, elapsed_s=0.0, attempts=1)


def result_of(record: InputRecord) -> ProcessResult | None:
    """A done input's (first) result as the Process view keeps it (facts the journal
    does not have are 0)."""
    return _info(record.outputs[0] if record.outputs else None)


def outputs_of(record: InputRecord) -> tuple[tuple[str, ProcessResult], ...]:
    """A done input's results by output name (a recipe's several outputs)."""
    found = [(out.output, _info(out)) for out in record.outputs if out.output]
    return tuple((name, info) for name, info in found if info is not None)


def notice_text(batch: BatchSummary, others: int, now: datetime) -> str:
    when = batch.created_at.astimezone().strftime("%H:%M" if
                                                  batch.created_at.date() == now.date()
                                                  else "%d %b %H:%M")
    text = (f"An unfinished batch from {when}: {batch.done} of {batch.total} images done, "
            f"{batch.pending} not yet.")
    if others:
        text += f" ({others} more unfinished in History.)"
    return text


@dataclass
class _Open:
    batch_id: str
    request: ProcessRequest
    index_of: dict[int, int] = field(default_factory=dict)  # job id → input index


@dataclass(frozen=True)
class Resumable:
    """What a resume needs, read off the UI thread."""

    summary: BatchSummary
    request: ProcessRequest
    inputs: list[InputRecord]
    plan: ResumePlan


# --------------------------------------------------------------------------- controller


class JournalController:
    """See the module docstring. ``journal`` is None until opened (or when it cannot be:
    then the app says so once and runs without it)."""

    def __init__(self, app: JournalHost) -> None:
        self.app = app
        self.journal: Journal | None = None
        self._opened: Journal | None = None  # set on the worker thread as soon as it opens
        self.problem: str | None = None
        self._open: dict[str, _Open] = {}
        self._where: dict[int, _Open] = {}  # job id → the open batch it runs in
        self.offered: list[str] = []  # batch ids offered for resume at start (tests read it)

    @property
    def path(self) -> Path:
        return journal_path(self.app.environ)

    def start(self) -> None:
        """Open the journal on the worker thread, prune the batches older than the
        ``history_days`` setting (on the journal's writer thread), then offer the newest
        unfinished batch."""
        path = self.path
        days = self.app.settings.history_days  # read here: settings belong to this thread

        def opened(result: tuple[Journal, list[BatchSummary]]) -> None:
            journal, unfinished = result
            if self.app.closed:
                journal.close()
                return
            self.journal = journal
            self._offer(unfinished)
            self.app.journal_ready()

        def failed(exc: BaseException) -> None:
            self.problem = str(exc)
            self.app.show_error(f"{exc}. Batches are not journaled: they cannot be resumed.")

        def open_journal() -> tuple[Journal, list[BatchSummary]]:
            journal = Journal(path)
            self._opened = journal  # close() finds it even if the app closes meanwhile
            journal.prune(days)  # queued: the writer deletes while the app starts
            try:
                batches = journal.list_batches(0, 20, unfinished_only=True)
            except JournalError:
                journal.close()
                raise
            return journal, [b for b in batches if b.source == SOURCE
                             and b.state is BatchState.RUNNING]

        self.app.submit(asyncio.to_thread(open_journal), opened, failed)

    def _offer(self, unfinished: list[BatchSummary]) -> None:
        if not unfinished:
            return
        newest = unfinished[0]
        self.offered = [b.id for b in unfinished]
        self.app.show_notice(notice_text(newest, len(unfinished) - 1, datetime.now().astimezone()),
                             key=RESUME_KEY, action="Resume",
                             on_action=lambda: self.resume(newest.id))

    def close(self) -> None:
        journal = self.journal or self._opened
        if journal is not None:
            journal.close()  # flushes: what finished is on disk before the app ends

    # ------------------------------------------------------------------ recording
    def run_started(self, jobs: Iterable[ImageJob], request: ProcessRequest) -> None:
        """Process all / retry / re-run started ``jobs`` with ``request``."""
        if self.journal is None:
            return
        fresh = []
        for job in jobs:
            where = self._where.get(job.id)
            if where is None or not where.request.same_output(request):
                fresh.append(job)
        if not fresh:
            return
        paths = [job.path for job in fresh]
        batch_id = self.journal.begin(request_spec(request), paths,
                                      endpoint=self.app.endpoint_text(), source=SOURCE,
                                      outputs=[o.name for o in request.outputs] or ("",))
        batch = _Open(batch_id, request, {job.id: i for i, job in enumerate(fresh)})
        self._open[batch_id] = batch
        for job in fresh:
            self._where[job.id] = batch

    def adopt(self, batch_id: str, request: ProcessRequest, index_of: Mapping[int, int]) -> None:
        """A resumed batch: its images (job id → input index) keep writing to it."""
        batch = _Open(batch_id, request, dict(index_of))
        self._open[batch_id] = batch
        for job_id in index_of:
            self._where[job_id] = batch
        if self.journal is not None:
            self.journal.set_state(batch_id, BatchState.RUNNING)

    def job_finished(self, job: ImageJob) -> None:
        where = self._where.get(job.id)
        if self.journal is None or where is None:
            return
        index = where.index_of[job.id]
        if job.status == JobStatus.DONE and job.result is not None:
            # the input is hashed once, with its first output
            results = list(job.outputs) or [("", job.result)]
            for n, (output, r) in enumerate(results):
                self.journal.record_done(where.batch_id, index, key=r.key, url=r.url,
                                         expires_at=r.expires_at, instance_id=r.instance_id,
                                         hash_path=job.path if n == 0 else None,
                                         format=r.format, width=r.width, height=r.height,
                                         bytes=r.bytes, output=output)
        elif job.status == JobStatus.FAILED:
            for output in [o.name for o in where.request.outputs] or [""]:
                self.journal.record_failed(where.batch_id, index, job.message, output)

    def job_saved(self, job_id: int, path: Any, output: str = "") -> None:
        where = self._where.get(job_id)
        if self.journal is not None and where is not None:
            self.journal.record_saved(where.batch_id, where.index_of[job_id], path, output)

    def run_ended(self, *, cancelled: bool) -> None:
        """The run is over: its batches are finished (or cancelled). Their images stay
        mapped, so a later retry with the same settings still updates them."""
        if self.journal is None:
            return
        state = BatchState.CANCELLED if cancelled else BatchState.FINISHED
        for batch_id in list(self._open):
            self.journal.set_state(batch_id, state)
        self._open.clear()

    def forget(self, job_id: int) -> None:
        self._where.pop(job_id, None)

    # ------------------------------------------------------------------ resuming
    def resume(self, batch_id: str, *, rerun: bool = False) -> None:
        """Read the batch and its files on the worker thread, then hand it to the
        Process view: done and unchanged images are listed as done and not sent again
        (``rerun``: every image is sent again, as a new batch)."""
        journal = self.journal
        if journal is None:
            self.app.show_error("The batch journal is not open: " + (self.problem or
                                                                     "still opening"))
            return
        if self.app.connected is None:
            self.app.show_error("Not connected yet: resume once the fleet is ready.",
                                key=RESUME_KEY, action="Resume",
                                on_action=lambda: self.resume(batch_id, rerun=rerun))
            return

        def load() -> Resumable:
            summary = journal.batch(batch_id)
            if summary is None:
                raise LookupError(f"batch {batch_id} is no longer in the journal")
            request = spec_request(summary.spec)
            inputs = journal.inputs(batch_id)
            plan = plan_resume(inputs)
            if rerun:
                plan = ResumePlan((), tuple(i.index for i in inputs
                                            if i.index not in plan.missing), (),
                                  plan.missing)
            return Resumable(summary, request, inputs, plan)

        def loaded(found: Resumable) -> None:
            self.app.resolve_message(RESUME_KEY)
            self.app.process.resume_batch(found, rerun=rerun)

        def failed(exc: BaseException) -> None:
            self.app.show_error(f"Cannot resume batch {batch_id}: {exc}")

        self.app.submit(asyncio.to_thread(load), loaded, failed)
