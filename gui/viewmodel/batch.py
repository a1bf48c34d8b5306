"""The state of a batch of images, its progress arithmetic, and the image list's order,
filter and row texts."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from gui.client.models import ProcessResult
from gui.viewmodel.formatting import format_elapsed
from gui.viewmodel.requests import ProcessRequest
from server.limits import IMAGE_SUFFIXES


class JobStatus(StrEnum):
    READY = "ready"  # added, never run
    QUEUED = "queued"  # part of a run, waiting for a free slot
    UPLOADING = "uploading"
    PROCESSING = "processing"
    RETRYING = "retrying"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NOT_IMAGE = "not an image"  # failed the header check when added: never uploaded


ACTIVE = frozenset({JobStatus.UPLOADING, JobStatus.PROCESSING, JobStatus.RETRYING,
                    JobStatus.DOWNLOADING})
IN_RUN = ACTIVE | {JobStatus.QUEUED}
FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})

# Share of one image's bar given to each phase: uploading is the visible part on a slow
# link, processing is opaque (the server reports nothing until it answers), and the
# final download feeds the preview.
PHASE_SPANS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "queued": (0.0, 0.0),
    "uploading": (0.0, 0.45),
    "processing": (0.45, 0.85),
    "downloading": (0.85, 1.0),
    "done": (1.0, 1.0),
})


def phase_fraction(phase: str, fraction: float) -> float:
    """Position of an image's bar (0..1) for a phase and the fraction within it."""
    low, high = PHASE_SPANS.get(phase, (0.0, 0.0))
    f = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
    return low + (high - low) * f


@dataclass(frozen=True)
class ImageJob:
    id: int
    path: Path
    status: JobStatus = JobStatus.READY
    progress: float = 0.0
    message: str = ""
    ticket: int = 0  # bumped on every (re)start so late events of an older run are ignored
    result: ProcessResult | None = None
    folder: str = ""  # the sub-folder it was found in below a folder added with its sub-folders
    outputs: tuple[tuple[str, ProcessResult], ...] = ()  # a recipe's results, by output name
    label: str = ""  # the request's label when the result was made
    made_with: ProcessRequest | None = None  # the request the result was made with
    stale: bool = False  # done, but the current settings would make another result

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Overall:
    fraction: float
    done: int
    failed: int
    cancelled: int
    active: int
    queued: int
    total: int
    outputs: int = 1  # results per image (a recipe's outputs)

    @property
    def text(self) -> str:
        if not self.total:
            return "No run yet"
        parts = [f"{self.done} of {self.total} done"]
        if self.outputs > 1:
            parts[0] = (f"{self.done} of {self.total} images done ({self.done * self.outputs}"
                        f" of {self.total * self.outputs} results)")
        if self.active:
            parts.append(f"{self.active} running")
        if self.queued:
            parts.append(f"{self.queued} waiting")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        return " · ".join(parts)


@dataclass(frozen=True)
class AddOutcome:
    added: list[ImageJob]
    skipped: list[tuple[str, str]]  # (path, reason)


