"""What the Process view's buttons do: adding and removing images, the pipeline, runs
with per-image progress, cancel and retry, the debounced quick preview, and the result
actions (copy link, open, save). It owns the batch; the app supplies the worker, the
connection, dialogs and messages.

Runs on the Tk main thread; every network, file or image step is a coroutine handed to
the app's worker, whose outcome comes back as a callback on this thread. A run is one
dispatcher on the worker loop; its per-image events are coalesced (``gui.run_events``)
and the list redraws its visible rows at most once per ``LIST_REFRESH_MS``, so the UI's
work does not grow with the number of images.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from gui.client import ClientError, ProcessResult
from gui.connection import Connected
from gui.host import ProcessHost
from gui.imagecheck import check_headers
from gui.links import LOCAL_ONLY, is_loopback_link
from gui.naming import (
    SaveOutcome,
    save_result,
    save_summary,
    save_to_path,
)
from gui.output_rules import (
    OutputNaming,
    PlannedName,
    explain_preview,
    parse_template,
    plan_batch_names,
    preview_lines,
)
from gui.preview import downscaled_bytes, load_for_preview, open_image
from gui.recipe_controller import RecipeController, outputs_summary
from gui.run_events import Outcome, Progress, RunEvents
from gui.settings import save_settings
from gui.thumbnails import Thumbnails
from gui.viewmodel.batch import (
    Batch,
    ImageJob,
    JobStatus,
    Overall,
    StaleChoice,
    not_images_text,
    order_depends_on_state,
    order_ids,
    stale_choice,
    stale_question,
)
from gui.viewmodel.errors import describe_error, describe_os_error
from gui.viewmodel.formatting import (
    expand_paths_in_folders,
    format_elapsed,
    format_expiry,
    parse_path_list,
)
from gui.viewmodel.requests import (
    ProcessRequest,
    RequestStep,
    build_request,
    describe_request,
    output_requests,
    recipe_request,
    result_filename,
    runs_text,
)
from gui.views.widgets import ERROR, MUTED

if TYPE_CHECKING:
    from gui.journal_controller import Resumable
    from gui.views.process import ProcessView

PREVIEW_DEBOUNCE_MS = 300
PREVIEW_SIDE = 1024  # the before/after images kept per result (the full file stays on disk)
PREVIEW_LINK_TTL_S = 600  # a quick preview's link only lives while the app looks at it
LIST_REFRESH_MS = 80  # the list and the overall bar are redrawn at most this often
ADD_CHUNK = 2000  # files header-checked (worker thread) and listed per UI callback
FIRST_ADD_CHUNK = 200  # the first chunk: its rows show within a few tens of milliseconds
ORDER_REFRESH_S = 1.0  # during a run, rows sorted or filtered by state move this often
NAMES_SHOWN = 4  # names in the preview under Output


def output_namings(request: ProcessRequest, template: str,
                   result_format: str | None = None) -> list[OutputNaming]:
    """How an image's results made by ``request`` are named: a recipe's outputs by their
    templates, a single result by the settings' template."""
    if request.outputs:
        return [OutputNaming(parse_template(out.template), out.label, out.format, out.name,
                             request.recipe) for out in request.outputs]
    return [OutputNaming(parse_template(template), request.label,
                         request.format or result_format)]


def _save_in(folder: Path, planned: PlannedName, data: bytes, policy: str) -> SaveOutcome:
    """Save one result under ``folder``, in its mirrored sub-folder (made if missing)."""
    target = folder / planned.folder if planned.folder else folder
    target.mkdir(parents=True, exist_ok=True)
    return save_result(target, planned.candidates(), data, policy, planned.natural())


def plan_save_names(jobs: list[ImageJob], current: ProcessRequest | None,
                    template: str) -> list[list[PlannedName]]:
    """Names for the listed images (input order): those with a result by the request
    they were made with, the others by ``current``. The name preview and Save all both
    call this, over the same images, so the numbering (``-2``) is the same in both."""
    inputs = []
    for job in jobs:
        request = job.made_with if job.result is not None and job.made_with else current
        fmt = job.result.format if job.result is not None else None
        namings = output_namings(request, template, fmt) if request is not None else []
        inputs.append((job.path.name, job.folder, namings))
    planned = plan_batch_names(inputs)
    # a done image's names are complete: its results say their size and format
    for job, row in zip(jobs, planned, strict=True):
        if job.result is not None and job.made_with is not None:
            results = [info for _name, info in job.outputs] or [job.result]
            row[:] = [item.with_result(info.width, info.height, info.format)
                      for item, info in zip(row, results, strict=True)]
    return planned


@dataclass(frozen=True)
class JobOutput:
    """The selected image's result, decoded for the before/after view (only the selected
    image has one: results of the others are their link and facts in the batch)."""

    result: ProcessResult
    data: bytes
    before: Image.Image
    after: Image.Image


def _decode_pair(path: Path, data: bytes) -> tuple[Image.Image, Image.Image]:
    before = load_for_preview(path, PREVIEW_SIDE)
    after = open_image(data, name=f"result of {path.name}")
    after.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return before, after


