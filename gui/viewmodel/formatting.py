"""Small formatting and input helpers: elapsed time, expiry, pasted paths and the
image files under folders."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from gui.viewmodel.fleet import format_duration
from server.limits import IMAGE_SUFFIXES


def format_elapsed(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


def format_expiry(expires_at: datetime | None, now: datetime) -> str:
    if expires_at is None:
        return "link does not say when it expires"
    left = (expires_at - now).total_seconds()
    local = expires_at.astimezone().strftime("%Y-%m-%d %H:%M")
    if left <= 0:
        return f"link expired at {local}"
    return f"link expires in {format_duration(left)} ({local})"


def parse_path_list(text: str) -> list[str]:
    """Paths from pasted text or a drop event.

    Accepts one path per line, ``file://`` URIs (as file managers paste them), quoted
    paths, and Tk's drop format where paths with spaces come in braces: ``{/a b.png} /c.png``.
    """
    items: list[str] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            items.extend(a or b for a, b in re.findall(r"\{([^}]*)\}|(\S+)", line))
        elif line.startswith("file://") and " file://" in line:
            items.extend(line.split())
        else:
            items.append(line)
    paths = []
    for raw_item in items:
        item = raw_item.strip().strip("'\"")
        if item.startswith("file://"):
            item = unquote(urlparse(item).path)
        if item:
            paths.append(item)
    return paths


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files stay; folders give their image files (sorted, not recursive); missing paths
    are reported. Paths come back absolute and resolved, so ``Batch.add`` need not touch
    the disk. The only functions here that touch the file system run on the worker
    thread (a folder of 10,000 files takes tens of milliseconds)."""
    found, _folders, missing = expand_paths_in_folders(paths, recursive=False)
    return found, missing


def _walk_images(root: Path) -> Iterator[tuple[Path, str]]:
    """Image files below ``root`` (sorted, hidden files and folders left out), each with
    its sub-folder relative to ``root`` (``"a/b"``)."""
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        relative = Path(current).relative_to(root).as_posix()
        for name in sorted(files):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in \
                    IMAGE_SUFFIXES:
                yield Path(current) / name, "" if relative == "." else relative


def expand_paths_in_folders(paths: Iterable[str | Path], *, recursive: bool
                            ) -> tuple[list[Path], dict[Path, str], list[tuple[str, str]]]:
    """:func:`expand_paths`, with sub-folders when ``recursive``: then the files found
    below a folder come with their sub-folder (``{path: "a/b"}``), which Save all mirrors."""
    found: list[Path] = []
    folders: dict[Path, str] = {}
    missing: list[tuple[str, str]] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and recursive:
            for file, sub in _walk_images(path.resolve()):
                resolved = file.resolve() if file.is_symlink() else file
                found.append(resolved)
                if sub:
                    folders[resolved] = sub
        elif path.is_dir():
            folder = path.resolve()
            with os.scandir(folder) as entries:
                # DirEntry answers is_file() from the directory listing, without a
                # stat per file; only symbolic links need resolving
                names = sorted(
                    (entry.name, entry.is_symlink()) for entry in entries
                    if entry.is_file() and os.path.splitext(entry.name)[1].lower()
                    in IMAGE_SUFFIXES)
            found.extend((folder / name).resolve() if link else folder / name
                         for name, link in names)
        elif path.is_file():
            found.append(path.resolve())
        else:
            missing.append((str(raw), "no such file or folder"))
    return found, folders, missing
