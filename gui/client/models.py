"""What the client returns: the wire models of :mod:`server.api` (operations, results,
health, the fleet), re-exported, and what is the client's own: jobs, outcomes, progress."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gui.client.errors import ClientError
from server import api
from server.api import (
    FleetEvent,
    FleetInstance,
    FleetState,
    Load,
    OperationSpec,
    ParamSpec,
    ServerHealth,
)

__all__ = [
    "FleetEvent",
    "FleetInstance",
    "FleetState",
    "Job",
    "JobOutcome",
    "Load",
    "OperationSpec",
    "ParamSpec",
    "Phase",
    "ProcessResult",
    "ProgressCallback",
    "ProgressEvent",
    "ServerHealth",
]

log = logging.getLogger(__name__)


class ProcessResult(api.ProcessResult):
    """The answer to ``POST /process`` (:class:`server.api.ProcessResult`) plus what
    this client measured: ``elapsed_s`` is the wall time it spent (all attempts),
    ``attempts`` the number of HTTP attempts made. A relative ``url`` has been joined
    to the endpoint."""

    elapsed_s: float = 0.0
    attempts: int = 1


@dataclass(frozen=True)
class Job:
    """One image to process in a batch; fields as in :meth:`ImageFleetClient.process`.

    ``name`` labels the job in progress events (default: the file name).
    """

    image: bytes | Path
    operation: str | None = None
    params: Mapping[str, Any] | None = None
    steps: tuple[Mapping[str, Any], ...] | list[Mapping[str, Any]] | None = None
    format: str | None = None
    quality: int | None = None
    expires_in: int | None = None
    name: str | None = None
    # Encoder, colour and metadata options (None: the server's default); see process().
    progressive: bool | None = None
    subsampling: str | None = None
    lossless: bool | None = None
    icc: str | None = None
    metadata: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.image.name if isinstance(self.image, Path) else "image"


@dataclass(frozen=True)
class JobOutcome:
    """What became of one job of a batch: ``result`` and/or ``error``.

    ``ok`` is true when nothing failed. ``result`` may be set alongside ``error``
    when processing worked but the download failed. ``data`` holds the downloaded
    bytes when the batch asked for downloads.
    """

    index: int
    job: Job
    result: ProcessResult | None
    error: ClientError | None
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


Phase = Literal["uploading", "processing", "downloading", "retrying", "done", "failed"]


@dataclass(frozen=True)
class ProgressEvent:
    """A step of one job, for progress display.

    ``index``/``name`` identify the job (index 0 for single calls); ``fraction`` is
    the progress within ``phase`` (bytes sent or received; 0 when unknown, 1 at
    ``done``); ``attempt`` is the HTTP attempt (1-based); ``message`` explains
    ``retrying`` (the error and the delay) and ``failed`` (the error). ``busy`` marks
    a ``retrying`` that is back-pressure, not a fault: the server is working and asked
    for time (message ``"server busy, retrying in 1.3 s"``); show it as waiting, not
    as an error.
    """

    index: int
    name: str
    phase: Phase
    fraction: float = 0.0
    attempt: int = 1
    message: str = ""
    busy: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class _Reporter:
    """Sends the progress events of one job to the caller's callback (if any)."""

    callback: ProgressCallback | None
    index: int
    name: str

    def __call__(
        self,
        phase: Phase,
        fraction: float = 0.0,
        attempt: int = 1,
        message: str = "",
        busy: bool = False,
    ) -> None:
        if self.callback is not None:
            self.callback(
                ProgressEvent(self.index, self.name, phase, fraction, attempt, message, busy)
            )

    def retrying(self, attempt: int, delay: float, exc: ClientError, busy: bool) -> None:
        if busy:
            self("retrying", 0.0, attempt, f"server busy, retrying in {delay:.1f} s", busy=True)
        else:
            self("retrying", 0.0, attempt, f"{exc}; attempt {attempt + 1} in {delay:.2f} s")