def chunk_bounds(count: int, first: int, rest: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the chunks files are checked and listed in: a small first one,
    so the first rows show at once, then larger ones."""
    bounds, start = [], 0
    while start < count:
        end = min(count, start + (first if start == 0 else rest))
        bounds.append((start, end))
        start = end
    return bounds


def _some(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


@dataclass(frozen=True)
class PendingSave:
    """A Save all waiting for its stale results to be re-run."""

    folder: Path
    job_ids: frozenset[int]


class ProcessController:
    """The Process view's controller; see the module docstring."""

    def __init__(self, app: ProcessHost) -> None:
        self.app = app
        self.batch = Batch()
        self.pipeline: list[RequestStep] = []
        self.selected: int | None = None
        self.previews_shown = 0
        self.saved_paths: list[Path] = []
        self.shown_result: int | None = None  # whose result the before/after view shows
        # the selected image only: its preview copy, and its decoded result
        self._outputs: dict[int, JobOutput] = {}
        self._originals: dict[int, Image.Image] = {}
        self._unreadable: set[int] = set()  # the server may still read what Pillow cannot
        self._requests: dict[int, ProcessRequest] = {}
        self._runs: set[Any] = set()  # futures of the dispatchers feeding the fleet
        self._events = RunEvents()
        self._preview_future: Any = None
        self._selection_future: Any = None
        self._preview_seq = 0
        self.shown_preview_request: ProcessRequest | None = None
        self._slots: asyncio.Semaphore | None = None
        self._concurrency = 4
        self._sort = ("added", "all")
        self._order_stale = False
        self._order_refreshed = 0.0
        self._list_dirty = False
        self.in_flight = 0  # requests on their way (counted on the worker thread)
        self.thumbs = Thumbnails(self.app.submit, self._thumbnail_ready,
                                 self._image_unreadable)
        self._pending_save: PendingSave | None = None
        self.save_outcomes: list[SaveOutcome] = []
        self.recipes = RecipeController(app, self.params_changed)
        self.names_preview: list[str] = []  # the first names Save all would write
        self._names_seq = 0
        self.names_shown_seq = 0  # which planning the preview shows (tests wait for it)

    @property
    def view(self) -> ProcessView:
        return self.app.process_view

    def result_bytes(self, job_id: int) -> bytes | None:
        """The downloaded result of an image (what Save writes), if it is still held."""
        output = self._outputs.get(job_id)
        return output.data if output is not None else None

    @property
    def preview_busy(self) -> bool:
        """A quick preview request is on its way."""
        return self._preview_future is not None and not self._preview_future.done()

    def images_loaded(self) -> bool:
        """The rows on screen have their thumbnails and the selected image its preview
        copy (or failed to): the rest are loaded when they come on screen."""
        visible = self.view.image_list.visible_ids()
        return all(self.thumbs.resolved(job_id) for job_id in visible) and (
            self.selected is None or self.selected in self._originals
            or self.selected in self._outputs or self.selected in self._unreadable)

    def on_connected(self, connected: Connected, concurrency: int) -> None:
        # the semaphore binds to the worker's loop on first use, not here
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self.view.set_operations(connected.operations)
        self.view.set_ready(bool(connected.operations))
        self.view.set_on_conflict(self.app.settings.on_conflict)
        self.recipes.on_connected()
        self.params_changed()  # the "Runs:" line, stale marks and the selected preview

    # ------------------------------------------------------------------ the list
    def job_of(self, job_id: int) -> ImageJob | None:
        return self.batch.get(job_id)

    def thumbnail_of(self, job_id: int) -> Any:
        job = self.batch.get(job_id)
        return None if job is None else self.thumbs.get(job_id, job.path)

    def rows_shown(self, job_ids: list[int]) -> None:
        self.thumbs.want(job_ids)

    def _thumbnail_ready(self, _job_id: int) -> None:
        self._mark_list_dirty()

    def list_order_changed(self, sort_key: str, state_filter: str) -> None:
        self._sort = (sort_key, state_filter)
        self._reorder()

    def _reorder(self) -> None:
        """Recompute the list's order (O(n log n)): on add/remove, a sort or filter
        change, and at most every ORDER_REFRESH_S during a run when the order depends
        on the images' states."""
        self._order_stale = False
        self._order_refreshed = time.monotonic()
        self.view.image_list.set_order(order_ids(self.batch.jobs, *self._sort))

    def _mark_list_dirty(self) -> None:
        """Coalesce redraws: whatever happened, the visible rows and the overall bar are
        redrawn once per LIST_REFRESH_MS at most."""
        if self._list_dirty:
            return
        self._list_dirty = True
        self.app.schedule("list-refresh", LIST_REFRESH_MS, self._refresh_list)

    def _refresh_list(self) -> None:
        self._list_dirty = False
        if self._order_stale and (not self.batch.running or time.monotonic()
                                  - self._order_refreshed >= ORDER_REFRESH_S):
            self._reorder()
        elif self._order_stale:
            self._mark_list_dirty()  # come back for the order once its time is up
        self.view.image_list.refresh()
        self._update_overall()

    def flush_list(self) -> None:
        """Redraw now (a run ended, or a user action wants its effect on screen)."""
        self.app.unschedule("list-refresh")
        self._list_dirty = False
        if self._order_stale:
            self._reorder()
        self.view.image_list.refresh()
        self._update_overall()

    # ------------------------------------------------------------------ images
    def add_files_dialog(self) -> None:
        paths = self.app.dialogs.ask_open_files()
        if paths:
            self.add_images(paths)

    def add_folder_dialog(self) -> None:
        folder = self.app.dialogs.ask_directory("Add all images of a folder")
        if folder:
            self.add_images([folder])

    def paste_paths(self) -> None:
        text = self.app.clipboard_text()
        if text is None:
            self.app.show_error("The clipboard holds no text to read paths from.")
            return
        paths = parse_path_list(text)
        if not paths:
            self.app.show_error("The clipboard holds no file paths.")
            return
        self.add_images(paths)

    def add_images(self, paths: Iterable[str | Path]) -> None:
        """Add files and folders (what the file dialog, a drop and a paste all call).
        Folder listing and the header check run on the worker thread, chunk by chunk;
        thumbnails come as rows show."""
        recursive = self.view.include_subfolders()  # folders: with their sub-folders?
        self.app.submit(asyncio.to_thread(
            lambda: expand_paths_in_folders(list(paths), recursive=recursive)),
            self._add_expanded)

    def _add_expanded(self, expanded: tuple[list[Path], dict[Path, str],
                                            list[tuple[str, str]]]) -> None:
        files, folders, missing = expanded
        chunks = chunk_bounds(len(files), FIRST_ADD_CHUNK, ADD_CHUNK)
        self._check_chunk(files, chunks, list(missing), [], folders)

    def _check_chunk(self, files: list[Path], chunks: list[tuple[int, int]],
                     problems: list[tuple[str, str]], marked: list[ImageJob],
                     folders: dict[Path, str] | None = None) -> None:
        """Header-check the next chunk on the worker thread, then list it: a file is
        listed only once it is checked, so one that is not an image is never uploaded,
        and a folder of 10,000 shows its first rows before the rest are read."""
        if not chunks:
            self._added_all(problems, marked)
            return
        (start, end), rest = chunks[0], chunks[1:]
        part = files[start:end]
        self.app.submit(asyncio.to_thread(check_headers, part),
                        lambda not_images: self._add_chunk(part, not_images, rest, files,
                                                           problems, marked, folders))

    def _add_chunk(self, part: list[Path], not_images: dict[Path, str],
                   rest: list[tuple[int, int]], files: list[Path],
                   problems: list[tuple[str, str]], marked: list[ImageJob],
                   folders: dict[Path, str] | None = None) -> None:
        """List one checked chunk (one UI callback, a few tens of milliseconds at most).
        Files that failed the header check are listed as "not an image"."""
        outcome = self.batch.add(part, not_images, folders)
        problems.extend(outcome.skipped)
        for job in outcome.added:
            if job.status == JobStatus.NOT_IMAGE:
                self._unreadable.add(job.id)  # no thumbnail or preview to make
                marked.append(job)
        if outcome.added:
            self._reorder()
        self.view.set_count(len(self.batch))
        if outcome.added and self.selected is None:
            self.select_image(outcome.added[0].id)
        self._check_chunk(files, rest, problems, marked, folders)

    def _added_all(self, problems: list[tuple[str, str]], marked: list[ImageJob]) -> None:
        self._update_names()
        if marked:
            self.app.show_error(not_images_text(marked))
        if problems:
            shown = "; ".join(f"{Path(p).name}: {why}" for p, why in problems[:4])
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            self.app.show_error(f"Skipped {len(problems)}: {shown}{more}")

    def _image_unreadable(self, job_id: int, exc: BaseException) -> None:
        job = self.batch.get(job_id)
        if job is not None and job_id not in self._unreadable:
            self._unreadable.add(job_id)
            self.app.show_error(describe_error(exc))
        self._mark_list_dirty()

    def remove_image(self, job_id: int) -> None:
        if not self.batch.remove(job_id):
            self.app.show_error("This image is being processed; cancel or wait before removing it.")
            return
        for store in (self._outputs, self._originals, self._requests):
            store.pop(job_id, None)
        self.app.journal.forget(job_id)
        self._unreadable.discard(job_id)
        self.thumbs.drop(job_id)
        self._reorder()
        self.view.set_count(len(self.batch))
        self._update_overall()
        if not self.batch.running:
            self.view.set_running(False)
        if self.selected == job_id:
            self.selected = None
            order = self.view.image_list.order
            if order:
                self.select_image(order[0])
            else:
                self.view.set_selected(None)
                self.view.show_images(None, None)
                self.view.show_result(None, "", "")

    def select_image(self, job_id: int) -> None:
        job = self.batch.get(job_id)
        if job is None:
            return
        self.selected = job_id
        self.view.set_selected(job_id)
        # only the selected image's pixels are kept: drop the previous one's
        for store in (self._outputs, self._originals):
            for other in [k for k in store if k != job_id]:
                del store[other]
        self._show_selected()
        if self._wants_preview(job_id):
            self.params_changed()

    def _wants_preview(self, job_id: int) -> bool:
        """A processed image shows its result, unless that was made with other settings
        (then the preview shows what Process all would make now); others get a quick
        preview."""
        job = self.batch.get(job_id)
        return job is not None and job.status != JobStatus.NOT_IMAGE and (
            job.result is None or job.stale)

    def _show_selected(self) -> None:
        job = self.batch.get(self.selected) if self.selected is not None else None
        if job is None:
            return
        output = self._outputs.get(job.id)
        self.shown_result = None
        if job.status == JobStatus.NOT_IMAGE:
            self.view.show_images(None, None, f"{job.name}: {job.message}", problem=True)
        elif (output is not None and job.result is not None and output.result == job.result
              and not job.stale):
            self.shown_result = job.id
            self.view.show_images(output.before, output.after,
                                  f"{job.name}: original and processed result")
        elif job.result is not None and not job.stale:
            self.view.show_images(self._originals.get(job.id), None,
                                  f"{job.name}: loading the result…")
            self._load_selected(job, with_result=True)
        else:
            self.view.show_images(self._originals.get(job.id), None, f"{job.name}: original")
            if job.id not in self._originals and job.id not in self._unreadable:
                self._load_selected(job, with_result=False)
        self._show_result_info(job)

    def _load_selected(self, job: ImageJob, *, with_result: bool) -> None:
        """Decode the selected image (and download and decode its result) on demand."""
        if self._selection_future is not None:
            self._selection_future.cancel()
        job_id, path, result = job.id, job.path, job.result
        client = self.app.connection.client

        async def load() -> tuple[Image.Image, JobOutput | None]:
            if with_result and result is not None:
                data = await client.download(result.url, expected_bytes=result.bytes,
                                             name=path.name)
                before, after = await asyncio.to_thread(_decode_pair, path, data)
                return before, JobOutput(result, data, before, after)
            return await asyncio.to_thread(load_for_preview, path, PREVIEW_SIDE), None

        def loaded(pair: tuple[Image.Image, JobOutput | None]) -> None:
            if self.selected != job_id or self.batch.get(job_id) is None:
                return
            original, output = pair
            self._originals = {job_id: original}
            if output is not None:
                self._outputs = {job_id: output}
            self._show_selected()
            if output is None:
                self.params_changed()

        def failed(exc: BaseException) -> None:
            if self.selected != job_id:
                return
            if not with_result:
                self._image_unreadable(job_id, exc)
            self.view.preview_caption.configure(
                text=f"Cannot show {path.name}: {describe_error(exc, self.app.endpoint_text())}",
                text_color=ERROR)

        self._selection_future = self.app.submit(load(), loaded, failed)

    def _show_result_info(self, job: ImageJob) -> None:
        r = job.result
        if r is None:
            # the whole message (the row shows a shortened one), wrapped by the panel
            full = job.message if job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE) \
                else "Not processed yet."
            self.view.show_result(job.name, full, "")
            return
        size_kb = r.bytes / 1024
        meta = (f"Instance {r.instance_id} · {format_elapsed(r.elapsed_s)} · "
                f"{r.width}×{r.height} {r.format.upper()} · {size_kb:,.0f} KB"
                + (" · cached" if r.cached else ""))
        if job.outputs:
            meta += "\nOutputs: " + outputs_summary(dict(job.outputs)) + " (Copy link copies all)"
        if job.stale and job.made_with is not None:
            meta += ("\nStale: made with " + describe_request(job.made_with, self._titles())
                     + "; the current settings make another result.")
        if is_loopback_link(r.url):
            meta += f"\nLink: {LOCAL_ONLY} (set an S3 bucket in the settings to share it)"
        self.view.show_result(job.name, meta,
                                      format_expiry(r.expires_at, datetime.now(UTC)), r.url)

    def refresh_expiry(self) -> None:
        job = self.batch.get(self.selected) if self.selected is not None else None
        if job is not None and job.result is not None:
            self.view.expiry_label.configure(
                text=format_expiry(job.result.expires_at, datetime.now(UTC)))

    # ------------------------------------------------------------------ pipeline
    def _titles(self) -> dict[str, str]:
        return {op.name: op.title for op in (self.app.connected.operations if self.app.connected
                                              else [])}

    def add_step(self) -> None:
        op = self.view.current_operation()
        if op is None:
            self.app.show_error("Choose an operation first.")
            return
        try:
            params = self.view.current_params()
        except ValueError as exc:
            self.app.show_error(f"Fix the parameters first: {exc}")
            return
        self.pipeline.append(RequestStep(op, params))
        self.view.set_pipeline(self.pipeline, self._titles())
        # the step is in the pipeline now: editing it further would run it twice
        self.view.clear_operation()
        self.params_changed()

    def remove_step(self, index: int) -> None:
        if 0 <= index < len(self.pipeline):
            del self.pipeline[index]
            self.view.set_pipeline(self.pipeline, self._titles())
            self.params_changed()

    def clear_pipeline(self) -> None:
        self.pipeline.clear()
        self.view.set_pipeline(self.pipeline, self._titles())
        self.params_changed()

    def current_request(self, *, preview: bool = False) -> ProcessRequest:
        """The one request both the quick preview and Process all send: the pipeline
        plus the step being edited (the operation picked above it, if any), so what the
        preview shows is what runs. ``preview`` changes nothing; it stays for callers
        that say which use they mean. Raises ValueError."""
        del preview
        if self.recipes.active is not None:  # the recipe bar's pick wins over the editor
            return recipe_request(self.recipes.active, self.app.settings.link_ttl_s)
        op = self.view.current_operation()
        params = self.view.current_params() if op else {}
        pipeline = list(self.pipeline)
        if pipeline and op:
            pipeline.append(RequestStep(op, params))
        return build_request(operation=op, params=params, pipeline=pipeline,
                             output_format=self.view.output_format(),
                             quality=self.view.quality(),
                             expires_in=self.app.settings.link_ttl_s,
                             output=self.view.output_settings())

    # ------------------------------------------------------------------ running
    def process_all(self) -> None:
        if self.app.connected is None:
            self.app.show_error("Not connected yet: wait for the fleet, or check Settings.")
            return
        try:
            request = self.current_request()
        except ValueError as exc:
            self.app.show_error(str(exc))
            return
        self._mark_stale(request)
        started = self.batch.start()
        if not started:
            not_images = sum(1 for job in self.batch.jobs if job.status == JobStatus.NOT_IMAGE)
            self.app.show_error(
                "Add images first." if not len(self.batch) else
                "Nothing to process: the files in the list are not images." if
                not_images == len(self.batch) else "Every image is already being processed.")
            return
        self._launch(started, request)

    def retry_image(self, job_id: int) -> None:
        if self.app.connected is None:
            self.app.show_error("Not connected.")
            return
        request = self._requests.get(job_id)
        if request is None:
            try:
                request = self.current_request()
            except ValueError as exc:
                self.app.show_error(str(exc))
                return
        started = self.batch.start([job_id])
        if started:
            self._launch(started, request)

    def _launch(self, jobs: list[ImageJob], request: ProcessRequest) -> None:
        """Hand the images to one dispatcher on the worker loop: ``concurrency`` lanes
        take them in order, so nothing per image waits for the UI thread."""
        for job in jobs:
            self._requests[job.id] = request
        self.batch.outputs_per_image = len(request.outputs) or 1
        self.app.journal.run_started(jobs, request)  # queued: the journal's thread writes
        items = [(job.id, job.ticket, job.path) for job in jobs]
        future = self.app.submit(self._dispatch(items, request, self.app.endpoint_text()),
                                 lambda _none: None, self.app.report_error)
        if future is not None:
            self._runs.add(future)
            # the done callback runs on the worker thread: forget the future on the UI's
            future.add_done_callback(
                lambda done: self.app.worker.post(lambda: self._runs.discard(done)))
        self.view.set_running(True)
        self._order_stale = order_depends_on_state(*self._sort)
        self._mark_list_dirty()

    def resume_batch(self, found: Resumable, *, rerun: bool = False) -> None:
        """List a journaled batch's images and run what it still needs with the batch's
        own request: done and unchanged images are listed as done and not sent again
        (``rerun``: all are sent, as a new batch). Images already listed are reused."""
        from gui.journal_controller import outputs_of, result_of  # the journal's side

        if self.batch.running:
            self.app.show_error("Wait for the run to finish (or cancel it) before resuming "
                                "a batch.")
            return
        plan, request = found.plan, found.request
        missing = set(plan.missing)
        records = [r for r in found.inputs if r.index not in missing]
        added = self.batch.add([r.path for r in records])
        ids = self.batch.find(r.path for r in records)
        index_of = {ids[r.path]: r.index for r in records if r.path in ids}
        keep, send = set(plan.keep), set(plan.send)
        for record in records:
            job_id = ids.get(record.path)
            result = result_of(record) if record.index in keep else None
            if job_id is not None and result is not None:
                self.batch.restore(job_id, result, request.label, request, outputs_of(record))
                self._requests[job_id] = request
        if not rerun:
            self.app.journal.adopt(found.summary.id, request, index_of)
        self.show_request(request)  # the screen says what the batch runs
        if added.added:
            self._reorder()
            self.view.set_count(len(self.batch))
            if self.selected is None:
                self.select_image(added.added[0].id)
        if plan.changed:
            names = [found.inputs[i].path.name for i, _why in plan.changed]
            self.app.show_notice(f"Changed since the batch ran, so sent again ({len(names)}): "
                                 + _some(names) + ".", key="resume-changed")
        if missing:
            gone = [found.inputs[i].path.name for i in sorted(missing)]
            self.app.show_error(f"Gone since the batch ran, so not sent ({len(gone)}): "
                                + _some(gone) + ".")
        started = self.batch.start([job_id for job_id, index in index_of.items()
                                    if index in send])
        self.flush_list()
        if started:
            self._launch(started, request)
            verb = "Re-running" if rerun else "Resuming"
            self.app.show_info(f"{verb} the batch ({describe_request(request, self._titles())}):"
                               f" {len(keep)} done before, sending {len(started)}.")
        else:
            self.app.journal.run_ended(cancelled=False)
            self.app.show_info(f"Every image of the batch was done: {len(keep)} listed with "
                               "their results.")

    def show_request(self, request: ProcessRequest) -> None:
        """Put a request's operation (or pipeline), parameters and output on screen, so
        what the view shows is what a resumed batch runs (and its results are not
        stale against other settings)."""
        view = self.view
        operations = {op.name for op in (self.app.connected.operations
                                         if self.app.connected else [])}
        if request.steps:
            self.pipeline = list(request.steps)
            view.clear_operation()
        else:
            self.pipeline = []
            if request.operation in operations:
                view.select_operation(request.operation)
                controls = view.param_controls()
                for name, value in (request.params or {}).items():
                    if name in controls:
                        controls[name].set(value)
        view.set_pipeline(self.pipeline, self._titles())
        view.format_var.set(request.format or "original")
        if request.quality is not None:
            view.quality_slider.set(request.quality)
            view.quality_label.configure(text=str(request.quality))
        self.batch.current = self._current_or(request)
        self.params_changed()

    def _current_or(self, request: ProcessRequest) -> ProcessRequest:
        try:
            return self.current_request()
        except ValueError:
            return request

    def _still_wanted(self, job_id: int, ticket: int) -> bool:
        # read on the worker thread: a dict lookup of a frozen job is safe there, and
        # an image removed or cancelled after it was queued is never sent
        job = self.batch.get(job_id)
        return job is not None and job.ticket == ticket and job.status == JobStatus.QUEUED

    def _report(self, *, progress: Progress | None = None,
                outcome: Outcome | None = None) -> None:
        """From the worker thread: record the event; wake the UI once per batch of them."""
        wake = (self._events.put_progress(progress) if progress is not None
                else self._events.put_outcome(outcome) if outcome is not None else False)
        if wake:
            self.app.worker.post(self._apply_events)

    async def _dispatch(self, items: list[tuple[int, int, Path]], request: ProcessRequest,
                        endpoint: str) -> None:
        """On the worker loop: run the images, ``concurrency`` at a time. Cancelling this
        stops the requests in flight and leaves the waiting images unsent."""
        assert self._slots is not None
        client = self.app.connection.client
        waiting = deque(items)
        requests = output_requests(request)  # one per output of a recipe

        async def lane() -> None:
            while waiting:
                job_id, ticket, path = waiting.popleft()
                if not self._still_wanted(job_id, ticket):
                    continue

                def progress(event: Any, job_id: int = job_id, ticket: int = ticket) -> None:
                    if event.phase in ("done", "failed"):
                        return  # the outcome below says it
                    self._report(progress=Progress(job_id, ticket, event.phase,
                                                   event.fraction, event.message))

                results: list[tuple[str, ProcessResult]] = []
                async with self._slots:
                    self.in_flight += 1
                    try:
                        for output, kwargs in requests:
                            result = await client.process(path, **kwargs, progress=progress,
                                                          name=path.name)
                            results.append((output.name if output else "", result))
                    except (ClientError, OSError, ValueError) as exc:  # that image's alone
                        failed = requests[len(results)][0]
                        prefix = f"output {failed.name}: " if failed is not None else ""
                        self._report(outcome=Outcome(
                            job_id, ticket, error=prefix + describe_error(exc, endpoint)))
                        continue
                    finally:
                        self.in_flight -= 1
                self._report(outcome=Outcome(
                    job_id, ticket, results[0][1], label=request.label, request=request,
                    outputs=tuple(results) if request.outputs else ()))

        lanes = [asyncio.create_task(lane()) for _ in range(max(1, self._concurrency))]
        try:
            await asyncio.gather(*lanes)
        finally:
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    def _apply_events(self) -> None:
        """On the UI thread: apply everything the run reported since the last time to the
        batch (cheap, per event), then redraw at most once per frame (not per event)."""
        progress, outcomes = self._events.take()
        for event in progress:
            self.batch.progress(event.job_id, event.ticket, event.phase, event.fraction,
                                event.message)
        selected_finished = False
        for outcome in outcomes:
            if outcome.result is not None:
                job = self.batch.finish(outcome.job_id, outcome.ticket, outcome.result,
                                        outcome.label, outcome.request, outcome.outputs)
            else:
                job = self.batch.fail(outcome.job_id, outcome.ticket, outcome.error)
            if job is not None:
                self.app.journal.job_finished(job)
            if job is not None and job.id == self.selected:
                selected_finished = True
        if progress or outcomes:
            self._order_stale = self._order_stale or order_depends_on_state(*self._sort)
            self._mark_list_dirty()
        if selected_finished:
            job = self.batch.get(self.selected) if self.selected is not None else None
            if job is not None:
                self._preview_seq += 1  # the full result replaces any preview on its way
                self._show_selected()
        if outcomes and not self.batch.running:
            self._run_finished()

    def _run_finished(self) -> None:
        self.app.journal.run_ended(cancelled=False)
        self.flush_list()
        self.view.set_running(False)
        self._update_names()  # the results fill in {width}, {height} and {ext}
        overall = self.batch.overall()
        pending, self._pending_save = self._pending_save, None
        if pending is not None:  # a Save all waited for its stale results to be re-run
            self._save_all_to(pending.folder)
            return
        if overall.failed:
            self.app.show_error(f"{overall.failed} of {overall.total} images failed; "
                                "see the messages in the list and use Retry.")
        elif overall.done:
            self.app.show_info(f"Processed {overall.done} image"
                               f"{'s' if overall.done != 1 else ''}.")

    def _update_overall(self) -> Overall:
        overall = self.batch.overall()
        self.view.set_overall(overall)
        return overall

    def cancel_run(self) -> None:
        """Stop the run now: requests in flight are cancelled, waiting images are never
        sent, and what finished keeps its result."""
        if self._pending_save is not None:
            self._pending_save = None  # Cancel stops the save waiting for this run too
            self.app.show_info("Save all cancelled with the run.")
        for future in list(self._runs):
            future.cancel()
        self._runs.clear()
        self._events.take()  # late events of the cancelled requests mean nothing now
        cancelled = self.batch.cancel_run()
        self.app.journal.run_ended(cancelled=True)
        self.flush_list()
        self.view.set_running(False)
        self._update_names()
        overall = self.batch.overall()
        if cancelled:
            self.app.show_info(f"Cancelled: {overall.text}.")

    # ------------------------------------------------------------------ quick preview
    def params_changed(self) -> None:
        """The line saying what runs follows at once; the stale marks and the preview
        are debounced (a burst of slider moves sends one preview request)."""
        try:
            request: ProcessRequest | None = self.current_request()
            problem = ""
        except ValueError as exc:
            request, problem = None, str(exc)
        self.view.set_runs(runs_text(request, problem, self._titles()), problem=bool(problem))
        self.app.schedule("preview", PREVIEW_DEBOUNCE_MS, self._settings_settled)

    def _mark_stale(self, request: ProcessRequest | None) -> None:
        changed = self.batch.set_current(request)
        if changed:
            self._mark_list_dirty()  # one redraw of the visible rows, whatever the count
            if any(job.id == self.selected for job in changed):
                self._show_selected()

    def _settings_settled(self) -> None:
        try:
            request: ProcessRequest | None = self.current_request()
        except ValueError:
            request = None
        self._mark_stale(request)
        self._update_names()
        if self.selected is not None and self._wants_preview(self.selected):
            self._quick_preview()

    def _quick_preview(self) -> None:
        job_id = self.selected
        if self.app.connected is None or job_id is None or job_id not in self._originals:
            return
        try:
            request = self.current_request()
        except ValueError as exc:
            self._preview_seq += 1  # a preview still on its way is for other settings
            self.view.show_images(self._originals[job_id], None,
                                  f"No preview: {exc}", after_text=f"No preview: {exc}",
                                  problem=True)
            return
        if self._preview_future is not None:
            self._preview_future.cancel()
        self._preview_seq += 1
        seq = self._preview_seq
        source = self._originals[job_id]
        self.view.preview_caption.configure(text="Updating quick preview…", text_color=MUTED)

        async def run() -> tuple[Image.Image, Image.Image]:
            data, _fmt = await asyncio.to_thread(downscaled_bytes, source)
            client = self.app.connection.client
            kwargs = {**request.client_kwargs(), "expires_in": PREVIEW_LINK_TTL_S}
            result = await client.process(data, **kwargs, name="preview")
            out = await client.download(result.url, expected_bytes=result.bytes)
            after = await asyncio.to_thread(open_image, out, "preview")
            return source, after

        def shown(pair: tuple[Image.Image, Image.Image]) -> None:
            if seq != self._preview_seq or self.selected != job_id:
                return
            self.previews_shown += 1
            self.shown_preview_request = request
            self.view.show_images(
                pair[0], pair[1],
                f"Quick preview, downscaled to {pair[1].width}×{pair[1].height}, of what "
                "Process all runs (the line above).")

        def failed(exc: BaseException) -> None:
            if seq == self._preview_seq and self.selected == job_id:
                # the old "after" goes: it was made with other settings than these
                reason = describe_error(exc, self.app.endpoint_text())
                self.view.show_images(source, None, "Preview failed: " + reason,
                                      after_text="No preview: " + reason, problem=True)

        self._preview_future = self.app.submit(run(), shown, failed)

    # ------------------------------------------------------------------ recipe bar
    def recipe_picked(self, label: str) -> None:
        self.recipes.picked(label)

    def save_recipe_as(self) -> None:
        self.recipes.save_as(self.current_request, self.app.settings.name_template)

    def rename_recipe(self) -> None:
        self.recipes.rename()

    def delete_recipe(self) -> None:
        self.recipes.delete()

    def import_recipe(self) -> None:
        self.recipes.import_()

    def export_recipe(self) -> None:
        self.recipes.export()

    # ------------------------------------------------------------------ results
    def _selected_done(self) -> ImageJob | None:
        job = self.batch.get(self.selected) if self.selected is not None else None
        if job is None or job.result is None:
            self.app.show_error("Select a processed image first.")
            return None
        return job

    def copy_link(self) -> None:
        job = self._selected_done()
        if job is None or job.result is None:
            return
        # a recipe's image has a link per output: one line each, named
        links = ("\n".join(f"{name}: {info.url}" for name, info in job.outputs)
                 if job.outputs else job.result.url)
        local = f" Opens on {LOCAL_ONLY}." if is_loopback_link(job.result.url) else ""
        self.app.copy_to_clipboard(
            links, f"Link to {job.name} copied. "
            f"{format_expiry(job.result.expires_at, datetime.now(UTC)).capitalize()}." + local)

    def open_link(self) -> None:
        job = self._selected_done()
        if job is not None and job.result is not None:
            self.app.open_in_browser(job.result.url)

    def save_as(self) -> None:
        job = self._selected_done()
        if job is None or job.result is None:
            return
        if job.stale and not self.app.dialogs.confirm(
                "Save a stale result?",
                f"{job.name} was processed with other settings than the current ones. "
                "Save that result anyway?"):
            return
        name = result_filename(job.path, job.label or "result", job.result.format)
        target = self.app.dialogs.ask_save_as(name)
        if target:
            self._save([(job, Path(target))], None)

    def on_conflict_changed(self, value: str) -> None:
        """The Save all conflict setting, kept in the settings file."""
        settings = replace(self.app.settings, on_conflict=value)
        self.app.settings = settings
        self.app.settings_view.set_on_conflict(value)  # one setting, shown in both places

        def not_saved(exc: BaseException) -> None:
            self.app.show_error(describe_os_error(exc, "save settings to")
                                if isinstance(exc, OSError) else str(exc))

        self.app.submit(asyncio.to_thread(save_settings, settings, self.app.config_path),
                        None, not_saved)

    def save_all(self) -> None:
        jobs = self.batch.done_jobs()
        if not jobs:
            self.app.show_error("Nothing to save yet: process some images first.")
            return
        stale = self.batch.stale_jobs()
        choice = StaleChoice.INCLUDE
        if stale:
            choice = stale_choice(self.app.dialogs.ask_yes_no_cancel(
                "Some results are stale", stale_question(len(stale), len(jobs))))
            if choice is StaleChoice.CANCEL:
                return
        folder = self.app.dialogs.ask_directory("Save all results to folder")
        if not folder:
            return
        if choice is StaleChoice.RERUN:
            self._rerun_then_save(stale, Path(folder))
            return
        self._save_all_to(Path(folder))

    def _rerun_then_save(self, stale: list[ImageJob], folder: Path) -> None:
        if self.app.connected is None:
            self.app.show_error("Not connected: cannot re-run the stale results.")
            return
        try:
            request = self.current_request()
        except ValueError as exc:
            self.app.show_error(f"Cannot re-run with the current settings: {exc}")
            return
        started = self.batch.start([job.id for job in stale])
        if not started:  # all of them are already being processed again
            self._pending_save = PendingSave(folder, frozenset())
            return
        self._pending_save = PendingSave(folder, frozenset(job.id for job in started))
        self._launch(started, request)
        self._update_overall()
        self.app.show_info(f"Re-running {len(started)} stale result"
                           f"{'s' if len(started) != 1 else ''}; all results are saved to "
                           f"{folder} when they are done.")

    def _save_all_to(self, folder: Path) -> None:
        if not any(job.result is not None for job in self.batch.done_jobs()):
            self.app.show_error("Nothing to save: no image is done.")
            return
        self._save([], folder)

    # ------------------------------------------------------------------ names
    def settings_changed(self) -> None:
        """The output rules changed in Settings: the menu here and the names follow."""
        self.view.set_on_conflict(self.app.settings.on_conflict)
        self._update_names()

    def _listed(self) -> list[ImageJob]:
        return [job for job in self.batch.jobs if job.status != JobStatus.NOT_IMAGE]

    def _update_names(self) -> None:
        """The first names Save all would write, planned on the worker thread (the plan
        covers every listed image, so its numbering is the one Save all uses)."""
        try:
            request: ProcessRequest | None = self.current_request()
        except ValueError:
            request = None
        jobs = self._listed()  # one list copy; the planning runs off the UI thread
        template = self.app.settings.name_template
        self._names_seq += 1
        seq = self._names_seq

        def plan() -> tuple[list[str], str, int]:
            planned = plan_save_names(jobs, request, template)
            return preview_lines(planned, NAMES_SHOWN), explain_preview(planned), sum(
                len(row) for row in planned)

        def shown(answer: tuple[list[str], str, int]) -> None:
            if seq != self._names_seq:
                return
            names, note, count = answer
            self.names_preview = names
            self.names_shown_seq = seq
            more = f" … ({count} in all)" if count > len(names) else ""
            text = ("Save all names: " + ", ".join(names) + more if names
                    else "Save all names: add images to see them")
            self.view.set_names(text + (f"\n{note}" if note else ""))

        self.app.submit(asyncio.to_thread(plan), shown, lambda _exc: None)

    def _save(self, targets: list[tuple[ImageJob, Any]], folder: Path | None) -> None:
        """Write results off the UI thread; downloads again only if the bytes are gone.

        Save as (no ``folder``): each target is the chosen path. Save all: every result
        of every done image (each output of a recipe's) under the names the preview
        shows, the conflict setting deciding when a name is taken."""
        items = [(job, where, self._outputs.get(job.id)) for job, where in targets]
        policy = self.app.settings.on_conflict
        jobs = self._listed() if folder is not None else []
        current = self.batch.current
        template = self.app.settings.name_template
        client = self.app.connection.client
        cached = {job_id: out.data for job_id, out in self._outputs.items()}
        saved_ids: list[tuple[int, str]] = []  # each outcome's job and output, for the journal

        async def save_all() -> list[SaveOutcome]:
            assert folder is not None
            planned = await asyncio.to_thread(plan_save_names, jobs, current, template)
            outcomes = []
            for job, names in zip(jobs, planned, strict=True):
                if job.status != JobStatus.DONE or job.result is None:
                    continue
                results = list(job.outputs) or [("", job.result)]
                for index, ((output, info), name) in enumerate(zip(results, names,
                                                                   strict=True)):
                    data = cached.get(job.id) if index == 0 else None
                    if data is None:
                        data = await client.download(info.url, expected_bytes=info.bytes)
                    final = name.with_result(info.width, info.height, info.format)
                    outcomes.append(await asyncio.to_thread(
                        _save_in, folder, final, data, policy))
                    saved_ids.append((job.id, output))
            return outcomes

        async def run() -> list[SaveOutcome]:
            if folder is not None:
                return await save_all()
            outcomes = []
            for job, where, output in items:
                data = output.data if output is not None else None
                if data is None and job.result is not None:
                    data = await client.download(job.result.url)
                if data is not None:
                    saved_ids.append((job.id, ""))
                    outcomes.append(await asyncio.to_thread(save_to_path, where, data))
            return outcomes

        def saved(outcomes: list[SaveOutcome]) -> None:
            self.save_outcomes = outcomes
            self.saved_paths = [o.path for o in outcomes if o.saved]
            for (job_id, output), outcome in zip(saved_ids, outcomes, strict=True):
                if outcome.saved:
                    self.app.journal.job_saved(job_id, outcome.path, output)
            if folder is None:
                where = self.saved_paths[0] if self.saved_paths else ""
                self.app.show_info(f"Saved to {where}.")
            else:
                self.app.show_info(save_summary(outcomes, folder))

        def failed(exc: BaseException) -> None:
            if isinstance(exc, OSError):
                self.app.show_error(describe_os_error(exc, "save"))
            else:
                self.app.report_error(exc)

        self.app.submit(run(), saved, failed)
