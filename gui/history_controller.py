"""What the History view's buttons do: page through past batches (newest first), copy a
batch's links, download its results again while the links are valid, resume or re-run
it, clear the finished ones.

A page is ``PAGE_SIZE`` batches read from the journal on the worker thread (the counts
come from an index per batch shown), so the view costs the same with 10 batches or
10,000. Nothing here blocks the Tk thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gui.host import HistoryHost
from gui.journal import BatchSummary, InputRecord, ItemState
from gui.journal_controller import SPEC_KIND, spec_request
from gui.links import LOCAL_ONLY, is_loopback_link
from gui.naming import batch_candidates, save_result, save_summary
from gui.viewmodel.errors import describe_error
from gui.viewmodel.fleet import format_duration
from gui.viewmodel.requests import describe_request, result_filename

PAGE_SIZE = 12


# --------------------------------------------------------------------------- pure text


def spec_text(spec: dict[str, Any]) -> str:
    """``gaussian_blur (ksize=31) · png``, for app and command-line batches alike."""
    try:
        return describe_request(spec_request(spec))
    except (ValueError, KeyError, TypeError):
        return "unknown processing"


def expiry_text(batch: BatchSummary, now: datetime) -> str:
    """How long the batch's links last: all valid, some expired, or all expired."""
    if not batch.links:
        return "no links"
    first, last = batch.first_expiry, batch.last_expiry
    if last is not None and last <= now:
        return "links expired"
    if first is not None and first <= now:
        if last is None:
            return "some links expired"
        rest = format_duration((last - now).total_seconds())
        return f"some links expired; the rest expire in {rest}"
    if first is None:
        return f"{batch.links} links"
    return f"links expire in {format_duration((first - now).total_seconds())}"


def row_text(batch: BatchSummary, now: datetime) -> str:
    when = batch.created_at.astimezone().strftime("%Y-%m-%d %H:%M")
    where = "command line" if batch.source == "cli" else "app"
    counts = f"{batch.done} of {batch.total} done"
    if batch.failed:
        counts += f", {batch.failed} failed"
    state = {"running": "interrupted", "cancelled": "cancelled"}.get(str(batch.state), "")
    if batch.state.value != "finished" and not batch.pending:
        state = ""
    expiry = expiry_text(batch, now)
    if batch.sample_link and is_loopback_link(batch.sample_link):
        expiry += f" ({LOCAL_ONLY})"
    parts = [when, spec_text(batch.spec), counts, expiry, where]
    if state:
        parts.insert(3, state)
    return " · ".join(parts)


def valid_links(inputs: Sequence[InputRecord], now: datetime) -> tuple[list[str], int]:
    """The links still valid, in input order, and how many have expired."""
    links, expired = [], 0
    for record in inputs:
        for out in record.outputs:
            if out.state is not ItemState.DONE or not out.url:
                continue
            if out.expires_at is not None and out.expires_at <= now:
                expired += 1
            else:
                links.append(out.url)
    return links, expired


@dataclass(frozen=True)
class Page:
    batches: list[BatchSummary]
    offset: int
    total: int

    @property
    def text(self) -> str:
        if not self.total:
            return ("No batches yet: every run of Process all (and of the command line) "
                    "is kept here.")
        last = self.offset + len(self.batches)
        return f"Batches {self.offset + 1}–{last} of {self.total}, newest first"


# --------------------------------------------------------------------------- controller


