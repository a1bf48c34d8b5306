"""An asyncio event loop on a background thread, for synchronous programs that drive
coroutines: the desktop app (with its own result queue on top) and an embedded local
fleet.

``start`` runs the loop; ``submit`` schedules a coroutine from any thread and returns a
``concurrent.futures.Future``; ``stop`` cancels what is left, runs an optional clean-up
coroutine, shuts the default executor down and joins the thread, so no thread outlives
it. Nothing here imports a GUI toolkit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
START_TIMEOUT_S = 5.0


class BackgroundLoop:
    """Owns one event loop and the daemon thread that runs it; see the module docstring."""

    def __init__(self, name: str = "imagefleet-async") -> None:
        self._name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()
        self._stopping = False

    # -- lifecycle
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the thread; returns once the loop runs (or after ``timeout``)."""
        self._thread.start()
        if not self._started.wait(timeout=timeout):
            log.warning("%s: the event loop did not start within %.0f s", self._name, timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def stop(self, cleanup: Callable[[], Awaitable[Any]] | None = None,
             timeout: float = 30.0) -> None:
        """Cancel every task, run ``cleanup`` (e.g. close a client), shut the default
        executor down and join the thread. Safe to call twice, or without ``start``."""
        if not self._thread.is_alive():
            if self._thread.ident is None and not self._loop.is_closed():
                self._loop.close()  # never started: nothing runs it, nothing else closes it
            return
        self._stopping = True

        async def shutdown() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if cleanup is not None:
                try:
                    await cleanup()
                except Exception:
                    log.exception("%s: clean-up failed while stopping", self._name)
            await self._loop.shutdown_asyncgens()
            await self._loop.shutdown_default_executor()

        future = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        try:
            future.result(timeout=timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            log.error("%s did not shut down within %.0f s", self._name, timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=timeout)

    # -- work
    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop from any thread. Refused (``RuntimeError``, the
        coroutine closed unawaited) once stopping."""
        if self._stopping or self._loop.is_closed():
            if asyncio.iscoroutine(coro):
                coro.close()
            raise RuntimeError(f"{self._name} is stopping")
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)

    def call(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        """``submit`` and wait for the result (its exception is raised here)."""
        return self.submit(coro).result(timeout)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable
