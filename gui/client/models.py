"""What the client returns: operations, results, health, the fleet, jobs and progress."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from gui.client.errors import ClientError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ParamSpec:
    """One parameter of an operation, as ``GET /operations`` describes it.

    ``type`` is ``"int"``, ``"float"``, ``"bool"`` or ``"choice"``; ``min``/``max``
    bound numbers; ``choices`` lists the allowed values of a ``choice``; ``odd`` marks
    integers that must be odd (kernel sizes); ``description`` is help text.
    """

    name: str
    type: str
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    odd: bool = False
    description: str = ""


@dataclass(frozen=True)
class OperationSpec:
    """One operation the servers offer."""

    name: str
    title: str
    description: str
    params: tuple[ParamSpec, ...]
    tileable: bool

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class ProcessResult:
    """The answer to ``POST /process``.

    ``url`` is the (expiring) link to the result, ``expires_at`` is timezone-aware.
    ``bytes`` is the result's size, ``tiles`` is 1 unless the server tiled the image,
    ``timings_ms`` are the server's own timings. ``elapsed_s`` is the wall time this
    client spent (all attempts), ``attempts`` the number of HTTP attempts made.
    """

    key: str
    url: str
    expires_at: datetime
    instance_id: str
    width: int
    height: int
    format: str
    bytes: int
    cached: bool
    tiles: int
    timings_ms: Mapping[str, float] = field(hash=False)
    elapsed_s: float
    attempts: int = 1


@dataclass(frozen=True)
class Load:
    """How loaded an instance is, from ``GET /health``'s ``load`` object.

    ``busy`` of ``slots`` processing slots are working, ``queued`` requests wait
    (at most ``queue_limit``; beyond that the instance answers 503 ``overloaded``),
    ``completed`` counts finished requests since start.
    """

    busy: int
    slots: int
    queued: int
    queue_limit: int
    completed: int


@dataclass(frozen=True)
class Health:
    """The answer to ``GET /health`` (``status`` is ``"ok"`` or ``"draining"``).

    ``load`` is None from a server that does not report it.
    """

    status: str
    instance_id: str
    inflight: int
    processed: int
    uptime_s: float
    version: str
    load: Load | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class FleetInstance:
    """One instance in ``GET /fleet`` (``health`` is an ALB target state)."""

    id: str
    state: str
    health: str
    address: str | None
    inflight: int
    launched_at: datetime | None


@dataclass(frozen=True)
class FleetEvent:
    """One entry of the fleet's event log."""

    at: datetime | None
    kind: str
    instance_id: str | None
    message: str


@dataclass(frozen=True)
class FleetState:
    """The answer to ``GET /fleet``."""

    name: str
    provider: str
    desired: int
    min: int
    max: int
    instances: tuple[FleetInstance, ...]
    events: tuple[FleetEvent, ...]


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
