"""The process request: one operation or a pipeline of steps, its outputs and their
settings, and how it is described to the user."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from gui.naming import pipeline_label, result_name

OUTPUT_FORMATS = ("original", "png", "jpeg", "webp", "avif")
LOSSY_FORMATS = frozenset({"jpeg", "webp", "avif"})
SUBSAMPLINGS = ("4:2:0", "4:2:2", "4:4:4")
ICC_LABELS = {"srgb": "Convert to sRGB", "keep": "Keep the profile"}
METADATA_LABELS = {"strip": "Strip all", "keep-no-location": "Keep all but location",
                   "keep": "Keep all"}




@dataclass(frozen=True)
class RequestStep:
    """One step of a pipeline: an operation and its parameters."""

    op: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        """The form ``POST /process`` and recipes take: ``{"op": name, **params}``."""
        return {"op": self.op, **self.params}

    @classmethod
    def from_payload(cls, raw: Mapping[str, Any]) -> RequestStep:
        """From :meth:`to_payload`'s form (recipes, the command line's journal) or the app
        journal's ``{"op": name, "params": {...}}``."""
        if "params" in raw:
            return cls(str(raw["op"]), dict(raw["params"]))
        return cls(str(raw["op"]), {k: v for k, v in raw.items() if k != "op"})


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
    steps: tuple[RequestStep, ...] | None
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
        return [step.to_payload() for step in self.steps]

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
    steps = tuple(RequestStep.from_payload(step) for step in first["steps"])
    return ProcessRequest(None, None, steps, first.get("format"), first.get("quality"),
                          expires_in, outputs, recipe.name)


def build_request(
    *,
    operation: str | None,
    params: Mapping[str, Any],
    pipeline: Sequence[RequestStep],
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


def describe_step(step: RequestStep, titles: Mapping[str, str] | None = None) -> str:
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
    steps = request.steps or (RequestStep(request.operation or "?", dict(request.params or {})),)
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