class Batch:
    """The images in the Process view and where each one is in its run.

    Sized for tens of thousands of images: adding is O(n) once for the files given,
    and the counts behind ``overall()`` and ``running`` are kept up to date on every
    change, so progress events never scan the batch.
    """

    def __init__(self) -> None:
        self._jobs: dict[int, ImageJob] = {}
        self._paths: set[Path] = set()
        self._next_id = 1
        self._run: dict[int, None] = {}  # the current run's members, in start order
        self._counts: dict[JobStatus, int] = dict.fromkeys(JobStatus, 0)  # over the run
        self._filled_milli = 0  # the run's summed bar positions, in 1/1000 of an image
        self._in_run_anywhere = 0  # jobs queued or active, run member or not
        self.version = 0  # bumped on every change: views redraw when it moved
        self.current: ProcessRequest | None = None  # what the settings on screen make
        self.outputs_per_image = 1  # of the current run (a recipe's outputs)

    # -- bookkeeping
    @staticmethod
    def _fill(job: ImageJob) -> int:
        # done and failed count as whole: that part of the run is behind us; cancelled
        # counts as nothing, so after a cancel the bar shows how much was really done
        if job.status in (JobStatus.DONE, JobStatus.FAILED):
            return 1000
        if job.status == JobStatus.CANCELLED:
            return 0
        return round(job.progress * 1000)

    def _set(self, job: ImageJob) -> ImageJob:
        old = self._jobs.get(job.id)
        if old is not None:
            self._untrack(old)
        self._jobs[job.id] = job
        self._track(job)
        self.version += 1
        return job

    def _track(self, job: ImageJob) -> None:
        if job.status in IN_RUN:
            self._in_run_anywhere += 1
        if job.id in self._run:
            self._counts[job.status] += 1
            self._filled_milli += self._fill(job)

    def _untrack(self, job: ImageJob) -> None:
        if job.status in IN_RUN:
            self._in_run_anywhere -= 1
        if job.id in self._run:
            self._counts[job.status] -= 1
            self._filled_milli -= self._fill(job)

    def _new_run(self) -> None:
        self._run = {}
        self._counts = dict.fromkeys(JobStatus, 0)
        self._filled_milli = 0

    def _join_run(self, job_id: int) -> None:
        if job_id not in self._run:
            job = self._jobs[job_id]
            self._untrack(job)
            self._run[job_id] = None
            self._track(job)

    # -- membership
    @property
    def jobs(self) -> list[ImageJob]:
        return list(self._jobs.values())

    def ids(self) -> list[int]:
        """Job ids in the order they were added."""
        return list(self._jobs)

    def get(self, job_id: int) -> ImageJob | None:
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, paths: Iterable[Path],
            not_images: Mapping[Path, str] | None = None,
            folders: Mapping[Path, str] | None = None) -> AddOutcome:
        """Add files (already expanded; resolved when they come from ``expand_paths``).
        ``not_images`` maps paths that failed the header check to why: they are listed
        as such, and never run. ``folders``: the sub-folder each was found in (Save all
        mirrors it)."""
        bad = not_images or {}
        where = folders or {}
        added: list[ImageJob] = []
        skipped: list[tuple[str, str]] = []
        for raw in paths:
            # expand_paths gives absolute, resolved Paths (made on the worker thread):
            # those are taken as they are, which keeps 10,000 files to a few ms here
            path = raw if isinstance(raw, Path) and raw.is_absolute() else Path(
                raw).expanduser().resolve()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(raw), "not an image file (" + ", ".join(
                    sorted(IMAGE_SUFFIXES)) + ")"))
                continue
            if path in self._paths:
                skipped.append((str(raw), "already in the list"))
                continue
            why = bad.get(Path(raw))
            job = (ImageJob(self._next_id, path, folder=where.get(Path(raw), ""))
                   if why is None else
                   ImageJob(self._next_id, path, JobStatus.NOT_IMAGE,
                            message=f"not an image: {why}"))
            self._next_id += 1
            self._jobs[job.id] = job
            self._paths.add(path)
            added.append(job)
        if added:
            self.version += 1
        return AddOutcome(added, skipped)

    def remove(self, job_id: int) -> bool:
        """Remove an image; images being processed stay (cancel first)."""
        job = self._jobs.get(job_id)
        if job is None or job.status in ACTIVE:
            return False
        self._untrack(job)
        del self._jobs[job_id]
        self._paths.discard(job.path)
        self._run.pop(job_id, None)
        self.version += 1
        return True

    # -- runs
    @property
    def running(self) -> bool:
        return self._in_run_anywhere > 0

    def start(self, job_ids: Iterable[int] | None = None) -> list[ImageJob]:
        """Queue images for a run. With no ids: every image not already in a run.
        Starting while a run is going adds to it (a retry does that). An image keeps
        its earlier result until the new one arrives (or the run is cancelled)."""
        ids = list(self._jobs) if job_ids is None else [i for i in job_ids if i in self._jobs]
        started = []
        if not self.running:
            self._new_run()
        for job_id in ids:
            job = self._jobs[job_id]
            if job.status in IN_RUN or job.status == JobStatus.NOT_IMAGE:
                continue
            self._join_run(job_id)
            started.append(self._set(replace(job, status=JobStatus.QUEUED, progress=0.0,
                                             message="", ticket=job.ticket + 1)))
        return started

    def _current(self, job_id: int, ticket: int) -> ImageJob | None:
        job = self._jobs.get(job_id)
        if job is None or job.ticket != ticket or job.status in FINISHED:
            return None
        return job

    def progress(self, job_id: int, ticket: int, phase: str, fraction: float,
                 message: str = "") -> ImageJob | None:
        """Apply a progress event; None when it belongs to an old run or is stale."""
        job = self._current(job_id, ticket)
        if job is None:
            return None
        if phase == "retrying":
            job = replace(job, status=JobStatus.RETRYING, message=message or "retrying…")
        else:
            try:
                status = JobStatus(phase)
            except ValueError:
                return None
            if status in FINISHED:
                return None  # finishing goes through finish()/fail() with the outcome
            # the bar never runs backwards, even when a retry restarts the upload
            job = replace(job, status=status, message=message,
                          progress=max(job.progress, phase_fraction(phase, fraction)))
        return self._set(job)

    def finish(self, job_id: int, ticket: int, result: ProcessResult,
               label: str = "", made_with: ProcessRequest | None = None,
               outputs: tuple[tuple[str, ProcessResult], ...] = ()) -> ImageJob | None:
        job = self._current(job_id, ticket)
        if job is None:
            return None
        return self._set(replace(job, status=JobStatus.DONE, progress=1.0, message="",
                                 result=result, outputs=outputs, label=label,
                                 made_with=made_with,
                                 stale=made_with is not None
                                 and not made_with.same_output(self.current)))

    def restore(self, job_id: int, result: ProcessResult, label: str,
                made_with: ProcessRequest,
                outputs: tuple[tuple[str, ProcessResult], ...] = ()) -> ImageJob | None:
        """A result made before (a resumed batch's done image), outside any run."""
        job = self._jobs.get(job_id)
        if job is None or job.status in IN_RUN:
            return None
        return self._set(replace(job, status=JobStatus.DONE, progress=1.0, message="",
                                 result=result, outputs=outputs, label=label,
                                 made_with=made_with,
                                 stale=self.current is not None
                                 and not made_with.same_output(self.current)))

    def find(self, paths: Iterable[Path]) -> dict[Path, int]:
        """Job ids of the listed ``paths`` (one pass over the list)."""
        wanted = set(paths)
        return {job.path: job.id for job in self._jobs.values() if job.path in wanted}

    def set_current(self, request: ProcessRequest | None) -> list[ImageJob]:
        """The request the settings on screen make now (None while they are invalid:
        then nothing changes). Returns the done images whose stale mark changed.

        One pass over the list per settings change (the caller debounces), comparing a
        small frozen value per image; no widget work."""
        if request is None:
            return []
        self.current = request
        changed = []
        for job in list(self._jobs.values()):
            if job.status != JobStatus.DONE or job.made_with is None:
                continue
            stale = not job.made_with.same_output(request)
            if stale != job.stale:
                marked = replace(job, stale=stale)
                self._set(marked)
                changed.append(marked)
        return changed

    def stale_jobs(self) -> list[ImageJob]:
        return [job for job in self._jobs.values() if job.status == JobStatus.DONE and job.stale]

    def fail(self, job_id: int, ticket: int, message: str) -> ImageJob | None:
        job = self._current(job_id, ticket)
        if job is None:
            return None
        return self._set(replace(job, status=JobStatus.FAILED, message=message, result=None,
                                 outputs=()))

    def _stopped(self, job: ImageJob) -> ImageJob:
        if job.result is not None:  # a re-run that was stopped: the earlier result stands
            return replace(job, status=JobStatus.DONE, progress=1.0, message="")
        return replace(job, status=JobStatus.CANCELLED, message="cancelled")

    def cancel_waiting(self) -> list[ImageJob]:
        """Cancel images that have not started; those already on a server finish."""
        return [self._set(self._stopped(job)) for job in list(self._jobs.values())
                if job.status == JobStatus.QUEUED]

    def cancel_run(self) -> list[ImageJob]:
        """Cancel every image of the run that has not finished, started or not (their
        requests are stopped by the caller). Finished images keep their outcome."""
        return [self._set(self._stopped(job)) for job in list(self._jobs.values())
                if job.status in IN_RUN]

    def overall(self) -> Overall:
        """The run's totals, from the kept counts (no scan)."""
        counts = self._counts
        total = len(self._run)
        return Overall(
            fraction=min(1.0, max(0.0, self._filled_milli / 1000 / total)) if total else 0.0,
            done=counts[JobStatus.DONE],
            failed=counts[JobStatus.FAILED],
            cancelled=counts[JobStatus.CANCELLED],
            active=sum(counts[s] for s in ACTIVE),
            queued=counts[JobStatus.QUEUED],
            total=total,
            outputs=self.outputs_per_image,
        )

    def done_jobs(self) -> list[ImageJob]:
        return [job for job in self._jobs.values() if job.status == JobStatus.DONE]


# --------------------------------------------------------------------------- list order

SORT_KEYS = ("added", "name", "state")
STATE_FILTERS = ("all", "failed", "done", "pending")
# the order of "state": what needs attention first
_STATE_RANK: Mapping[JobStatus, int] = MappingProxyType({
    JobStatus.FAILED: 0, JobStatus.NOT_IMAGE: 0, JobStatus.CANCELLED: 1, JobStatus.RETRYING: 2,
    JobStatus.UPLOADING: 3, JobStatus.PROCESSING: 3, JobStatus.DOWNLOADING: 3,
    JobStatus.QUEUED: 4, JobStatus.READY: 5, JobStatus.DONE: 6,
})
_PENDING = frozenset({JobStatus.READY, JobStatus.CANCELLED}) | IN_RUN


def matches_filter(job: ImageJob, state_filter: str) -> bool:
    """``pending``: not finished yet (never run, cancelled, waiting or running)."""
    if state_filter == "failed":
        return job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE)  # no result to be had
    if state_filter == "done":
        return job.status == JobStatus.DONE
    if state_filter == "pending":
        return job.status in _PENDING
    return True


def order_ids(jobs: Iterable[ImageJob], sort_key: str = "added",
              state_filter: str = "all") -> list[int]:
    """The ids the list shows, in order: filtered by state, sorted stably (ties in the
    order added). O(n log n); callers run it when the order can have changed, not per
    progress event."""
    if sort_key not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}")
    if state_filter not in STATE_FILTERS:
        raise ValueError(f"filter must be one of {', '.join(STATE_FILTERS)}")
    shown = [job for job in jobs if matches_filter(job, state_filter)]
    if sort_key == "name":
        shown.sort(key=lambda job: (job.name.casefold(), job.id))
    elif sort_key == "state":
        shown.sort(key=lambda job: (_STATE_RANK.get(job.status, 9), job.id))
    return [job.id for job in shown]


