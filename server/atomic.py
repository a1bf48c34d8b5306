"""Writing a small file whole or not at all, written once for the whole project.

A temporary file in the target's folder, created with its final mode (so a secret is
never readable by others, not even for a moment), flushed to disk, then renamed over the
target: a crash or a full disk leaves the old file or the new one, never half of one.
No heavy import: the app, the command line and the fleet use it on their start-up paths.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path | str, content: str | bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``content`` (text is UTF-8). ``mode`` defaults to owner-only:
    widen it only for files that hold nothing private."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     mode)
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed or the caller widened it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
