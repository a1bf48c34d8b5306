"""Names of saved results and writing them without clobbering anything.

One rule for the command line (``python -m scripts.process --out DIR``) and the desktop
app (Save all, Save as), so the same inputs get the same names from both:

* a result is ``<stem>.<label>.<ext>`` (``ext`` from the result's format, ``jpg`` for JPEG);
* inputs of one batch sharing a stem (``a/photo.jpg``, ``b/photo.png``): the first in
  input order keeps it, the next ones get ``<stem>-2``, ``<stem>-3``, ... (compared
  case-insensitively, since some file systems are);
* a name already taken in the target folder is handled by the conflict policy:
  ``unique`` (the default) takes the next free ``<stem>-N``, ``overwrite`` replaces the
  file, ``skip`` leaves it and writes nothing.

Writes are atomic (a temporary file in the same folder, then a rename or a hard link),
and in ``unique``/``skip`` mode the final step refuses to replace a file, so a file that
appeared after the folder was looked at is never clobbered either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class OnConflict(StrEnum):
    """What to do when a result's name is already taken in the target folder."""

    UNIQUE = "unique"
    OVERWRITE = "overwrite"
    SKIP = "skip"


ON_CONFLICT_CHOICES = tuple(policy.value for policy in OnConflict)


class SaveAction(StrEnum):
    WRITTEN = "written"  # under its own name
    RENAMED = "renamed"  # under a -N name: its own was taken (in the batch or the folder)
    OVERWRITTEN = "overwritten"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class SaveOutcome:
    path: Path  # where it was written, or the existing file it was skipped for
    action: SaveAction

    @property
    def saved(self) -> bool:
        return self.action != SaveAction.SKIPPED


def output_numbers(inputs: Sequence[Path]) -> list[int]:
    """Which number each input's stem gets, in input order: 1 keeps the stem, later inputs
    sharing it get 2, 3, ... (``<stem>-2``), skipping stems other inputs have of their own."""
    claimed: set[str] = set()
    first: set[int] = set()
    for index, path in enumerate(inputs):
        key = path.stem.lower()
        if key not in claimed:
            claimed.add(key)
            first.add(index)
    numbers = []
    for index, path in enumerate(inputs):
        if index in first:
            numbers.append(1)
            continue
        n = 2
        while f"{path.stem}-{n}".lower() in claimed:
            n += 1
        claimed.add(f"{path.stem}-{n}".lower())
        numbers.append(n)
    return numbers


def numbered(stem: str, n: int) -> str:
    return stem if n == 1 else f"{stem}-{n}"


def output_stems(inputs: Sequence[Path]) -> list[str]:
    """A distinct stem per input (see :func:`output_numbers`)."""
    return [numbered(path.stem, n)
            for path, n in zip(inputs, output_numbers(inputs), strict=True)]


def pipeline_label(operation: str | None, steps: Sequence[Mapping[str, Any]] | None) -> str:
    """``grayscale`` or ``grayscale+gaussian_blur``: the ``<label>`` part of result names."""
    if operation is not None:
        return operation
    return "+".join(str(step["op"]) for step in steps or ())


def extension_for(image_format: str) -> str:
    return {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())


def result_name(stem: str, label: str, image_format: str) -> str:
    return f"{stem}.{label}.{extension_for(image_format)}"


def candidate_names(stem: str, label: str, image_format: str,
                    claimed_stems: Collection[str] = (), start: int = 1) -> Iterator[str]:
    """The result's own name (``stem`` numbered ``start``), then the following numbers
    (endless), leaving out stems other inputs of the batch own (``claimed_stems``, any
    case): saving ``photo`` and ``photo-2`` again gives ``photo-3`` and ``photo-4``."""
    claimed = {s.lower() for s in claimed_stems}
    yield result_name(numbered(stem, start), label, image_format)
    n = max(2, start + 1)
    while True:
        if numbered(stem, n).lower() not in claimed:
            yield result_name(numbered(stem, n), label, image_format)
        n += 1


def batch_candidates(sources: Sequence[Path], labels: Sequence[str],
                     formats: Sequence[str]) -> list[Iterator[str]]:
    """Candidate names for each result of a batch (see :func:`candidate_names`)."""
    numbers = output_numbers(sources)
    stems = output_stems(sources)
    return [candidate_names(source.stem, label, fmt, stems, n)
            for source, n, label, fmt in zip(sources, numbers, labels, formats, strict=True)]


def save_summary(outcomes: Iterable[SaveOutcome], folder: Path | str) -> str:
    """``Saved 4 files to DIR (2 renamed, 1 skipped, 0 overwritten).``"""
    counts = {action: 0 for action in SaveAction}
    for outcome in outcomes:
        counts[outcome.action] += 1
    saved = counts[SaveAction.WRITTEN] + counts[SaveAction.RENAMED] + counts[
        SaveAction.OVERWRITTEN]
    plural = "" if saved == 1 else "s"
    return (f"Saved {saved} file{plural} to {folder} ({counts[SaveAction.RENAMED]} renamed, "
            f"{counts[SaveAction.SKIPPED]} skipped, {counts[SaveAction.OVERWRITTEN]} "
            "overwritten).")


# --------------------------------------------------------------------------- writing


def _temporary(folder: Path, name: str, data: bytes) -> Path:
    """The bytes under a fresh hidden name next to the target (same file system, so the
    final rename or link is atomic)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.part"
        try:
            with open(tmp, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            continue
        except OSError:
            tmp.unlink(missing_ok=True)  # never leave half a file behind on a full disk
            raise
        return tmp


def _place_exclusive(tmp: Path, target: Path, data: bytes) -> bool:
    """Give ``tmp``'s bytes the name ``target`` unless that name exists; False if it does.

    A hard link is atomic and fails on an existing name. File systems without hard links
    (FAT, some network shares) get an exclusive create instead: never clobbers, though
    a reader could see the file while it is written."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                             errno.EMLINK, errno.ENOSYS):
            raise
    try:
        handle = open(target, "xb")  # noqa: SIM115 - closed below, removed on failure
    except FileExistsError:
        return False
    try:
        with handle:
            handle.write(data)
    except OSError:
        target.unlink(missing_ok=True)
        raise
    return True


def save_result(folder: Path, candidates: Iterable[str], data: bytes,
                on_conflict: OnConflict | str = OnConflict.UNIQUE,
                natural: str | None = None) -> SaveOutcome:
    """Write ``data`` into ``folder`` under the first candidate name the policy allows.

    ``natural`` is the result's own name (``<stem>.<label>.<ext>`` of its input): a file
    written under another name (a batch sibling had the stem) counts as renamed.
    Raises OSError (folder missing, disk full, permission); nothing is left behind then.
    """
    policy = OnConflict(on_conflict)
    names = iter(candidates)
    first = next(names)
    tmp = _temporary(folder, first, data)
    try:
        if policy is OnConflict.OVERWRITE:
            target = folder / first
            existed = target.exists()
            os.replace(tmp, target)
            return SaveOutcome(target, SaveAction.OVERWRITTEN if existed else SaveAction.WRITTEN)
        if _place_exclusive(tmp, folder / first, data):
            own = natural is None or natural == first
            return SaveOutcome(folder / first, SaveAction.WRITTEN if own else SaveAction.RENAMED)
        if policy is OnConflict.SKIP:
            return SaveOutcome(folder / first, SaveAction.SKIPPED)
        for name in names:
            if _place_exclusive(tmp, folder / name, data):
                return SaveOutcome(folder / name, SaveAction.RENAMED)
        raise AssertionError("candidate_names is endless")  # pragma: no cover
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_to_path(target: Path, data: bytes) -> SaveOutcome:
    """Save as: the user chose this exact name (the system dialog already asked before
    replacing a file), so it is written atomically and replaces what is there."""
    return save_result(target.parent, [target.name], data, OnConflict.OVERWRITE)
