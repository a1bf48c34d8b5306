"""List thumbnails, made lazily off the UI thread and kept in a bounded cache.

Only rows that come on screen ask for a thumbnail. Decoding runs on the worker (JPEGs
at a reduced scale, see ``gui.preview.load_thumbnail``), at most ``DECODERS`` at a
time; a request whose row scrolled away before its turn is dropped unread. The cache
keeps ``capacity`` thumbnails (56 px, about 10 KB each); the least recently shown go
first, so memory stays flat however many images are listed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import customtkinter as ctk
from PIL import Image

from gui.list_window import LruCache
from gui.preview import load_thumbnail

CACHE_SIZE = 300
DECODERS = 2  # threads decoding thumbnails: the rest of the CPU stays for the app


class Thumbnails:
    """See the module docstring. ``submit`` is the app's; callbacks run on the UI thread:
    ``on_ready(job_id)`` when a thumbnail arrives, ``on_error(job_id, exc)`` when a file
    cannot be decoded."""

    def __init__(self, submit: Callable[..., Any], on_ready: Callable[[int], None],
                 on_error: Callable[[int, BaseException], None],
                 capacity: int = CACHE_SIZE) -> None:
        self._submit = submit
        self._on_ready = on_ready
        self._on_error = on_error
        self.cache: LruCache[int, ctk.CTkImage] = LruCache(capacity)
        self.unreadable: set[int] = set()
        self._pending: set[int] = set()
        # read by the worker thread to skip rows that scrolled away (replaced whole,
        # never mutated, so the other thread always sees a consistent set)
        self._wanted: frozenset[int] = frozenset()
        self._decoders: asyncio.Semaphore | None = None
        self.decoded = 0  # for tests and the benchmark

    @property
    def pending(self) -> int:
        return len(self._pending)

    def want(self, ids: list[int]) -> None:
        self._wanted = frozenset(ids)

    def resolved(self, job_id: int) -> bool:
        return job_id in self.cache or job_id in self.unreadable

    def get(self, job_id: int, path: Path) -> ctk.CTkImage | None:
        """The thumbnail if cached; otherwise None, and it is requested (once)."""
        image = self.cache.get(job_id)
        if image is not None or job_id in self.unreadable or job_id in self._pending:
            return image
        self._pending.add(job_id)
        self._submit(self._load(job_id, path), self._loaded,
                     lambda exc: self._failed(job_id, exc))
        return None

    def drop(self, job_id: int) -> None:
        self.cache.discard(job_id)
        self.unreadable.discard(job_id)

    async def _load(self, job_id: int, path: Path) -> tuple[int, Image.Image | None]:
        if self._decoders is None:  # made on the worker loop, where it is used
            self._decoders = asyncio.Semaphore(DECODERS)
        async with self._decoders:
            if job_id not in self._wanted:
                return job_id, None  # scrolled away meanwhile: asked again if it returns
            return job_id, await asyncio.to_thread(load_thumbnail, path)

    def _loaded(self, loaded: tuple[int, Image.Image | None]) -> None:
        job_id, image = loaded
        self._pending.discard(job_id)
        if image is None:
            if job_id in self._wanted:  # back on screen while skipped: ask again
                self._on_ready(job_id)
            return
        self.decoded += 1
        self.cache.put(job_id, ctk.CTkImage(light_image=image, size=image.size))
        self._on_ready(job_id)

    def _failed(self, job_id: int, exc: BaseException) -> None:
        self._pending.discard(job_id)
        self.unreadable.add(job_id)
        self._on_error(job_id, exc)
