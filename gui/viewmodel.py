"""Pure logic behind the desktop app's views: no Tk, no network, no threads.

- parameter schema (``/operations``) → control specs, and control values → typed params;
- the state of a batch of images and its progress arithmetic;
- the process request (single operation or a pipeline of steps);
- fleet table rows, totals and event lines;
- small formatting helpers (expiry, elapsed time, error messages, pasted paths).

The views own the widgets; everything that can be decided without them is decided here
so it can be tested without a display.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlparse

from gui.naming import pipeline_label, result_name
from server.limits import IMAGE_SUFFIXES

OUTPUT_FORMATS = ("original", "png", "jpeg", "webp", "avif")
LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
SUBSAMPLINGS = ("4:2:0", "4:2:2", "4:4:4")
ICC_LABELS = {"srgb": "Convert to sRGB", "keep": "Keep the profile"}
METADATA_LABELS = {"strip": "Strip all", "keep-no-location": "Keep all but location",
                   "keep": "Keep all"}
SLIDER_MAX_INT_STEPS = 1000  # wider integer ranges get a spinbox: a slider would be too coarse
FLOAT_SLIDER_POSITIONS = 200  # at least this many positions on a float slider
MAX_SLIDER_STEPS = 100_000


# --------------------------------------------------------------------------- parameters


class SchemaError(ValueError):
    """The server described a parameter the app cannot build a control for."""


@dataclass(frozen=True)
class ControlSpec:
    """How one operation parameter is shown and parsed.

    ``kind`` is one of ``slider``, ``spinbox``, ``dropdown``, ``checkbox``.
    ``steps`` is the slider's number of steps (None for other kinds).
    """

    name: str
    label: str
    kind: str
    value_type: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    steps: int | None = None
    choices: tuple[str, ...] = ()
    odd: bool = False  # kernel sizes: only odd integers are valid
    description: str = ""

    @property
    def increment(self) -> float:
        """One step: 1 for ints (2 for odd-only), the slider's resolution for floats."""
        if self.value_type == "int":
            return 2 if self.odd else 1
        if self.steps and self.minimum is not None and self.maximum is not None:
            return (self.maximum - self.minimum) / self.steps
        return 0.1


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def control_for(param: Any) -> ControlSpec:
    """One control for a ParamSpec-like object (name, type, default, min, max, choices)."""
    name = param.name
    kind_of = param.type
    low, high = param.min, param.max
    # ``odd`` and ``description`` are optional in the schema (older clients drop them)
    odd = bool(getattr(param, "odd", False))
    description = str(getattr(param, "description", "") or "")
    if kind_of == "bool":
        return ControlSpec(name, _label(name), "checkbox", "bool", bool(param.default),
                           description=description)
    if kind_of == "choice":
        choices = tuple(str(c) for c in (param.choices or ()))
        if not choices:
            raise SchemaError(f"parameter {name!r} is a choice but the server gave no choices")
        default = str(param.default) if param.default is not None else choices[0]
        return ControlSpec(name, _label(name), "dropdown", "choice", default, choices=choices,
                           description=description)
    if kind_of not in ("int", "float"):
        raise SchemaError(
            f"parameter {name!r} has type {kind_of!r}; the app knows int, float, bool, choice"
        )
    bounded = low is not None and high is not None and high > low
    default = param.default if param.default is not None else (low if low is not None else 0)
    if kind_of == "int":
        default = int(default)
        low = None if low is None else math.ceil(low)
        high = None if high is None else math.floor(high)
        if odd:
            # a slider over odd values only: its ends must be odd too
            low = None if low is None else (low if low % 2 else low + 1)
            high = None if high is None else (high if high % 2 else high - 1)
        if bounded and low is not None and high is not None and high > low and (
                high - low <= SLIDER_MAX_INT_STEPS):
            steps = (high - low) // 2 if odd else high - low
            return ControlSpec(name, _label(name), "slider", "int", default, low, high,
                               steps=steps, odd=odd, description=description)
        return ControlSpec(name, _label(name), "spinbox", "int", default, low, high, odd=odd,
                           description=description)
    default = float(default)
    if bounded:
        return ControlSpec(name, _label(name), "slider", "float", default, float(low),
                           float(high), steps=float_slider_steps(low, high, default),
                           description=description)
    return ControlSpec(name, _label(name), "spinbox", "float", default, low, high,
                       description=description)


def _on_grid(distance: float, step: float) -> bool:
    ratio = distance / step
    return abs(ratio - round(ratio)) < 1e-6


def float_slider_steps(low: float, high: float, default: float) -> int:
    """Steps for a float slider: a power-of-ten resolution giving at least
    FLOAT_SLIDER_POSITIONS positions, fine enough that the default and both ends sit
    exactly on a position (so an untouched slider sends the server's default)."""
    step = 10 ** math.floor(math.log10((high - low) / FLOAT_SLIDER_POSITIONS))
    while (high - low) / step <= MAX_SLIDER_STEPS:
        if _on_grid(default - low, step) and _on_grid(high - low, step):
            return round((high - low) / step)
        step /= 10
    return FLOAT_SLIDER_POSITIONS


def controls_for(operation: Any) -> list[ControlSpec]:
    return [control_for(p) for p in operation.params]


def _decimals(spec: ControlSpec) -> int:
    if spec.value_type != "float":
        return 0
    return max(0, -math.floor(math.log10(spec.increment))) if spec.increment < 1 else 1


def coerce_value(spec: ControlSpec, raw: Any) -> Any:
    """Turn a widget's raw value into the typed parameter, or raise ValueError saying
    what is allowed. Slider floats are rounded to the slider's resolution."""
    if spec.value_type == "bool":
        if isinstance(raw, str):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return bool(raw)
    if spec.value_type == "choice":
        value = str(raw)
        if value not in spec.choices:
            raise ValueError(f"{spec.label} must be one of {', '.join(spec.choices)}")
        return value
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"{spec.label} must be a number{_range_text(spec)}, got {text!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"{spec.label} must be a finite number{_range_text(spec)}")
    if spec.value_type == "int":
        kind = "an odd whole number" if spec.odd else "a whole number"
        if spec.kind == "spinbox" and (number != int(number) or (spec.odd and number % 2 == 0)):
            raise ValueError(f"{spec.label} must be {kind}{_range_text(spec)}")
        value: float = round(number)
        if spec.odd and value % 2 == 0:  # a slider position between two odd values
            value += 1 if spec.maximum is None or value + 1 <= spec.maximum else -1
    else:
        value = round(number, _decimals(spec) + 1) if spec.kind == "slider" else number
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        shown = format_value(spec, value)
        raise ValueError(f"{spec.label} must be{_range_text(spec)}, got {shown}")
    return int(value) if spec.value_type == "int" else float(value)


def _range_text(spec: ControlSpec) -> str:
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None:
        return f" from {_num(low)} to {_num(high)}"
    if low is not None:
        return f" of at least {_num(low)}"
    if high is not None:
        return f" of at most {_num(high)}"
    return ""


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def format_value(spec: ControlSpec, value: Any) -> str:
    if spec.value_type == "int":
        return str(round(float(value)))
    if spec.value_type == "float":
        return f"{float(value):.{_decimals(spec) + 1}f}".rstrip("0").rstrip(".") or "0"
    return str(value)


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Step:
    op: str
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSettings:
    """Encoder, colour and metadata options, named as the server's form fields (and the
    client's keyword arguments). Each applies where the format has it: ``progressive``
    to JPEG, ``subsampling`` to JPEG and AVIF, ``lossless`` to WebP; with "original"
    format the server applies what fits each input."""

    progressive: bool = False
    subsampling: str = "4:2:0"
    lossless: bool = False
    icc: str = "srgb"
    metadata: str = "strip"

    def __post_init__(self) -> None:
        if self.subsampling not in SUBSAMPLINGS:
            raise ValueError(f"subsampling must be one of {', '.join(SUBSAMPLINGS)}")
        if self.icc not in ICC_LABELS:
            raise ValueError(f"icc must be one of {', '.join(ICC_LABELS)}")
        if self.metadata not in METADATA_LABELS:
            raise ValueError(f"metadata must be one of {', '.join(METADATA_LABELS)}")

    def client_kwargs(self) -> dict[str, Any]:
        """Only what differs from the server's defaults (an older server then still
        takes the request)."""
        default = OutputSettings()
        return {name: getattr(self, name) for name in
                ("progressive", "subsampling", "lossless", "icc", "metadata")
                if getattr(self, name) != getattr(default, name)}

    def describe(self, fmt: str | None) -> list[str]:
        """The options that apply to ``fmt`` (None: the input's), for the Runs line."""
        words = []
        if self.progressive and fmt in (None, "jpeg"):
            words.append("progressive")
        if self.subsampling != "4:2:0" and fmt in (None, "jpeg", "avif"):
            words.append(f"chroma {self.subsampling}")
        if self.lossless and fmt in (None, "webp"):
            words.append("lossless")
        if self.icc != "srgb":
            words.append("ICC profile kept")
        if self.metadata != "strip":
            words.append({"keep": "metadata kept",
                          "keep-no-location": "metadata kept but location"}[self.metadata])
        return words


DEFAULT_OUTPUT = OutputSettings()


@dataclass(frozen=True)
class RunOutput:
    """One output of a recipe run: its name, its ``{op}`` label, its name template and
    the keyword arguments of its request (steps, format, quality, encoder fields)."""

    name: str
    label: str
    template: str
    options: Mapping[str, Any]
    format: str | None


@dataclass(frozen=True)
class ProcessRequest:
    """What every image of a run is sent with; exactly one of operation/steps is set.

    A recipe's run has ``outputs`` (one request per output of each image) and its name
    in ``recipe``; its ``steps``/``format``/``quality`` are those of the first output,
    which the quick preview shows."""

    operation: str | None
    params: Mapping[str, Any] | None
    steps: tuple[Step, ...] | None
    format: str | None
    quality: int | None
    expires_in: int | None
    outputs: tuple[RunOutput, ...] = ()
    recipe: str = ""
    output: OutputSettings = DEFAULT_OUTPUT  # without a recipe

    @property
    def label(self) -> str:
        """Short name of the processing, used in file names (``<stem>.<label>.<ext>``):
        ``grayscale+invert`` for a pipeline, as the command line names it."""
        if self.steps:
            return pipeline_label(None, [{"op": step.op} for step in self.steps])
        return self.operation or "result"

    def same_output(self, other: ProcessRequest | None) -> bool:
        """Whether ``other`` makes the same result (the link's lifetime does not count)."""
        return other is not None and replace(self, expires_in=None) == replace(
            other, expires_in=None)

    def steps_payload(self) -> list[dict[str, Any]] | None:
        if not self.steps:
            return None
        return [{"op": step.op, **step.params} for step in self.steps]

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ImageFleetClient.process`` (a recipe's first output)."""
        if self.outputs:
            return {**self.outputs[0].options, "expires_in": self.expires_in}
        output = self.output.client_kwargs()
        if self.steps:
            return {"steps": self.steps_payload(), "format": self.format,
                    "quality": self.quality, "expires_in": self.expires_in, **output}
        return {"operation": self.operation, "params": dict(self.params or {}),
                "format": self.format, "quality": self.quality, "expires_in": self.expires_in,
                **output}


def output_requests(request: ProcessRequest) -> list[tuple[RunOutput | None, dict[str, Any]]]:
    """Each request one image of the run makes: a recipe's outputs, or the one request."""
    if not request.outputs:
        return [(None, request.client_kwargs())]
    return [(out, {**out.options, "expires_in": request.expires_in})
            for out in request.outputs]


def recipe_request(recipe: Any, expires_in: int | None) -> ProcessRequest:
    """The run of a (checked) ``gui.recipes.Recipe``: one RunOutput per output."""
    from gui.output_rules import output_label
    from gui.recipes import job_options

    outputs = tuple(
        RunOutput(out.name, output_label(recipe.output_steps(out)), out.template,
                  MappingProxyType(job_options(recipe, out)), out.format)
        for out in recipe.outputs)
    first = outputs[0].options
    steps = tuple(Step(str(step["op"]), {k: v for k, v in step.items() if k != "op"})
                  for step in first["steps"])
    return ProcessRequest(None, None, steps, first.get("format"), first.get("quality"),
                          expires_in, outputs, recipe.name)


def build_request(
    *,
    operation: str | None,
    params: Mapping[str, Any],
    pipeline: Sequence[Step],
    output_format: str,
    quality: int,
    expires_in: int | None,
    output: OutputSettings = DEFAULT_OUTPUT,
) -> ProcessRequest:
    """The pipeline wins when it has steps; otherwise the selected operation alone."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}")
    fmt = None if output_format == "original" else output_format
    # quality only means something for lossy formats; "original" may be a JPEG too
    q = int(quality) if fmt in LOSSY_FORMATS or fmt is None else None
    if fmt == "webp" and output.lossless:
        q = None  # lossless WebP has no quality
    if pipeline:
        return ProcessRequest(None, None, tuple(pipeline), fmt, q, expires_in, output=output)
    if not operation:
        raise ValueError("choose an operation, or add steps to the pipeline")
    return ProcessRequest(operation, dict(params), None, fmt, q, expires_in, output=output)


def describe_step(step: Step, titles: Mapping[str, str] | None = None) -> str:
    title = (titles or {}).get(step.op, step.op)
    if not step.params:
        return title
    inner = ", ".join(f"{k}={_short(v)}" for k, v in step.params.items())
    return f"{title} ({inner})"


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_request(request: ProcessRequest, titles: Mapping[str, str] | None = None) -> str:
    """Every step the request runs, in order, with its parameters, and the output:
    ``resize (width=64) → canny (low=100, high=200) · png``. The preview caption and
    the line next to Process all both show this text for the same request."""
    if request.outputs:
        outputs = " · ".join(f"{out.name} ({out.label}, {out.format or 'original format'})"
                             for out in request.outputs)
        return (f"recipe {request.recipe}: {len(request.outputs)} output"
                f"{'s' if len(request.outputs) != 1 else ''}: {outputs}")
    steps = request.steps or (Step(request.operation or "?", dict(request.params or {})),)
    text = " → ".join(describe_step(step, titles) for step in steps)
    fmt = request.format or "original format"
    if request.quality is not None:
        fmt += f", quality {request.quality}"
    extras = request.output.describe(request.format)
    if extras:
        fmt += ", " + ", ".join(extras)
    return f"{text} · {fmt}"


def runs_text(request: ProcessRequest | None, problem: str = "",
              titles: Mapping[str, str] | None = None) -> str:
    """The line saying what Process all runs (or why it cannot run yet)."""
    if request is None:
        return f"Cannot run yet: {problem}" if problem else "Nothing to run yet."
    return "Runs: " + describe_request(request, titles)


def result_filename(source: Path, label: str, fmt: str) -> str:
    return result_name(source.stem, label, fmt)


# --------------------------------------------------------------------------- batch


class JobStatus(StrEnum):
    READY = "ready"  # added, never run
    QUEUED = "queued"  # part of a run, waiting for a free slot
    UPLOADING = "uploading"
    PROCESSING = "processing"
    RETRYING = "retrying"
    DOWNLOADING = "downloading"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NOT_IMAGE = "not an image"  # failed the header check when added: never uploaded


ACTIVE = frozenset({JobStatus.UPLOADING, JobStatus.PROCESSING, JobStatus.RETRYING,
                    JobStatus.DOWNLOADING})
IN_RUN = ACTIVE | {JobStatus.QUEUED}
FINISHED = frozenset({JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED})

# Share of one image's bar given to each phase: uploading is the visible part on a slow
# link, processing is opaque (the server reports nothing until it answers), and the
# final download feeds the preview.
PHASE_SPANS: Mapping[str, tuple[float, float]] = MappingProxyType({
    "queued": (0.0, 0.0),
    "uploading": (0.0, 0.45),
    "processing": (0.45, 0.85),
    "downloading": (0.85, 1.0),
    "done": (1.0, 1.0),
})


def phase_fraction(phase: str, fraction: float) -> float:
    """Position of an image's bar (0..1) for a phase and the fraction within it."""
    low, high = PHASE_SPANS.get(phase, (0.0, 0.0))
    f = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
    return low + (high - low) * f


@dataclass(frozen=True)
class ResultInfo:
    url: str
    expires_at: datetime | None
    instance_id: str
    elapsed_s: float
    width: int
    height: int
    format: str
    bytes: int
    cached: bool
    key: str = ""


@dataclass(frozen=True)
class ImageJob:
    id: int
    path: Path
    status: JobStatus = JobStatus.READY
    progress: float = 0.0
    message: str = ""
    ticket: int = 0  # bumped on every (re)start so late events of an older run are ignored
    result: ResultInfo | None = None
    folder: str = ""  # the sub-folder it was found in below a folder added with its sub-folders
    outputs: tuple[tuple[str, ResultInfo], ...] = ()  # a recipe's results, by output name
    label: str = ""  # the request's label when the result was made
    made_with: ProcessRequest | None = None  # the request the result was made with
    stale: bool = False  # done, but the current settings would make another result

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Overall:
    fraction: float
    done: int
    failed: int
    cancelled: int
    active: int
    queued: int
    total: int
    outputs: int = 1  # results per image (a recipe's outputs)

    @property
    def text(self) -> str:
        if not self.total:
            return "No run yet"
        parts = [f"{self.done} of {self.total} done"]
        if self.outputs > 1:
            parts[0] = (f"{self.done} of {self.total} images done ({self.done * self.outputs}"
                        f" of {self.total * self.outputs} results)")
        if self.active:
            parts.append(f"{self.active} running")
        if self.queued:
            parts.append(f"{self.queued} waiting")
        if self.failed:
            parts.append(f"{self.failed} failed")
        if self.cancelled:
            parts.append(f"{self.cancelled} cancelled")
        return " · ".join(parts)


@dataclass(frozen=True)
class AddOutcome:
    added: list[ImageJob]
    skipped: list[tuple[str, str]]  # (path, reason)


class Batch:
    """The images in the Process view and where each one is in its run.

    Sized for tens of thousands of images: adding is O(n) once for the files given,
    and the counts behind ``overall()`` and ``running`` are kept up to date on every
    change, so progress events never scan the batch.
    """

    def __init__(self) -> None:
        self._jobs: dict[int, ImageJob] = {}
        self._paths: set[Path] = set()
        self._next_id = 1
        self._run: dict[int, None] = {}  # the current run's members, in start order
        self._counts: dict[JobStatus, int] = dict.fromkeys(JobStatus, 0)  # over the run
        self._filled_milli = 0  # the run's summed bar positions, in 1/1000 of an image
        self._in_run_anywhere = 0  # jobs queued or active, run member or not
        self.version = 0  # bumped on every change: views redraw when it moved
        self.current: ProcessRequest | None = None  # what the settings on screen make
        self.outputs_per_image = 1  # of the current run (a recipe's outputs)

    # -- bookkeeping
    @staticmethod
    def _fill(job: ImageJob) -> int:
        # done and failed count as whole: that part of the run is behind us; cancelled
        # counts as nothing, so after a cancel the bar shows how much was really done
        if job.status in (JobStatus.DONE, JobStatus.FAILED):
            return 1000
        if job.status == JobStatus.CANCELLED:
            return 0
        return round(job.progress * 1000)

    def _set(self, job: ImageJob) -> ImageJob:
        old = self._jobs.get(job.id)
        if old is not None:
            self._untrack(old)
        self._jobs[job.id] = job
        self._track(job)
        self.version += 1
        return job

    def _track(self, job: ImageJob) -> None:
        if job.status in IN_RUN:
            self._in_run_anywhere += 1
        if job.id in self._run:
            self._counts[job.status] += 1
            self._filled_milli += self._fill(job)

    def _untrack(self, job: ImageJob) -> None:
        if job.status in IN_RUN:
            self._in_run_anywhere -= 1
        if job.id in self._run:
            self._counts[job.status] -= 1
            self._filled_milli -= self._fill(job)

    def _new_run(self) -> None:
        self._run = {}
        self._counts = dict.fromkeys(JobStatus, 0)
        self._filled_milli = 0

    def _join_run(self, job_id: int) -> None:
        if job_id not in self._run:
            job = self._jobs[job_id]
            self._untrack(job)
            self._run[job_id] = None
            self._track(job)

    # -- membership
    @property
    def jobs(self) -> list[ImageJob]:
        return list(self._jobs.values())

    def ids(self) -> list[int]:
        """Job ids in the order they were added."""
        return list(self._jobs)

    def get(self, job_id: int) -> ImageJob | None:
        return self._jobs.get(job_id)

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, paths: Iterable[Path],
            not_images: Mapping[Path, str] | None = None,
            folders: Mapping[Path, str] | None = None) -> AddOutcome:
        """Add files (already expanded; resolved when they come from ``expand_paths``).
        ``not_images`` maps paths that failed the header check to why: they are listed
        as such, and never run. ``folders``: the sub-folder each was found in (Save all
        mirrors it)."""
        bad = not_images or {}
        where = folders or {}
        added: list[ImageJob] = []
        skipped: list[tuple[str, str]] = []
        for raw in paths:
            # expand_paths gives absolute, resolved Paths (made on the worker thread):
            # those are taken as they are, which keeps 10,000 files to a few ms here
            path = raw if isinstance(raw, Path) and raw.is_absolute() else Path(
                raw).expanduser().resolve()
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((str(raw), "not an image file (" + ", ".join(
                    sorted(IMAGE_SUFFIXES)) + ")"))
                continue
            if path in self._paths:
                skipped.append((str(raw), "already in the list"))
                continue
            why = bad.get(Path(raw))
            job = (ImageJob(self._next_id, path, folder=where.get(Path(raw), ""))
                   if why is None else
                   ImageJob(self._next_id, path, JobStatus.NOT_IMAGE,
                            message=f"not an image: {why}"))
            self._next_id += 1
            self._jobs[job.id] = job
            self._paths.add(path)
            added.append(job)
        if added:
            self.version += 1
        return AddOutcome(added, skipped)

    def remove(self, job_id: int) -> bool:
        """Remove an image; images being processed stay (cancel first)."""
        job = self._jobs.get(job_id)
        if job is None or job.status in ACTIVE:
            return False
        self._untrack(job)
        del self._jobs[job_id]
        self._paths.discard(job.path)
        self._run.pop(job_id, None)
        self.version += 1
        return True

    # -- runs
    @property
    def running(self) -> bool:
        return self._in_run_anywhere > 0

    def start(self, job_ids: Iterable[int] | None = None) -> list[ImageJob]:
        """Queue images for a run. With no ids: every image not already in a run.
        Starting while a run is going adds to it (a retry does that). An image keeps
        its earlier result until the new one arrives (or the run is cancelled)."""
        ids = list(self._jobs) if job_ids is None else [i for i in job_ids if i in self._jobs]
        started = []
        if not self.running:
            self._new_run()
        for job_id in ids:
            job = self._jobs[job_id]
            if job.status in IN_RUN or job.status == JobStatus.NOT_IMAGE:
                continue
            self._join_run(job_id)
            started.append(self._set(replace(job, status=JobStatus.QUEUED, progress=0.0,
                                             message="", ticket=job.ticket + 1)))
        return started

    def _current(self, job_id: int, ticket: int) -> ImageJob | None:
        job = self._jobs.get(job_id)
        if job is None or job.ticket != ticket or job.status in FINISHED:
            return None
        return job

    def progress(self, job_id: int, ticket: int, phase: str, fraction: float,
                 message: str = "") -> ImageJob | None:
        """Apply a progress event; None when it belongs to an old run or is stale."""
        job = self._current(job_id, ticket)
        if job is None:
            return None
        if phase == "retrying":
            job = replace(job, status=JobStatus.RETRYING, message=message or "retrying…")
        else:
            try:
                status = JobStatus(phase)
            except ValueError:
                return None
            if status in FINISHED:
                return None  # finishing goes through finish()/fail() with the outcome
            # the bar never runs backwards, even when a retry restarts the upload
            job = replace(job, status=status, message=message,
                          progress=max(job.progress, phase_fraction(phase, fraction)))
        return self._set(job)

    def finish(self, job_id: int, ticket: int, result: ResultInfo,
               label: str = "", made_with: ProcessRequest | None = None,
               outputs: tuple[tuple[str, ResultInfo], ...] = ()) -> ImageJob | None:
        job = self._current(job_id, ticket)
        if job is None:
            return None
        return self._set(replace(job, status=JobStatus.DONE, progress=1.0, message="",
                                 result=result, outputs=outputs, label=label,
                                 made_with=made_with,
                                 stale=made_with is not None
                                 and not made_with.same_output(self.current)))

    def restore(self, job_id: int, result: ResultInfo, label: str,
                made_with: ProcessRequest,
                outputs: tuple[tuple[str, ResultInfo], ...] = ()) -> ImageJob | None:
        """A result made before (a resumed batch's done image), outside any run."""
        job = self._jobs.get(job_id)
        if job is None or job.status in IN_RUN:
            return None
        return self._set(replace(job, status=JobStatus.DONE, progress=1.0, message="",
                                 result=result, outputs=outputs, label=label,
                                 made_with=made_with,
                                 stale=self.current is not None
                                 and not made_with.same_output(self.current)))

    def find(self, paths: Iterable[Path]) -> dict[Path, int]:
        """Job ids of the listed ``paths`` (one pass over the list)."""
        wanted = set(paths)
        return {job.path: job.id for job in self._jobs.values() if job.path in wanted}

    def set_current(self, request: ProcessRequest | None) -> list[ImageJob]:
        """The request the settings on screen make now (None while they are invalid:
        then nothing changes). Returns the done images whose stale mark changed.

        One pass over the list per settings change (the caller debounces), comparing a
        small frozen value per image; no widget work."""
        if request is None:
            return []
        self.current = request
        changed = []
        for job in list(self._jobs.values()):
            if job.status != JobStatus.DONE or job.made_with is None:
                continue
            stale = not job.made_with.same_output(request)
            if stale != job.stale:
                marked = replace(job, stale=stale)
                self._set(marked)
                changed.append(marked)
        return changed

    def stale_jobs(self) -> list[ImageJob]:
        return [job for job in self._jobs.values() if job.status == JobStatus.DONE and job.stale]

    def fail(self, job_id: int, ticket: int, message: str) -> ImageJob | None:
        job = self._current(job_id, ticket)
        if job is None:
            return None
        return self._set(replace(job, status=JobStatus.FAILED, message=message, result=None,
                                 outputs=()))

    def _stopped(self, job: ImageJob) -> ImageJob:
        if job.result is not None:  # a re-run that was stopped: the earlier result stands
            return replace(job, status=JobStatus.DONE, progress=1.0, message="")
        return replace(job, status=JobStatus.CANCELLED, message="cancelled")

    def cancel_waiting(self) -> list[ImageJob]:
        """Cancel images that have not started; those already on a server finish."""
        return [self._set(self._stopped(job)) for job in list(self._jobs.values())
                if job.status == JobStatus.QUEUED]

    def cancel_run(self) -> list[ImageJob]:
        """Cancel every image of the run that has not finished, started or not (their
        requests are stopped by the caller). Finished images keep their outcome."""
        return [self._set(self._stopped(job)) for job in list(self._jobs.values())
                if job.status in IN_RUN]

    def overall(self) -> Overall:
        """The run's totals, from the kept counts (no scan)."""
        counts = self._counts
        total = len(self._run)
        return Overall(
            fraction=min(1.0, max(0.0, self._filled_milli / 1000 / total)) if total else 0.0,
            done=counts[JobStatus.DONE],
            failed=counts[JobStatus.FAILED],
            cancelled=counts[JobStatus.CANCELLED],
            active=sum(counts[s] for s in ACTIVE),
            queued=counts[JobStatus.QUEUED],
            total=total,
            outputs=self.outputs_per_image,
        )

    def done_jobs(self) -> list[ImageJob]:
        return [job for job in self._jobs.values() if job.status == JobStatus.DONE]


# --------------------------------------------------------------------------- list order

SORT_KEYS = ("added", "name", "state")
STATE_FILTERS = ("all", "failed", "done", "pending")
# the order of "state": what needs attention first
_STATE_RANK: Mapping[JobStatus, int] = MappingProxyType({
    JobStatus.FAILED: 0, JobStatus.NOT_IMAGE: 0, JobStatus.CANCELLED: 1, JobStatus.RETRYING: 2,
    JobStatus.UPLOADING: 3, JobStatus.PROCESSING: 3, JobStatus.DOWNLOADING: 3,
    JobStatus.QUEUED: 4, JobStatus.READY: 5, JobStatus.DONE: 6,
})
_PENDING = frozenset({JobStatus.READY, JobStatus.CANCELLED}) | IN_RUN


def matches_filter(job: ImageJob, state_filter: str) -> bool:
    """``pending``: not finished yet (never run, cancelled, waiting or running)."""
    if state_filter == "failed":
        return job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE)  # no result to be had
    if state_filter == "done":
        return job.status == JobStatus.DONE
    if state_filter == "pending":
        return job.status in _PENDING
    return True


def order_ids(jobs: Iterable[ImageJob], sort_key: str = "added",
              state_filter: str = "all") -> list[int]:
    """The ids the list shows, in order: filtered by state, sorted stably (ties in the
    order added). O(n log n); callers run it when the order can have changed, not per
    progress event."""
    if sort_key not in SORT_KEYS:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}")
    if state_filter not in STATE_FILTERS:
        raise ValueError(f"filter must be one of {', '.join(STATE_FILTERS)}")
    shown = [job for job in jobs if matches_filter(job, state_filter)]
    if sort_key == "name":
        shown.sort(key=lambda job: (job.name.casefold(), job.id))
    elif sort_key == "state":
        shown.sort(key=lambda job: (_STATE_RANK.get(job.status, 9), job.id))
    return [job.id for job in shown]


def order_depends_on_state(sort_key: str, state_filter: str) -> bool:
    """Whether a status change can move rows (then the order is refreshed as runs go)."""
    return sort_key == "state" or state_filter != "all"


ROW_MESSAGE_CHARS = 60  # a row shows this much of an error; the details panel shows all


def short_message(text: str, limit: int = ROW_MESSAGE_CHARS) -> str:
    """One line of at most ``limit`` characters, cut at a word with an ellipsis."""
    line = " ".join(text.split())
    if len(line) <= limit:
        return line
    cut = line[:limit - 1]
    if " " in cut[limit // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,;:·") + "…"


def not_images_text(jobs: Sequence[ImageJob], shown: int = 3) -> str:
    """The message when added files fail the header check (listed, never uploaded)."""
    names = "; ".join(f"{job.name} ({job.message.removeprefix('not an image: ')})"
                      for job in jobs[:shown])
    more = f" and {len(jobs) - shown} more" if len(jobs) > shown else ""
    if len(jobs) == 1:
        return f"Not an image, will not be processed: {names}."
    return f"{len(jobs)} files are not images and will not be processed: {names}{more}."


def can_retry(job: ImageJob) -> bool:
    """Whether the row offers Retry: a failed or cancelled run, never a file that is
    not an image (sending it again cannot help)."""
    return job.status in (JobStatus.FAILED, JobStatus.CANCELLED)


def status_text(job: ImageJob) -> str:
    """The row's state line; short enough for a row (errors in full: details_text)."""
    if job.status == JobStatus.DONE and job.result is not None:
        r = job.result
        if job.stale:
            return "done · stale (other settings)"
        cached = " · cached" if r.cached else ""
        return f"{r.width}×{r.height} {r.format} · {format_elapsed(r.elapsed_s)}{cached}"
    if job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE):
        return short_message(job.message or job.status.value)
    if job.status in ACTIVE:
        text = {JobStatus.UPLOADING: "uploading", JobStatus.PROCESSING: "processing",
                JobStatus.DOWNLOADING: "fetching result",
                JobStatus.RETRYING: job.message or "retrying"}[job.status]
        return f"{text} {round(job.progress * 100)}%"
    return {JobStatus.READY: "ready", JobStatus.QUEUED: "waiting",
            JobStatus.CANCELLED: "cancelled"}.get(job.status, job.status.value)


class StaleChoice(StrEnum):
    """What Save all does with results made with other settings than the current ones."""

    RERUN = "rerun"  # process them again with the current settings, then save
    INCLUDE = "include"  # save them as they are
    CANCEL = "cancel"


def stale_choice(answer: bool | None) -> StaleChoice:
    """The Yes / No / Cancel answer to :func:`stale_question`."""
    if answer is None:
        return StaleChoice.CANCEL
    return StaleChoice.RERUN if answer else StaleChoice.INCLUDE


def stale_question(stale: int, done: int) -> str:
    which = "result was" if stale == 1 else "results were"
    return (f"{stale} of {done} {which} made with other settings than the current ones.\n\n"
            "Yes: re-run them with the current settings, then save all.\n"
            "No: save them as they are.\n"
            "Cancel: save nothing.")


# --------------------------------------------------------------------------- fleet

HEALTH_COLOURS: Mapping[str, tuple[str, str]] = MappingProxyType({
    # (light mode, dark mode)
    "healthy": ("#1b7f3b", "#5fd38d"),
    "initial": ("#8a6d00", "#f2c94c"),
    "draining": ("#8a6d00", "#f2c94c"),
    "unhealthy": ("#b3261e", "#ff6b6b"),
    "unused": ("#5f6368", "#9aa0a6"),
})


@dataclass(frozen=True)
class FleetRow:
    id: str
    state: str
    health: str
    address: str
    inflight: int
    uptime: str


@dataclass(frozen=True)
class FleetTotals:
    healthy: int
    desired: int
    minimum: int
    maximum: int

    @property
    def text(self) -> str:
        return (f"{self.healthy} healthy / {self.desired} desired · "
                f"min {self.minimum} · max {self.maximum}")


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def as_datetime(value: Any) -> datetime | None:
    """A timestamp from the API (datetime, ISO 8601 text or epoch seconds), as aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def fleet_rows(instances: Iterable[Any], now: datetime) -> list[FleetRow]:
    rows = []
    for inst in instances:
        launched = as_datetime(_field(inst, "launched_at"))
        rows.append(FleetRow(
            id=str(_field(inst, "id", "?")),
            state=str(_field(inst, "state", "?")),
            health=str(_field(inst, "health", "?")),
            address=str(_field(inst, "address", "") or "—"),
            inflight=int(_field(inst, "inflight", 0) or 0),
            uptime=format_duration((now - launched).total_seconds()) if launched else "—",
        ))
    return sorted(rows, key=lambda r: r.id)


def fleet_totals(state: Any) -> FleetTotals:
    instances = list(_field(state, "instances", []) or [])
    return FleetTotals(
        healthy=sum(1 for i in instances if _field(i, "health") == "healthy"),
        desired=int(_field(state, "desired", 0) or 0),
        minimum=int(_field(state, "min", _field(state, "minimum", 0)) or 0),
        maximum=int(_field(state, "max", _field(state, "maximum", 0)) or 0),
    )


def event_lines(events: Iterable[Any], limit: int = 200) -> list[str]:
    """Newest first, one line each: time, kind, instance, message."""
    lines = []
    for event in events:
        at = as_datetime(_field(event, "at"))
        when = at.astimezone().strftime("%H:%M:%S") if at else "--:--:--"
        instance = _field(event, "instance_id") or "-"
        lines.append((at or datetime.min.replace(tzinfo=UTC),
                      f"{when}  {_field(event, 'kind', ''):<18} {instance:<14} "
                      f"{_field(event, 'message', '')}"))
    lines.sort(key=lambda pair: pair[0], reverse=True)
    return [text for _, text in lines[:limit]]


def parse_desired(text: str, minimum: int, maximum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"desired count must be a whole number from {minimum} to {maximum}, "
                         f"got {text!r}") from None
    if not minimum <= value <= maximum:
        raise ValueError(f"desired count must be from {minimum} to {maximum}, got {value}")
    return value


# --------------------------------------------------------------------------- formatting


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


# --------------------------------------------------------------------------- errors


def describe_fleet_error(exc: BaseException, endpoint: str = "") -> str:
    """Like :func:`describe_error`, for the fleet's admin API (``/fleet``), whose token is
    the admin token: a 401 there says which setting to fix."""
    from gui import client as api

    if isinstance(exc, api.ServerError) and exc.status == 401:
        return (f"{endpoint or 'the endpoint'} refused /fleet: missing or wrong admin token "
                "(401). Set the admin token in Settings.")
    return describe_error(exc, endpoint)


def describe_error(exc: BaseException, endpoint: str = "") -> str:
    """One sentence for the UI saying what went wrong and what to do about it."""
    from gui import client as api

    where = endpoint or "the endpoint"
    if isinstance(exc, api.ServerError):
        if exc.status == 401:
            return (f"{where} refused the request: missing or wrong token (401). "
                    "Set the token in Settings.")
        if exc.status == 403:
            return f"Access denied (403): {exc.message}. The link may have expired."
        if exc.status == 413:
            return f"Too large for the server (413): {exc.message}"
        if exc.status == 415:
            return f"The server cannot read this image (415): {exc.message}"
        if exc.status == 404 and exc.code in ("http_404", "not_found"):
            return f"{where} does not offer this ({exc.message})"
        if exc.status in (502, 503, 504):
            return (f"No server could take the request ({exc.status}): {exc.message}. "
                    "The fleet may be starting or replacing instances; retry shortly.")
        return f"{exc.message} ({exc.status})"
    if isinstance(exc, api.ConnectError):
        return f"Cannot reach {where}: {exc}. Check the endpoint in Settings."
    if isinstance(exc, api.RequestTimeout):
        return f"{where} did not answer in time: {exc}"
    if isinstance(exc, api.TransportError):
        return f"Connection problem with {where}: {exc}"
    if isinstance(exc, api.InvalidResponse):
        return f"Unexpected answer from {where}: {exc}"
    if isinstance(exc, OSError):
        return describe_os_error(exc)
    if isinstance(exc, api.ClientError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def describe_os_error(exc: OSError, action: str = "") -> str:
    import errno

    target = f" {exc.filename}" if exc.filename else ""
    prefix = f"Could not {action}{target}" if action else f"Could not use{target}"
    if exc.errno == errno.ENOSPC:
        return f"Disk full: {prefix.lower()[0] + prefix[1:]}. Free some space and try again."
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{prefix}: permission denied. Choose another folder."
    return f"{prefix}: {exc.strerror or exc}"
