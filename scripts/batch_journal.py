"""The command line's side of the batch journal (``gui/journal.py``): which batch a run
belongs to, what ``--resume`` sends again, and the records written as images finish.

``python -m scripts.process`` journals every batch. ``--resume`` continues the newest
unfinished batch with the same job spec (operation or steps and their parameters,
format, quality, ``--out`` and ``--on-conflict``) and the same inputs in the same
order: images done then, and unchanged since (size and mtime, or the same content),
are not sent again; their lines are printed from the journal. ``--resume BATCH_ID``
names the batch instead: its spec and inputs are taken from the journal, so the
command line needs only the endpoint.

Each run first prunes the journal: finished batches last active more than 90 days ago
go (``IMAGEFLEET_HISTORY_DAYS`` sets the days, 0 keeps every batch); batches that can
still be resumed stay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gui.journal import (
    DEFAULT_HISTORY_DAYS,
    HISTORY_DAYS_ENV,
    HISTORY_DAYS_RANGE,
    BatchState,
    InputRecord,
    ItemState,
    Journal,
    JournalError,
    journal_path,
    plan_resume,
)

log = logging.getLogger(__name__)

SOURCE = "cli"
BATCH_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{4}$")


def looks_like_batch_id(text: str) -> bool:
    return bool(BATCH_ID.match(text))


def job_spec(*, runs: Sequence[tuple[str, Mapping[str, Any]]], operation: str | None,
             raw_params: Mapping[str, str], steps: Sequence[Mapping[str, Any]] | None,
             recipe: Mapping[str, Any] | None, name_template: str | None,
             folders: Sequence[str], encoder: Mapping[str, Any], format: str | None,
             quality: int | None, out_dir: Path | None, on_conflict: str,
             recursive: bool) -> dict[str, Any]:
    """What makes two runs the same batch (the link lifetime and concurrency do not).

    ``runs``: each output's name and its request's options, as checked against the
    server (typed parameters); the rest is the command line as given, so that
    ``--resume BATCH_ID`` can rebuild it (``scripts.process.apply_stored_batch``)."""
    return {
        "kind": "process",
        "runs": [{"output": name, **dict(options)} for name, options in runs],
        "operation": operation,
        "raw_params": dict(raw_params),
        "steps": [dict(s) for s in steps] if steps is not None else None,
        "recipe": dict(recipe) if recipe is not None else None,
        "name_template": name_template,
        "encoder": dict(encoder),
        "format": format,
        "quality": quality,
        "out": None if out_dir is None else str(out_dir.resolve()),
        "on_conflict": on_conflict,
        "recursive": recursive,
        # the sub-folder -r mirrors each input into; none when nothing is mirrored
        "folders": list(folders) if any(folders) else None,
    }


def history_days(environ: Mapping[str, str] | None = None) -> int:
    """How many days a finished batch stays in the journal: ``IMAGEFLEET_HISTORY_DAYS``
    (empty or unset: 90; 0: for ever). Raises ValueError naming the variable and the
    range allowed."""
    from gui.settings import int_in_range  # the app's rule for the same setting

    raw = (os.environ if environ is None else environ).get(HISTORY_DAYS_ENV, "").strip()
    if not raw:
        return DEFAULT_HISTORY_DAYS
    return int_in_range(HISTORY_DAYS_ENV, raw, *HISTORY_DAYS_RANGE)


def open_journal(stream: TextIO) -> Journal | None:
    """The user's journal; None (and a warning) when it cannot be opened: the batch
    still runs, it only cannot be resumed."""
    try:
        return Journal(journal_path())
    except JournalError as exc:
        print(f"warning: {exc}; this batch cannot be resumed", file=stream)
        return None


@dataclass
class Resumed:
    """The batch this run writes to, and what it need not send."""

    batch_id: str | None
    kept: dict[int, InputRecord] = field(default_factory=dict)  # done before, not sent
    resumed: bool = False

    def send(self, total: int) -> list[int]:
        return [i for i in range(total) if i not in self.kept]


async def prepare(journal: Journal | None, spec: dict[str, Any], inputs: Sequence[Path], *,
                  endpoint: str, out_dir: Path | None, resume: bool, batch_id: str | None,
                  stream: TextIO, outputs: Sequence[str] = ("",),
                  announce: bool = True) -> Resumed:
    """Find the batch to resume (``resume``), or begin a new one; reads the files'
    state on a thread. ``announce``: say the new batch's id at once (in a log; on a
    terminal the summary line says it, so the progress stays one line)."""
    if journal is None:
        return Resumed(None)
    resolved = [p.resolve() for p in inputs]
    found = batch_id
    if found is None and resume:
        found = await asyncio.to_thread(journal.find_resumable, spec, resolved)
        if found is None:
            print("nothing to resume: no unfinished batch with these settings and inputs; "
                  "starting a new one", file=stream)
    if found is None:
        new_id = journal.begin(spec, resolved, endpoint=endpoint, source=SOURCE,
                               outputs=outputs, out_dir=out_dir)
        if announce:
            print(f"batch {new_id} (if it is interrupted, run the same command with "
                  "--resume)", file=stream)
        return Resumed(new_id)
    records = await asyncio.to_thread(journal.inputs, found)
    plan = await asyncio.to_thread(plan_resume, records)
    for line in plan.describe_changed(records):
        print(line, file=stream)
    kept: dict[int, InputRecord] = {}
    for index in plan.keep:
        record = records[index]
        saved = [o.saved_path for o in record.outputs]
        if out_dir is not None and not all(s and Path(s).exists() for s in saved):
            print(f"{record.path}: its saved result is gone from {out_dir}; sending it again",
                  file=stream)
            continue
        kept[index] = record
    for index, _why in plan.changed:
        journal.record_identity(found, index, records[index].path)
    journal.set_state(found, BatchState.RUNNING)
    print(f"resuming batch {found}: {len(kept)} of {len(records)} done before, "
          f"sending {len(records) - len(kept)}", file=stream)
    return Resumed(found, kept, resumed=True)


def kept_lines(source: str, record: InputRecord, with_out: bool, *,
               named: bool = False) -> list[str]:
    """The stdout lines of an image done before the resume, one per output, as they were
    printed then (``named``: a recipe's lines, which name the output)."""
    lines = []
    for out in record.outputs:
        fields = [source, *([out.output] if named else []), out.url or "",
                  out.instance_id or ""]
        if with_out:
            fields.append(out.saved_path or "")
        lines.append("\t".join(fields))
    return lines


def stored_spec(journal: Journal, batch_id: str) -> tuple[dict[str, Any], list[Path]]:
    """A batch's spec and inputs from the journal (``--resume BATCH_ID``); raises
    LookupError naming what is wrong."""
    summary = journal.batch(batch_id)
    if summary is None:
        raise LookupError(f"no batch {batch_id} in the journal {journal.path}")
    if summary.spec.get("kind") != "process":
        raise LookupError(f"batch {batch_id} was not made by this command (its spec is "
                          f"{summary.spec.get('kind', 'unknown')!r}); resume it in the app")
    if not summary.unfinished:
        raise LookupError(f"batch {batch_id} is finished: {summary.done} done, "
                          f"{summary.failed} failed; nothing to resume")
    return summary.spec, [record.path for record in journal.inputs(batch_id)]


def done_state(ok: bool) -> ItemState:
    return ItemState.DONE if ok else ItemState.FAILED
