"""What the Process view's buttons do: adding and removing images, the pipeline, runs
with per-image progress, cancel and retry, the debounced quick preview, and the result
actions (copy link, open, save). It owns the batch; the app supplies the worker, the
connection, dialogs and messages.

Runs on the Tk main thread; every network, file or image step is a coroutine handed to
the app's worker, whose outcome comes back as a callback on this thread.
"""

from __future__ import annotations

import asyncio
import os
import tkinter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from gui.client import ProcessResult
from gui.connection import Connected
from gui.preview import downscaled_bytes, open_image, thumbnail
from gui.viewmodel import (
    Batch,
    ImageJob,
    JobStatus,
    Overall,
    ProcessRequest,
    ResultInfo,
    Step,
    build_request,
    describe_error,
    describe_os_error,
    expand_paths,
    format_elapsed,
    format_expiry,
    parse_path_list,
    result_filename,
)
from gui.views.widgets import ERROR, MUTED

if TYPE_CHECKING:
    from gui.app import ImageFleetApp
    from gui.views.process import ProcessView

PREVIEW_DEBOUNCE_MS = 300
PREVIEW_SIDE = 1024  # the before/after images kept per result (the full file stays on disk)
PREVIEW_LINK_TTL_S = 600  # a quick preview's link only lives while the app looks at it


@dataclass(frozen=True)
class JobOutput:
    result: ProcessResult
    data: bytes
    before: Image.Image
    after: Image.Image


def result_info(result: ProcessResult) -> ResultInfo:
    return ResultInfo(url=result.url, expires_at=result.expires_at,
                      instance_id=result.instance_id, elapsed_s=result.elapsed_s,
                      width=result.width, height=result.height, format=result.format,
                      bytes=result.bytes, cached=result.cached, key=result.key)


def _decode_pair(path: Path, data: bytes) -> tuple[Image.Image, Image.Image]:
    before = open_image(path)
    after = open_image(data, name=f"result of {path.name}")
    for img in (before, after):
        img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    return before, after


def _write_file(path: Path, data: bytes) -> Path:
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # never leave half a file behind on a full disk
        raise
    return path