class HistoryController:
    def __init__(self, app: HistoryHost) -> None:
        self.app = app
        self.offset = 0
        self.page: Page | None = None
        self._seq = 0

    @property
    def view(self) -> Any:
        return self.app.history_view

    def shown(self) -> None:
        self.load(self.offset)

    def older(self) -> None:
        if self.page is not None and self.offset + PAGE_SIZE < self.page.total:
            self.load(self.offset + PAGE_SIZE)

    def newer(self) -> None:
        if self.offset > 0:
            self.load(max(0, self.offset - PAGE_SIZE))

    def load(self, offset: int) -> None:
        journal = self.app.journal.journal
        if journal is None:
            self.view.show_page(None, self.app.journal.problem or "Opening the journal…",
                                datetime.now(UTC))
            return
        self._seq += 1
        seq = self._seq

        def read() -> Page:
            total = journal.count_batches()
            start = min(offset, max(0, (total - 1) // PAGE_SIZE * PAGE_SIZE))
            return Page(journal.list_batches(start, PAGE_SIZE), start, total)

        def loaded(page: Page) -> None:
            if seq != self._seq:
                return  # a later page was asked for
            self.page, self.offset = page, page.offset
            self.view.show_page(page, page.text, datetime.now(UTC))

        self.app.submit(asyncio.to_thread(read), loaded)

    def _batch(self, index: int) -> BatchSummary | None:
        if self.page is None or not 0 <= index < len(self.page.batches):
            return None
        return self.page.batches[index]

    def copy_links(self, index: int) -> None:
        batch = self._batch(index)
        journal = self.app.journal.journal
        if batch is None or journal is None:
            return

        def copied(found: tuple[list[str], int]) -> None:
            links, expired = found
            if not links:
                self.app.show_error("No valid link in this batch"
                                    + (f" ({expired} expired)." if expired else "."))
                return
            note = f"{len(links)} link{'s' if len(links) != 1 else ''} copied"
            note += f"; {expired} expired and left out." if expired else "."
            if any(is_loopback_link(link) for link in links):
                note += f" They open on {LOCAL_ONLY}."
            self.app.copy_to_clipboard("\n".join(links), note)

        self.app.submit(asyncio.to_thread(
            lambda: valid_links(journal.inputs(batch.id), datetime.now(UTC))), copied)

    def download(self, index: int) -> None:
        """Download the batch's results again (links still valid) into a folder, named
        as Save all names them, with the Save all conflict setting."""
        batch = self._batch(index)
        journal = self.app.journal.journal
        if batch is None or journal is None:
            return
        folder = self.app.dialogs.ask_directory("Download this batch's results to folder")
        if not folder:
            return
        target = Path(folder)
        policy = self.app.settings.on_conflict
        client = self.app.connection.client
        try:
            request = spec_request(batch.spec)
            label = request.label
            # a recipe's outputs are named by their own labels (w2048, thumb256, …)
            labels = {out.name: out.label for out in request.outputs}
        except ValueError:
            label, labels = "result", {}

        async def run() -> tuple[list[Any], int]:
            inputs = await asyncio.to_thread(journal.inputs, batch.id)
            now = datetime.now(UTC)
            done = [(r, o) for r in inputs for o in r.outputs
                    if o.state is ItemState.DONE and o.url
                    and (o.expires_at is None or o.expires_at > now)]
            expired = sum(1 for r in inputs for o in r.outputs
                          if o.state is ItemState.DONE and o.url and o.expires_at is not None
                          and o.expires_at <= now)
            done_labels = [labels.get(o.output, label) for _, o in done]
            names = batch_candidates([r.path for r, _ in done], done_labels,
                                     [o.format or "png" for _, o in done])
            outcomes = []
            for (record, out), candidates, out_label in zip(done, names, done_labels,
                                                             strict=True):
                data = await client.download(out.url, name=record.path.name)
                natural = result_filename(record.path, out_label, out.format or "png")
                outcomes.append(await asyncio.to_thread(save_result, target, candidates, data,
                                                        policy, natural))
            return outcomes, expired

        def saved(result: tuple[list[Any], int]) -> None:
            outcomes, expired = result
            text = save_summary(outcomes, target) if outcomes else "Nothing downloaded."
            if expired:
                text += f" {expired} expired link{'s' if expired != 1 else ''} left out."
            self.app.show_info(text)

        def failed(exc: BaseException) -> None:
            self.app.show_error("Download failed: " + describe_error(exc,
                                                                     self.app.endpoint_text()))

        self.app.submit(run(), saved, failed)

    def resume(self, index: int, *, rerun: bool = False) -> None:
        batch = self._batch(index)
        if batch is None:
            return
        if batch.spec.get("kind") not in (SPEC_KIND, "process"):
            self.app.show_error("This batch was made by another tool and cannot run here.")
            return
        self.app.show_view("Process")
        self.app.journal.resume(batch.id, rerun=rerun)

    def clear_finished(self) -> None:
        journal = self.app.journal.journal
        if journal is None:
            return
        if not self.app.dialogs.confirm(
                "Clear history?", "Remove every finished batch from the history? Their "
                "results and links are not touched; unfinished batches stay."):
            return

        def cleared(_none: Any) -> None:
            self.app.show_info("Finished batches removed from the history.")
            self.load(0)

        def clear() -> None:
            journal.clear()
            journal.flush()

        self.app.submit(asyncio.to_thread(clear), cleared)