def order_depends_on_state(sort_key: str, state_filter: str) -> bool:
    """Whether a status change can move rows (then the order is refreshed as runs go)."""
    return sort_key == "state" or state_filter != "all"


ROW_MESSAGE_CHARS = 60  # a row shows this much of an error; the details panel shows all


def short_message(text: str, limit: int = ROW_MESSAGE_CHARS) -> str:
    """One line of at most ``limit`` characters, cut at a word with an ellipsis."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:·") + "…"


def not_images_text(jobs: Sequence[ImageJob], shown: int = 3) -> str:
    """The message when added files fail the header check (listed, never uploaded)."""
    names = "; ".join(f"{job.name} ({job.message.removeprefix('not an image: ')})"
                      for job in jobs[:shown])
    more = f" and {len(jobs) - shown} more" if len(jobs) > shown else ""
    if len(jobs) == 1:
        return f"Not an image, will not be processed: {names}."
    return f"{len(jobs)} files are not images and will not be processed: {names}{more}."


def can_retry(job: ImageJob) -> bool:
    """Whether the row offers Retry: a failed or cancelled run, never a file that is
    not an image (sending it again cannot help)."""
    return job.status in (JobStatus.FAILED, JobStatus.CANCELLED)


def status_text(job: ImageJob) -> str:
    """The row's state line; short enough for a row (errors in full: details_text)."""
    if job.status == JobStatus.DONE and job.result is not None:
        r = job.result
        if job.stale:
            return "done · stale (other settings)"
        cached = " · cached" if r.cached else ""
        return f"{r.width}×{r.height} {r.format} · {format_elapsed(r.elapsed_s)}{cached}"
    if job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE):
        return short_message(job.message or job.status.value)
    if job.status in ACTIVE:
        text = {JobStatus.UPLOADING: "uploading", JobStatus.PROCESSING: "processing",
                JobStatus.DOWNLOADING: "fetching result",
                JobStatus.RETRYING: job.message or "retrying"}[job.status]
        return f"{text} {round(job.progress * 100)}%"
    return {JobStatus.READY: "ready", JobStatus.QUEUED: "waiting",
            JobStatus.CANCELLED: "cancelled"}.get(job.status, job.status.value)


class StaleChoice(StrEnum):
    """What Save all does with results made with other settings than the current ones."""

    RERUN = "rerun"  # process them again with the current settings, then save
    INCLUDE = "include"  # save them as they are
    CANCEL = "cancel"


def stale_choice(answer: bool | None) -> StaleChoice:
    """The Yes / No / Cancel answer to :func:`stale_question`."""
    if answer is None:
        return StaleChoice.CANCEL
    return StaleChoice.RERUN if answer else StaleChoice.INCLUDE


def stale_question(stale: int, done: int) -> str:
    which = "result was" if stale == 1 else "results were"
    return (f"{stale} of {done} {which} made with other settings than the current ones.\n\n"
            "Yes: re-run them with the current settings, then save all.\n"
            "No: save them as they are.\n"
            "Cancel: save nothing.")