class ProcessController:
    """The Process view's controller; see the module docstring."""

    def __init__(self, app: ImageFleetApp) -> None:
        self.app = app
        self.batch = Batch()
        self.pipeline: list[Step] = []
        self.selected: int | None = None
        self.previews_shown = 0
        self.saved_paths: list[Path] = []
        self._outputs: dict[int, JobOutput] = {}
        self._originals: dict[int, Image.Image] = {}
        self._unreadable: set[int] = set()  # the server may still read what Pillow cannot
        self._requests: dict[int, ProcessRequest] = {}
        self._futures: dict[int, Any] = {}
        self._preview_future: Any = None
        self._preview_seq = 0
        self._slots: asyncio.Semaphore | None = None

    @property
    def view(self) -> ProcessView:
        return self.app.process_view

    def images_loaded(self) -> bool:
        """Every image in the list has its thumbnail and preview copy (or failed to)."""
        return all(job.id in self._originals or job.id in self._unreadable
                   for job in self.batch.jobs)

    def on_connected(self, connected: Connected, concurrency: int) -> None:
        # the semaphore binds to the worker's loop on first use, not here
        self._slots = asyncio.Semaphore(concurrency)
        self.view.set_operations(connected.operations)
        self.view.set_ready(bool(connected.operations))
        if self.selected is not None and self.selected not in self._outputs:
            self.params_changed()

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
        try:
            text = self.app.clipboard_get()
        except tkinter.TclError:
            self.app.show_error("The clipboard holds no text to read paths from.")
            return
        paths = parse_path_list(text)
        if not paths:
            self.app.show_error("The clipboard holds no file paths.")
            return
        self.add_images(paths)

    def add_images(self, paths: Iterable[str | Path]) -> None:
        """Add files and folders (what the file dialog, a drop and a paste all call).
        Folder listing and thumbnails run on the worker thread."""
        self.app.submit(asyncio.to_thread(expand_paths, list(paths)), self._add_expanded)

    def _add_expanded(self, expanded: tuple[list[Path], list[tuple[str, str]]]) -> None:
        files, missing = expanded
        outcome = self.batch.add(files)
        for job in outcome.added:
            self.view.upsert_job(job)
            self.app.submit(asyncio.to_thread(self._load_original, job.id, job.path),
                        self._original_loaded,
                        lambda exc, job_id=job.id: self._image_unreadable(job_id, exc))
        self.view.set_count(len(self.batch))
        problems = missing + outcome.skipped
        if problems:
            shown = "; ".join(f"{Path(p).name}: {why}" for p, why in problems[:4])
            more = f" (and {len(problems) - 4} more)" if len(problems) > 4 else ""
            self.app.show_error(f"Skipped {len(problems)}: {shown}{more}")
        if outcome.added and self.selected is None:
            self.select_image(outcome.added[0].id)

    @staticmethod
    def _load_original(job_id: int, path: Path) -> tuple[int, Image.Image, Image.Image]:
        img = open_image(path)
        small = img.copy()
        small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
        return job_id, small, thumbnail(img)

    def _original_loaded(self, loaded: tuple[int, Image.Image, Image.Image]) -> None:
        job_id, small, thumb = loaded
        if self.batch.get(job_id) is None:
            return
        self._originals[job_id] = small
        self.view.set_thumbnail(job_id, thumb)
        if self.selected == job_id:
            self._show_selected()
            self.params_changed()

    def _image_unreadable(self, job_id: int, exc: BaseException) -> None:
        job = self.batch.get(job_id)
        if job is not None:
            self._unreadable.add(job_id)
            self.app.show_error(describe_error(exc))

    def remove_image(self, job_id: int) -> None:
        if not self.batch.remove(job_id):
            self.app.show_error("This image is being processed; cancel or wait before removing it.")
            return
        future = self._futures.pop(job_id, None)
        if future is not None:
            future.cancel()
        for store in (self._outputs, self._originals, self._requests):
            store.pop(job_id, None)
        self._unreadable.discard(job_id)
        self.view.remove_job(job_id)
        self.view.set_count(len(self.batch))
        self._update_overall()
        if not self.batch.running:
            self.view.set_running(False)
        if self.selected == job_id:
            self.selected = None
            jobs = self.batch.jobs
            if jobs:
                self.select_image(jobs[0].id)
            else:
                self.view.show_images(None, None)
                self.view.show_result(None, "", "")

    def select_image(self, job_id: int) -> None:
        if self.batch.get(job_id) is None:
            return
        self.selected = job_id
        self.view.set_selected(job_id)
        self._show_selected()
        if job_id not in self._outputs:
            # a processed image shows its result; a new one gets a quick preview
            self.params_changed()

    def _show_selected(self) -> None:
        job = self.batch.get(self.selected) if self.selected is not None else None
        if job is None:
            return
        output = self._outputs.get(job.id)
        if output is not None:
            self.view.show_images(output.before, output.after,
                                          f"{job.name}: original and processed result")
        else:
            self.view.show_images(self._originals.get(job.id), None,
                                          f"{job.name}: original")
        self._show_result_info(job)

    def _show_result_info(self, job: ImageJob) -> None:
        r = job.result
        if r is None:
            self.view.show_result(job.name, job.message if job.status ==
                                          JobStatus.FAILED else "Not processed yet.", "")
            return
        size_kb = r.bytes / 1024
        meta = (f"Instance {r.instance_id} · {format_elapsed(r.elapsed_s)} · "
                f"{r.width}×{r.height} {r.format.upper()} · {size_kb:,.0f} KB"
                + (" · cached" if r.cached else ""))
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
        self.pipeline.append(Step(op, params))
        self.view.set_pipeline(self.pipeline, self._titles())
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
        """The request for Process (or, for a preview, the pipeline plus the step being
        edited, so a parameter change shows its effect). Raises ValueError."""
        op = self.view.current_operation()
        params = self.view.current_params()
        pipeline = list(self.pipeline)
        if preview and pipeline and op:
            pipeline.append(Step(op, params))
        return build_request(operation=op, params=params, pipeline=pipeline,
                             output_format=self.view.output_format(),
                             quality=self.view.quality(),
                             expires_in=self.app.settings.link_ttl_s)

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
        started = self.batch.start()
        if not started:
            self.app.show_error("Add images first." if not len(self.batch)
                            else "Every image is already being processed.")
            return
        for job in started:
            self._launch(job, request)
        self.view.set_running(True)
        self._update_overall()

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
        for job in self.batch.start([job_id]):
            self._launch(job, request)
        self.view.set_running(True)
        self._update_overall()

    def _launch(self, job: ImageJob, request: ProcessRequest) -> None:
        self._requests[job.id] = request
        self.view.upsert_job(job)
        job_id, ticket = job.id, job.ticket
        self._futures[job_id] = self.app.submit(
            self._run_job(job_id, ticket, job.path, request),
            lambda output: self._job_done(job_id, ticket, output, request.label),
            lambda exc: self._job_failed(job_id, ticket, exc))

    async def _run_job(self, job_id: int, ticket: int, path: Path,
                       request: ProcessRequest) -> JobOutput:
        """One image, on the worker loop. Waits for a slot first: cancelling while it
        waits stops it before anything is sent."""
        assert self._slots is not None
        client = self.app.connection.client

        def progress(event: Any) -> None:
            self.app.worker.post(lambda: self._job_progress(job_id, ticket, event))

        async with self._slots:
            result = await client.process(path, **request.client_kwargs(), progress=progress,
                                          name=path.name)
            data = await client.download(result.url, expected_bytes=result.bytes,
                                         progress=progress, name=path.name)
            before, after = await asyncio.to_thread(_decode_pair, path, data)
        return JobOutput(result, data, before, after)

    def _job_progress(self, job_id: int, ticket: int, event: Any) -> None:
        job = self.batch.progress(job_id, ticket, event.phase, event.fraction, event.message)
        if job is not None:
            self.view.upsert_job(job)
            self._update_overall()

    def _job_done(self, job_id: int, ticket: int, output: JobOutput, label: str) -> None:
        job = self.batch.finish(job_id, ticket, result_info(output.result), label)
        if job is None:
            return
        self._outputs[job_id] = output
        self._futures.pop(job_id, None)
        self.view.upsert_job(job)
        if self.selected == job_id:
            self._preview_seq += 1  # the full result replaces any preview still on its way
            self._show_selected()
        self._run_progressed()

    def _job_failed(self, job_id: int, ticket: int, exc: BaseException) -> None:
        job = self.batch.fail(job_id, ticket, describe_error(exc, self.app.endpoint_text()))
        if job is None:
            return
        self._futures.pop(job_id, None)
        self.view.upsert_job(job)
        if self.selected == job_id:
            self._show_result_info(job)
        self._run_progressed()

    def _run_progressed(self) -> None:
        overall = self._update_overall()
        if not self.batch.running:
            self.view.set_running(False)
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
        cancelled = self.batch.cancel_waiting()
        for job in cancelled:
            future = self._futures.pop(job.id, None)
            if future is not None:
                future.cancel()
            self.view.upsert_job(job)
        self._run_progressed()
        if cancelled:
            self.app.show_info(f"Cancelled {len(cancelled)} waiting image"
                           f"{'s' if len(cancelled) != 1 else ''}; those already sent finish.")

    # ------------------------------------------------------------------ quick preview
    def params_changed(self) -> None:
        """Debounced: a burst of slider moves sends one preview request."""
        self.app.schedule("preview", PREVIEW_DEBOUNCE_MS, self._quick_preview)

    def _quick_preview(self) -> None:
        job_id = self.selected
        if self.app.connected is None or job_id is None or job_id not in self._originals:
            return
        try:
            request = self.current_request(preview=True)
        except ValueError:
            return  # the control already shows what is wrong
        if self._preview_future is not None:
            self._preview_future.cancel()
        self._preview_seq += 1
        seq = self._preview_seq
        source = self._originals[job_id]
        self.view.preview_caption.configure(text="Updating quick preview…")

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
            pending = (" · includes the step being edited (not added yet)"
                       if self.pipeline and request.steps and
                       len(request.steps) > len(self.pipeline) else "")
            self.view.show_images(
                pair[0], pair[1],
                f"Quick preview, downscaled to {pair[1].width}×{pair[1].height}: "
                f"{' → '.join(s.op for s in request.steps) if request.steps else request.label}"
                f"{pending}")

        def failed(exc: BaseException) -> None:
            if seq == self._preview_seq:
                self.view.preview_caption.configure(
                    text="Preview failed: " + describe_error(exc, self.app.endpoint_text()),
                    text_color=ERROR)

        self.view.preview_caption.configure(text_color=MUTED)
        self._preview_future = self.app.submit(run(), shown, failed)

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
        self.app.clipboard_clear()
        self.app.clipboard_append(job.result.url)
        self.app.show_info(f"Link to {job.name} copied. "
                       f"{format_expiry(job.result.expires_at, datetime.now(UTC)).capitalize()}.")

    def open_link(self) -> None:
        job = self._selected_done()
        if job is not None and job.result is not None:
            self.app.dialogs.open_url(job.result.url)

    def save_as(self) -> None:
        job = self._selected_done()
        if job is None or job.result is None:
            return
        name = result_filename(job.path, job.label or "result", job.result.format)
        target = self.app.dialogs.ask_save_as(name)
        if target:
            self._save([(job, Path(target))])

    def save_all(self) -> None:
        jobs = self.batch.done_jobs()
        if not jobs:
            self.app.show_error("Nothing to save yet: process some images first.")
            return
        folder = self.app.dialogs.ask_directory("Save all results to folder")
        if not folder:
            return
        targets = [(job, Path(folder) / result_filename(job.path, job.label or "result",
                                                        job.result.format if job.result
                                                        else "png"))
                   for job in jobs]
        self._save(targets)

    def _save(self, targets: list[tuple[ImageJob, Path]]) -> None:
        """Write results off the UI thread; downloads again only if the bytes are gone."""
        items = [(job, path, self._outputs.get(job.id)) for job, path in targets]

        async def run() -> list[Path]:
            written = []
            for job, path, output in items:
                data = output.data if output is not None else None
                if data is None and job.result is not None:
                    data = await self.app.connection.client.download(job.result.url)
                if data is not None:
                    written.append(await asyncio.to_thread(_write_file, path, data))
            return written

        def saved(paths: list[Path]) -> None:
            where = paths[0] if len(paths) == 1 else paths[0].parent if paths else ""
            plural = "s" if len(paths) != 1 else ""
            self.app.show_info(f"Saved {len(paths)} file{plural} to {where}.")
            self.saved_paths = paths

        def failed(exc: BaseException) -> None:
            if isinstance(exc, OSError):
                self.app.show_error(describe_os_error(exc, "save"))
            else:
                self.app.report_error(exc)

        self.app.submit(run(), saved, failed)
