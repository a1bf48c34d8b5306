"""An asyncio loop on a background thread (:class:`server.background.BackgroundLoop`), and
the queue that carries results back to Tk.

Only the Tk main thread may touch widgets. Coroutines run here; when one finishes, its
callback is *posted* to a ``queue.Queue`` and the app's ``after(50, drain)`` runs it on
the main thread. Nothing in this module imports Tk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from server.background import BackgroundLoop

log = logging.getLogger(__name__)

T = TypeVar("T")
UiCallback = Callable[[], None]


class AsyncWorker:
    """Runs coroutines on its own event loop thread; see the module docstring."""

    def __init__(self, name: str = "imagefleet-async") -> None:
        self._background = BackgroundLoop(name)
        self._posted: queue.Queue[UiCallback] = queue.Queue()
        self.callback_failures: list[BaseException] = []  # bugs in UI callbacks, for tests

    # -- lifecycle
    def start(self) -> None:
        self._background.start()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._background.loop

    @property
    def alive(self) -> bool:
        return self._background.alive

    def stop(self, cleanup: Callable[[], Awaitable[Any]] | None = None,
             timeout: float = 30.0) -> None:
        """Cancel every task, run ``cleanup`` (e.g. close the client, stop a fleet), shut
        the default executor down and join the thread, so no thread is left behind."""
        self._background.stop(cleanup, timeout)

    # -- work
    def submit(
        self,
        coro: Awaitable[T],
        on_success: Callable[[T], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> concurrent.futures.Future[T]:
        """Schedule ``coro``; its outcome goes to ``on_success``/``on_error`` on the UI
        thread (via ``drain``). Cancelled work calls neither."""
        future = self._background.submit(coro)

        def done(fut: concurrent.futures.Future[T]) -> None:
            if fut.cancelled():
                return
            exc = fut.exception()
            if exc is None:
                if on_success is not None:
                    result = fut.result()
                    self.post(lambda: on_success(result))
            elif isinstance(exc, asyncio.CancelledError):
                return
            elif on_error is not None:
                self.post(lambda: on_error(exc))
            else:
                log.error("background task failed", exc_info=exc)

        future.add_done_callback(done)
        return future

    def post(self, callback: UiCallback) -> None:
        """Queue a callback for the UI thread; safe from any thread."""
        if not self._background.stopping:
            self._posted.put(callback)

    def drain(self, limit: int = 500) -> int:
        """Run posted callbacks on the calling (UI) thread; returns how many ran.

        ``limit`` keeps one drain short so a flood of progress events never freezes the UI.
        """
        count = 0
        while count < limit:
            try:
                callback = self._posted.get_nowait()
            except queue.Empty:
                break
            count += 1
            try:
                callback()
            except Exception as exc:
                # one broken callback must not stop the queue (or the UI) for the rest
                log.exception("UI callback failed")
                self.callback_failures.append(exc)
        return count
