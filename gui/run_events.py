"""Where a run's per-image events wait for the UI thread: progress coalesced per image,
outcomes in order. No Tk.

The worker thread may report thousands of events a second. Each is written here in
O(1) (the latest progress of an image replaces the one before); the UI thread takes
them all at once, at most once per drain, and redraws once for the lot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Progress:
    job_id: int
    ticket: int
    phase: str
    fraction: float
    message: str = ""


@dataclass(frozen=True)
class Outcome:
    job_id: int
    ticket: int
    result: Any = None  # a gui.client.ProcessResult when it worked
    error: str = ""  # what went wrong, for the user, when it did not
    label: str = ""
    request: Any = None  # the ProcessRequest it was made with (stale marks compare it)
    outputs: tuple[tuple[str, Any], ...] = ()  # a recipe's (output name, ProcessResult)s


class RunEvents:
    """See the module docstring. ``put_*`` return True when the inbox was empty, i.e.
    when the caller should wake the UI thread (once per batch of events)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: dict[int, Progress] = {}
        self._outcomes: list[Outcome] = []

    def put_progress(self, event: Progress) -> bool:
        with self._lock:
            was_empty = not self._progress and not self._outcomes
            self._progress[event.job_id] = event
            return was_empty

    def put_outcome(self, outcome: Outcome) -> bool:
        with self._lock:
            was_empty = not self._progress and not self._outcomes
            self._progress.pop(outcome.job_id, None)  # the outcome says it all
            self._outcomes.append(outcome)
            return was_empty

    def take(self) -> tuple[list[Progress], list[Outcome]]:
        with self._lock:
            progress, outcomes = list(self._progress.values()), self._outcomes
            self._progress, self._outcomes = {}, []
            return progress, outcomes
