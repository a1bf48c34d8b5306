"""Keeping a local storage folder within its caps: results and originals past their age
cap go first, then the oldest until the folder is under its size cap.

:func:`plan_cleanup` is the pure decision (entries, caps, clock → keys to delete), tested
with a fake clock; :func:`scan` and :func:`sweep` are the side effects on a folder laid
out by ``server.storage.FolderStorage`` (``results/`` and ``originals/``, each object
with its ``.meta.json``). The local fleet runs :func:`sweep` periodically in its own
process, never on the app's Tk thread.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

AREAS = ("results", "originals")
META_SUFFIX = ".meta.json"


@dataclass(frozen=True)
class Entry:
    """One stored object: ``key`` (path relative to the root), bytes (with its metadata
    file), when it was written, and when it expires (None: no age cap)."""

    key: str
    size: int
    mtime: float
    expires_at: float | None = None


@dataclass(frozen=True)
class Caps:
    max_bytes: int | None = None  # None: no size cap
    max_age_s: float | None = None  # None: no age cap


def plan_cleanup(entries: Iterable[Entry], caps: Caps, now: float) -> list[str]:
    """Keys to delete: expired ones (past ``expires_at`` or older than the age cap), then
    the oldest of the rest until the total is at most the size cap."""
    doomed: list[str] = []
    kept: list[Entry] = []
    for entry in entries:
        expiry = entry.expires_at
        if caps.max_age_s is not None:
            age_limit = entry.mtime + caps.max_age_s
            expiry = age_limit if expiry is None else min(expiry, age_limit)
        if expiry is not None and expiry <= now:
            doomed.append(entry.key)
        else:
            kept.append(entry)
    if caps.max_bytes is not None:
        total = sum(e.size for e in kept)
        for entry in sorted(kept, key=lambda e: (e.mtime, e.key)):
            if total <= caps.max_bytes:
                break
            doomed.append(entry.key)
            total -= entry.size
    return doomed


def scan(root: Path) -> list[Entry]:
    """Every stored object under ``root``'s results and originals folders."""
    entries: list[Entry] = []
    root = Path(root)
    for area in AREAS:
        folder = root / area
        if not folder.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(folder):
            for name in files:
                if name.endswith(META_SUFFIX) or name.startswith("."):
                    continue
                path = Path(dirpath) / name
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                size = stat.st_size
                with contextlib.suppress(FileNotFoundError):
                    size += (path.parent / (name + META_SUFFIX)).stat().st_size
                entries.append(Entry(str(path.relative_to(root)), size, stat.st_mtime))
    return entries


def used_bytes(root: Path) -> int:
    """Bytes the stored results and originals take (for the Settings view)."""
    return sum(e.size for e in scan(root))


def remove(root: Path, keys: Iterable[str]) -> int:
    """Delete objects (and their metadata); returns how many bytes were freed."""
    freed = 0
    for key in keys:
        path = Path(root) / key
        for victim in (path, path.with_name(path.name + META_SUFFIX)):
            with contextlib.suppress(FileNotFoundError):
                freed += victim.stat().st_size
                victim.unlink()
    return freed


def sweep(root: Path, caps: Caps, now: float | None = None) -> tuple[int, int]:
    """Apply the caps to ``root``; returns (objects removed, bytes freed)."""
    keys = plan_cleanup(scan(root), caps, time.time() if now is None else now)
    return len(keys), remove(root, keys)


def clear(root: Path) -> tuple[int, int]:
    """Remove every stored result and original (the Settings view's Clear button)."""
    keys = [e.key for e in scan(root)]
    return len(keys), remove(root, keys)
