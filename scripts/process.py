"""Process many images through an ImageFleet endpoint from the command line.

    python -m scripts.process --endpoint URL [--token T] [--ca-file PEM]
        (--op NAME [--param k=v ...] | --steps JSON | --recipe FILE) [--format F] [--quality Q]
        [--progressive] [--subsampling 4:4:4|4:2:2|4:2:0] [--lossless]
        [--icc srgb|keep] [--metadata strip|keep-no-location|keep]
        [--concurrency N] [--out DIR] [--name-template T] [--resume [BATCH_ID]]
        FILES_OR_FOLDERS...

``--format`` is png, jpeg, webp or avif (default: the input's; HEIC inputs give JPEG).
``--icc srgb`` (default) converts an embedded colour profile's pixels to sRGB, ``keep``
keeps the pixels and the profile; ``--metadata`` strips EXIF/XMP (default), keeps them
without location, or keeps them all (orientation is always 1: the pixels are upright).

``--ca-file`` pins the endpoint's certificate (the self-signed one ``bootstrap_aws up``
wrote beside the fleet config): only that certificate is trusted for the endpoint.

Folders are expanded to the image files in them (sorted; ``--recursive`` descends).
Parameters are checked against the server's ``GET /operations`` before anything is
uploaded, and typed by it (``ksize=5`` becomes an int, ``l2_gradient=yes`` a bool).

Output:

* stdout: one line per image, tab-separated, in the order images finish:
  ``FILE  URL  INSTANCE`` (plus ``SAVED_PATH`` with ``--out``), or
  ``FILE  FAILED  REASON``.
* stderr: progress (one updating line on a terminal, plain lines otherwise), then a
  summary: ``N ok, M failed in S s (R images/s)``, plus ``; server busy B times``
  when the servers shed load and the client waited (``Retry-After``) and retried.
* exit status: 0 all ok, 1 any image failed (or the endpoint is unreachable),
  2 usage error, 130 interrupted (Ctrl-C cancels the requests in flight).

With ``--out DIR`` each result is downloaded, checked and written as
``<stem>.<op>.<ext>`` (a pipeline: ``<stem>.<op1>+<op2>.<ext>``; ``ext`` is the
result's format, ``.jpg`` for JPEG). When inputs share a stem (``a/photo.png`` and
``b/photo.jpg``), the first in input order keeps it and the next ones get ``<stem>-2``,
``<stem>-3``, ...; names are fixed before processing starts, so they never depend on
which image finishes first. Files are written under a temporary name and renamed, so
an interrupted run leaves no half-written result. A name already taken in DIR is handled
by ``--on-conflict``: ``unique`` (default) takes the next free ``<stem>-N``, ``overwrite``
replaces the file, ``skip`` keeps it and writes nothing (the same rule as the desktop
app's Save all, in gui/naming.py).

``--name-template`` names results from fields (``{stem}.{width}px.{ext}``; see
gui/output_rules.py); with ``--recursive`` the sub-folders below a folder given are
mirrored in DIR (``ROOT/a/b/x.jpg`` → ``DIR/a/b/...``).

``--recipe FILE`` runs a recipe (gui/recipes.py): its pipeline, then each output's own
steps, format and name, one request per output of each input. Its stdout lines name the
output: ``FILE  OUTPUT  URL  INSTANCE  [SAVED_PATH]``; an image counts as ok when all
its outputs are.

Every batch is journaled (``gui/journal.py``, in the user's data folder) as it runs:
``--resume`` continues the newest unfinished batch with the same settings and inputs, and
``--resume BATCH_ID`` (the id printed when the batch started) that one batch, taking its
settings and inputs from the journal; see ``scripts/batch_journal.py``. Images done
before and unchanged since are not sent again. Each run first prunes the journal of
finished batches last active more than ``IMAGEFLEET_HISTORY_DAYS`` days ago (default 90;
0 keeps them all).

A busy fleet (503 ``overloaded``) is waited for, not failed: such answers are retried
for up to ``--patience`` seconds without using ``--attempts``, and the client keeps
fewer requests in flight while they come (see gui/client/), so ``--concurrency 64``
against two workers finishes every image without hammering them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any, TextIO

from gui.client import (
    ClientError,
    ImageFleetClient,
    InvalidRequest,
    Job,
    JobOutcome,
    ProgressEvent,
    RetryPolicy,
    Timeout,
    pinned_context,
)
from gui.journal import Journal
from gui.naming import (
    ON_CONFLICT_CHOICES,
    OnConflict,
    SaveAction,
    SaveOutcome,
    extension_for,  # noqa: F401 - part of this module's interface since before gui.naming
    output_numbers,
    output_stems,
    pipeline_label,
    save_result,
)

# The checks against the server's specs are shared with recipes; they stay importable
# from here, where they were first.
from gui.opspecs import (
    SpecError as UsageError,  # a mistake in what was asked: reported with exit status 2
)
from gui.opspecs import (
    check_steps,
    coerce_params,
    coerce_value,  # noqa: F401
    describe_param,  # noqa: F401
    find_operation,
    guess_value,  # noqa: F401
)
from gui.output_rules import (
    DEFAULT_TEMPLATE,
    NameTemplate,
    OutputNaming,
    PlannedName,
    TemplateError,
    mirrored_folder,
    output_label,
    parse_template,
    plan_names,
)
from gui.recipes import (
    Recipe,
    RecipeError,
    check_recipe,
    job_options,
    parse_recipe,
    read_recipe_file,
)
from scripts import batch_journal
from server.limits import IMAGE_SUFFIXES as IMAGE_EXTENSIONS
from server.limits import MAX_LINK_SECONDS

FORMATS = ("png", "jpeg", "webp", "avif")
SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
ICC_POLICIES = ("srgb", "keep")
METADATA_POLICIES = ("strip", "keep-no-location", "keep")
# Which output formats each encoder option applies to (the server ignores it elsewhere;
# here a --format that cannot have it is a usage error, so no one thinks it was applied).
OPTION_FORMATS = {"progressive": ("jpeg",), "subsampling": ("jpeg", "avif"),
                  "lossless": ("webp",)}
OPTION_FIELDS = ("progressive", "subsampling", "lossless", "icc", "metadata")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_EXPIRES_IN = MAX_LINK_SECONDS


# --------------------------------------------------------------------------- pure helpers


def expand_inputs(arguments: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Files as given, folders as their image files (sorted); duplicates dropped.

    A file named explicitly is taken whatever its extension (the server says if it
    is not an image). Raises UsageError for a missing path or when nothing is left.
    """
    return [path for path, _folder in expand_inputs_with_folders(arguments,
                                                                 recursive=recursive)]


def expand_inputs_with_folders(arguments: Sequence[str], *,
                               recursive: bool = False) -> list[tuple[Path, str]]:
    """Like :func:`expand_inputs`, each file with the sub-folder it was found in below
    the folder given (``"a/b"`` for ``ROOT/a/b/x.jpg``, ``""`` for files given by
    themselves): ``--out`` mirrors those sub-folders."""
    missing = [arg for arg in arguments if not Path(arg).exists()]
    if missing:
        raise UsageError("no such file or folder: " + ", ".join(missing))
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for arg in arguments:
        path = Path(arg)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.iterdir()
            candidates = sorted(
                p for p in pattern
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            root: str | None = path.as_posix()
        else:
            candidates, root = [path], None
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append((candidate, mirrored_folder(candidate.as_posix(), root)))
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        hint = "" if recursive else " (use --recursive to look in subfolders)"
        raise UsageError(f"no images found in {', '.join(arguments)}; looked for {extensions}"
                         + hint)
    return found


def parse_param_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["ksize=5", "mode=fit"]`` → ``{"ksize": "5", "mode": "fit"}`` (values still text)."""
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise UsageError(f"--param needs NAME=VALUE, got {pair!r}")
        if name in params:
            raise UsageError(f"--param {name} given twice")
        params[name] = value
    return params


def parse_steps(text: str) -> list[dict[str, Any]]:
    """``--steps`` JSON → a list of ``{"op": name, **params}`` (shape only)."""
    try:
        steps = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--steps is not valid JSON: {exc}") from None
    example = '[{"op": "grayscale"}, {"op": "gaussian_blur", "ksize": 5}]'
    if not isinstance(steps, list) or not steps:
        raise UsageError(f"--steps must be a non-empty JSON list like {example}")
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("op"), str):
            raise UsageError(f"--steps[{i}] must be an object with an \"op\", like {example}")
    return steps


# --------------------------------------------------------------------------- progress


@dataclass
class Tally:
    """Counts for the progress line and the summary."""

    total: int
    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    failed: int = 0
    busy: int = 0  # back-pressure answers (503 overloaded) waited out and retried
    outputs: int = 1  # results per image (a recipe's outputs)
    failed_outputs: int = 0
    saves: dict[SaveAction, int] = field(default_factory=lambda: dict.fromkeys(SaveAction, 0))
    batch_id: str | None = None  # the journal's id of this batch (for --resume BATCH_ID)

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    def summary(self, *, cancelled: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        text = f"{self.ok} ok, {self.failed} failed in {elapsed:.1f} s ({rate:.2f} images/s)"
        if self.outputs > 1:
            made = self.finished * self.outputs - self.failed_outputs
            text += f"; {made} results ({self.outputs} outputs per image)"
        renamed, skipped, overwritten = (self.saves[SaveAction.RENAMED],
                                         self.saves[SaveAction.SKIPPED],
                                         self.saves[SaveAction.OVERWRITTEN])
        if renamed or skipped or overwritten:
            text += f"; {renamed} renamed, {skipped} skipped, {overwritten} overwritten"
        if self.busy:
            text += f"; server busy {self.busy} times"
        if cancelled:
            text += f"; cancelled with {self.total - self.finished} not finished"
        if self.batch_id:
            text += f"; batch {self.batch_id}"
            if cancelled or self.finished < self.total:
                text += " (continue it with --resume)"
        return text


class ProgressDisplay:
    """Progress on ``stream``: one redrawn line on a terminal, plain lines otherwise."""

    _REDRAW_EVERY = 0.1
    # A shedding fleet turns many requests away at once: one plain line per second
    # says so, instead of one line per request.
    _BUSY_LINE_EVERY = 1.0

    def __init__(self, stream: TextIO, tally: Tally, *, is_tty: bool) -> None:
        self.stream = stream
        self.tally = tally
        self.is_tty = is_tty
        self._active: dict[int, str] = {}
        self._last_draw = 0.0
        self._line_shown = False
        self._busy_unreported = 0
        self._last_busy_line = -math.inf

    def event(self, event: ProgressEvent) -> None:
        if event.phase in ("done", "failed"):
            self._active.pop(event.index, None)
        else:
            self._active[event.index] = self._describe(event)
        if event.phase == "retrying" and event.busy:
            self.tally.busy += 1
            self._busy_unreported += 1
        if not self.is_tty:
            if event.phase == "retrying" and event.busy:
                self._busy_line(event)
            elif event.phase == "retrying":
                self._print(f"retrying {event.name}: {event.message}")
            return
        now = time.monotonic()
        if now - self._last_draw >= self._REDRAW_EVERY or event.phase in ("done", "failed"):
            self._draw(now)

    def finished(self, outcome: JobOutcome, label: str) -> None:
        """Report one finished image (after the tally was updated)."""
        if self.is_tty:
            self._draw(time.monotonic())
            return
        position = f"[{self.tally.finished}/{self.tally.total}]"
        if outcome.ok:
            elapsed = outcome.result.elapsed_s if outcome.result else 0.0
            self._print(f"{position} ok {label} ({elapsed:.2f} s)")
        else:
            self._print(f"{position} failed {label}: {outcome.error}")

    def clear(self) -> None:
        """Remove the progress line so other output can be printed cleanly."""
        if self.is_tty and self._line_shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._line_shown = False

    def _draw(self, now: float) -> None:
        self._last_draw = now
        tally = self.tally
        elapsed = now - tally.started
        rate = tally.finished / elapsed if elapsed > 0 else 0.0
        line = (f"[{tally.finished}/{tally.total}] {tally.ok} ok, {tally.failed} failed, "
                f"{len(self._active)} in flight, {rate:.1f} img/s")
        if self._active:
            line += " | " + next(reversed(self._active.values()))
        self.stream.write("\r\x1b[K" + line[:200])
        self.stream.flush()
        self._line_shown = True

    def _busy_line(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if now - self._last_busy_line < self._BUSY_LINE_EVERY:
            return
        self._last_busy_line = now
        count, self._busy_unreported = self._busy_unreported, 0
        waiting = f"{count} requests asked to wait" if count > 1 else "1 request asked to wait"
        self._print(f"server busy ({waiting}); {event.name}: {event.message}")

    def _print(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    @staticmethod
    def _describe(event: ProgressEvent) -> str:
        if event.phase in ("uploading", "downloading"):
            return f"{event.name} {event.phase} {event.fraction:.0%}"
        if event.phase == "retrying" and event.busy:
            return f"{event.name}: {event.message}"  # "server busy, retrying in 1.3 s"
        if event.phase == "retrying":
            return f"{event.name} retrying (attempt {event.attempt + 1})"
        return f"{event.name} {event.phase}"


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.process",
        description="Process images through an ImageFleet endpoint (a load balancer or one "
                    "server). Prints FILE<TAB>URL<TAB>INSTANCE per image on stdout; progress "
                    "and a summary on stderr. Exit 0: all ok; 1: some failed; 2: usage error.",
        epilog="Results written with --out are named <stem>.<op>.<ext> "
               "(<stem>.<op1>+<op2>.<ext> for --steps); inputs sharing a stem get "
               "<stem>-2, <stem>-3, ... in input order; --name-template changes the names, "
               "and --recursive mirrors the input's sub-folders in --out.",
    )
    parser.add_argument("--endpoint", default=os.environ.get("IMAGEFLEET_ENDPOINT"),
                        help="base URL, e.g. http://127.0.0.1:8000 (env IMAGEFLEET_ENDPOINT)")
    parser.add_argument("--token", default=os.environ.get("IMAGEFLEET_TOKEN"),
                        help="bearer token (prefer env IMAGEFLEET_TOKEN: flags are visible "
                             "to other local users)")
    parser.add_argument("--ca-file", type=Path, default=os.environ.get("IMAGEFLEET_CA_FILE"),
                        metavar="PEM",
                        help="trust only this certificate for the endpoint (env "
                             "IMAGEFLEET_CA_FILE), e.g. the fleet's self-signed one")
    # not required: --resume BATCH_ID takes the operation from the journal
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--op", metavar="NAME", help="operation name (see GET /operations)")
    what.add_argument("--steps", metavar="JSON",
                      help='a pipeline, e.g. \'[{"op": "grayscale"}, {"op": "gaussian_blur", '
                           '"ksize": 5}]\'')
    what.add_argument("--recipe", type=Path, metavar="FILE",
                      help="a recipe file (JSON): a pipeline and one or more outputs, each "
                           "with its own steps, format and name template")
    parser.add_argument("--name-template", metavar="TEMPLATE",
                        help="names of results in --out, from fields {stem} {ext} {op} "
                             "{recipe} {output} {width} {height} {n:04} {date} (default "
                             f"{DEFAULT_TEMPLATE}; replaces a recipe's templates)")
    parser.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                        help="an operation parameter; repeat for several (with --op)")
    parser.add_argument("--format", type=_format, help="output format: png, jpeg, webp or "
                        "avif (default: the input's; HEIC inputs give jpeg)")
    parser.add_argument("--quality", type=_bounded_int(1, 100),
                        help="JPEG/WebP/AVIF quality 1-100")
    parser.add_argument("--progressive", action="store_true", default=None,
                        help="progressive JPEG (loads coarse-to-fine)")
    parser.add_argument("--subsampling", choices=SUBSAMPLINGS,
                        help="chroma subsampling of JPEG and AVIF (server default 4:2:0)")
    parser.add_argument("--lossless", action="store_true", default=None,
                        help="lossless WebP (the pixels round-trip exactly)")
    parser.add_argument("--icc", choices=ICC_POLICIES,
                        help="embedded colour profile: srgb converts the pixels to sRGB "
                             "(default), keep keeps pixels and profile")
    parser.add_argument("--metadata", choices=METADATA_POLICIES,
                        help="EXIF/XMP: strip (default), keep-no-location (removes GPS and "
                             "XMP location), keep")
    parser.add_argument("--expires-in", type=_bounded_int(1, MAX_EXPIRES_IN), metavar="SECONDS",
                        help="lifetime of the result links (server default otherwise)")
    parser.add_argument("--concurrency", type=_bounded_int(1, 256), default=4,
                        help="images in flight at once (default 4)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="download results into DIR (created if missing)")
    parser.add_argument("--on-conflict", choices=ON_CONFLICT_CHOICES, default="unique",
                        help="when a result's name is taken in --out: unique (default) takes "
                             "the next free <stem>-N, overwrite replaces the file, skip "
                             "keeps it and writes nothing")
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="look for images in subfolders too")
    parser.add_argument("--attempts", type=_bounded_int(1, 20), default=5,
                        help="HTTP attempts per request, for connection errors and "
                             "502/503/504 (default 5); a busy server's 503 overloaded "
                             "does not use them up (see --patience)")
    parser.add_argument("--patience", type=_non_negative_float,
                        default=RetryPolicy().overload_patience, metavar="SECONDS",
                        help="how long to keep retrying a request that busy servers turn "
                             "away (503 overloaded, after their Retry-After); 0 gives up at "
                             "once (default %(default)g)")
    parser.add_argument("--timeout", type=_positive_float, default=120.0, metavar="SECONDS",
                        help="longest wait for an answer (default 120)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the newest unfinished batch with the same settings and "
                             "inputs: images done then (and unchanged since) are not sent "
                             "again. --resume BATCH_ID continues that batch, with the settings "
                             "and inputs the journal holds (give no --op or inputs then)")
    parser.add_argument("--resume-batch", metavar="BATCH_ID", help=argparse.SUPPRESS)
    # what --resume BATCH_ID takes from the journal that has no flag of its own
    parser.set_defaults(stored_recipe=None, stored_folders=None)
    parser.add_argument("inputs", nargs="*", metavar="FILES_OR_FOLDERS")
    return parser


def _format(text: str) -> str:
    value = {"jpg": "jpeg"}.get(text.lower(), text.lower())
    if value not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(FORMATS)}")
    return value


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not within {low}..{high}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


@dataclass(frozen=True)
class BatchPlan:
    """What to run, decided from the arguments before any image is uploaded."""

    inputs: list[Path]
    stems: list[str]
    numbers: list[int]  # each stem's number: 1 = the input's own, n = <stem>-n
    operation: str | None
    raw_params: dict[str, str]
    steps: list[dict[str, Any]] | None
    label: str
    folders: list[str] = field(default_factory=list)  # mirrored sub-folder per input
    recipe: Recipe | None = None
    template: NameTemplate | None = None  # --name-template (replaces a recipe's)
    run_date: date = field(default_factory=date.today)


@dataclass(frozen=True)
class OutputRun:
    """One output of every input: what is sent and how its results are named."""

    name: str
    job_options: dict[str, Any]
    naming: OutputNaming


def check_encoder_options(args: argparse.Namespace) -> None:
    """An option the chosen --format cannot have is a mistake (without --format each
    input's own format decides, and the server applies what fits)."""
    if args.format is None:
        return
    for name, formats in OPTION_FORMATS.items():
        if getattr(args, name) not in (None, False) and args.format not in formats:
            raise UsageError(f"--{name} applies to {' and '.join(formats)} output, "
                             f"not --format {args.format}")


def encoder_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The client's keyword arguments for the options given (the rest: server defaults)."""
    return {name: getattr(args, name) for name in OPTION_FIELDS
            if getattr(args, name) is not None}


def split_resume_id(argv: Sequence[str]) -> list[str]:
    """``--resume BATCH_ID`` → ``--resume --resume-batch BATCH_ID``: argparse cannot tell
    an optional value from the first input, so only a value shaped like a batch id
    (``20261202-184721-3f9a``) is taken as one."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--resume="):
            out += ["--resume", "--resume-batch", item.split("=", 1)[1]]
        elif (item == "--resume" and i + 1 < len(items)
              and batch_journal.looks_like_batch_id(items[i + 1])):
            out += ["--resume", "--resume-batch", items[i + 1]]
            i += 1
        else:
            out.append(item)
        i += 1
    return out


def apply_stored_batch(args: argparse.Namespace, journal: Journal | None) -> None:
    """``--resume BATCH_ID``: the batch's spec and inputs from the journal into ``args``."""
    if args.op or args.steps or args.recipe or args.inputs or args.param:
        raise UsageError("--resume BATCH_ID takes the operation and inputs from the journal: "
                         "give no --op, --steps, --recipe, --param or FILES_OR_FOLDERS with it")
    if not batch_journal.looks_like_batch_id(args.resume_batch):
        raise UsageError(f"--resume {args.resume_batch!r} is not a batch id (they look like "
                         "20261202-184721-3f9a, printed when a batch starts)")
    if journal is None:
        raise UsageError("--resume BATCH_ID needs the batch journal, which cannot be opened")
    try:
        spec, inputs = batch_journal.stored_spec(journal, args.resume_batch)
    except LookupError as exc:
        raise UsageError(str(exc)) from None
    args.op = spec.get("operation")
    args.steps = json.dumps(spec["steps"]) if spec.get("steps") else None
    args.param = [f"{k}={v}" for k, v in (spec.get("raw_params") or {}).items()]
    args.stored_recipe = spec.get("recipe")
    args.name_template = spec.get("name_template")
    for name in OPTION_FIELDS:
        setattr(args, name, (spec.get("encoder") or {}).get(name))
    args.format = spec.get("format")
    args.quality = spec.get("quality")
    args.out = Path(spec["out"]) if spec.get("out") else None
    args.on_conflict = spec.get("on_conflict") or "unique"
    args.inputs = [str(p) for p in inputs]
    args.recursive = False  # the journal holds the files themselves ...
    args.stored_folders = spec.get("folders")  # ... and the sub-folders -r mirrored


def plan_from_args(args: argparse.Namespace) -> BatchPlan:
    if not args.endpoint:
        raise UsageError("--endpoint is required (or set IMAGEFLEET_ENDPOINT)")
    if not (args.op or args.steps or args.recipe or args.stored_recipe):
        raise UsageError("one of the arguments --op --steps --recipe is required")
    if not args.inputs:
        raise UsageError("the following arguments are required: FILES_OR_FOLDERS")
    if args.param and args.steps is not None:
        raise UsageError("--param goes with --op; put a step's parameters in its --steps object")
    if args.recipe is not None:
        given = [flag for flag, value in (("--param", args.param), ("--format", args.format),
                                          ("--quality", args.quality),
                                          *((f"--{name}", getattr(args, name))
                                            for name in OPTION_FIELDS)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} cannot go with --recipe: a recipe sets the "
                             "steps, format, quality and encoder options of each output")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    check_encoder_options(args)
    recipe = None
    if args.stored_recipe is not None:  # --resume BATCH_ID of a recipe's batch
        try:
            recipe = parse_recipe(args.stored_recipe)
        except RecipeError as exc:
            raise UsageError(f"the batch's recipe: {exc}") from None
    if args.recipe is not None:
        try:
            recipe = read_recipe_file(args.recipe)
        except OSError as exc:
            raise UsageError(f"--recipe {args.recipe}: {exc.strerror or exc}") from None
        except RecipeError as exc:
            raise UsageError(f"--recipe: {exc}") from None
    template = None
    if args.name_template is not None:
        try:
            template = parse_template(args.name_template)
        except TemplateError as exc:
            raise UsageError(f"--name-template: {exc}") from None
    steps = parse_steps(args.steps) if args.steps is not None else None
    raw_params = parse_param_pairs(args.param)
    found = expand_inputs_with_folders(args.inputs, recursive=args.recursive)
    if args.stored_folders is not None and len(args.stored_folders) == len(found):
        found = [(path, folder) for (path, _), folder in zip(found, args.stored_folders,
                                                             strict=True)]
    inputs = [path for path, _folder in found]
    return BatchPlan(
        inputs=inputs,
        stems=output_stems(inputs),
        numbers=output_numbers(inputs),
        operation=args.op,
        raw_params=raw_params,
        steps=steps,
        label=pipeline_label(args.op, steps) if recipe is None else recipe.name,
        folders=[folder for _path, folder in found],
        recipe=recipe,
        template=template,
    )


def output_runs(args: argparse.Namespace, plan: BatchPlan,
                operations: Sequence[Any]) -> list[OutputRun]:
    """The outputs of the run, checked against the server's operations (UsageError)."""
    if plan.recipe is not None:
        try:
            recipe = check_recipe(plan.recipe, operations)
            runs = []
            for out in recipe.outputs:
                template = plan.template or parse_template(out.template)
                runs.append(OutputRun(out.name, job_options(recipe, out), OutputNaming(
                    template, output_label(recipe.output_steps(out)), out.format, out.name)))
        except RecipeError as exc:
            raise UsageError(f"--recipe {args.recipe}: {exc}") from None
        return runs
    if plan.operation is not None:
        op = find_operation(operations, plan.operation)
        options: dict[str, Any] = {"operation": plan.operation,
                                   "params": coerce_params(op, plan.raw_params)}
    else:
        options = {"steps": check_steps(operations, plan.steps or [])}
    options.update(format=args.format, quality=args.quality, **encoder_kwargs(args))
    template = plan.template or parse_template(DEFAULT_TEMPLATE)
    return [OutputRun("", options, OutputNaming(template, plan.label, args.format))]


async def run_batch(
    args: argparse.Namespace, plan: BatchPlan, tally: Tally, display: ProgressDisplay, out: TextIO,
    journal: Journal | None = None,
) -> int:
    try:
        if args.ca_file is not None:
            try:
                pinned_context(args.ca_file)  # a bad file is a usage error, before any I/O
            except InvalidRequest as exc:
                raise UsageError(f"--ca-file: {exc}") from None
        client = ImageFleetClient(
            args.endpoint,
            args.token,
            ca_file=args.ca_file,
            concurrency=args.concurrency,
            timeout=Timeout(connect=10.0, read=args.timeout),
            retry=RetryPolicy(attempts=args.attempts, overload_patience=args.patience),
        )
    except InvalidRequest as exc:
        raise UsageError(f"--endpoint: {exc}") from None
    async with client:
        try:
            operations = await client.operations()
        except ClientError as exc:
            display.clear()
            print(f"error: cannot get the operations from {args.endpoint}: {exc}",
                  file=display.stream)
            return EXIT_FAILED
        # Check everything before the first upload: a typo must not cost a batch.
        runs = output_runs(args, plan, operations)
        names = plan_names([(path.name, folder) for path, folder in
                            zip(plan.inputs, plan.folders, strict=True)],
                           [run.naming for run in runs],
                           recipe=plan.recipe.name if plan.recipe else "",
                           run_date=plan.run_date)
        if args.out is not None:
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None
        tally.outputs = len(runs)
        spec = batch_journal.job_spec(
            runs=[(run.name, run.job_options) for run in runs], operation=plan.operation,
            raw_params=plan.raw_params, steps=plan.steps,
            recipe=None if plan.recipe is None else plan.recipe.model_dump(mode="json"),
            name_template=args.name_template, folders=plan.folders,
            encoder=encoder_kwargs(args), format=args.format, quality=args.quality,
            out_dir=args.out, on_conflict=args.on_conflict, recursive=args.recursive)
        display.clear()
        resumed = await batch_journal.prepare(
            journal, spec, plan.inputs, endpoint=args.endpoint, out_dir=args.out,
            outputs=[run.name for run in runs], resume=args.resume,
            batch_id=args.resume_batch, stream=display.stream, announce=not display.is_tty)
        tally.batch_id = resumed.batch_id
        for index, record in sorted(resumed.kept.items()):
            tally.ok += 1  # done before: its lines as they were printed then
            for line in batch_journal.kept_lines(str(plan.inputs[index]), record,
                                                 args.out is not None,
                                                 named=plan.recipe is not None):
                print(line, file=out, flush=True)
        send = resumed.send(len(plan.inputs))
        # one request per output of each image sent: job j is image send[j // n], output j % n
        jobs = (
            Job(plan.inputs[index], **run.job_options, expires_in=args.expires_in,
                name=str(plan.inputs[index]))
            for index in send for run in runs
        )
        stream = client.iter_process(jobs, download=args.out is not None,
                                     progress=display.event)
        pending = [len(runs)] * len(plan.inputs)
        failed = [False] * len(plan.inputs)
        async with contextlib.aclosing(stream):
            async for sent in stream:
                image = send[sent.index // len(runs)]
                which = sent.index % len(runs)
                outcome = replace(sent, index=image * len(runs) + which)
                saved, line = _finish(outcome, plan, runs, names[image][which], args.out,
                                      OnConflict(args.on_conflict), tally,
                                      reuse_identical=resumed.resumed)
                pending[image] -= 1
                failed[image] = failed[image] or not saved.ok
                if not saved.ok:
                    tally.failed_outputs += 1
                if pending[image] == 0:  # an image counts once all its outputs are in
                    if failed[image]:
                        tally.failed += 1
                    else:
                        tally.ok += 1
                _journal_outcome(journal, resumed.batch_id, image, runs[which].name, saved,
                                 line, args.out is not None)
                display.clear()
                print(line, file=out, flush=True)
                label = str(plan.inputs[image]) + (f" → {runs[which].name}"
                                                   if plan.recipe is not None else "")
                display.finished(saved, label)
        if journal is not None and resumed.batch_id is not None:
            journal.finish(resumed.batch_id)
    return EXIT_OK if tally.failed == 0 else EXIT_FAILED


def _journal_outcome(journal: Journal | None, batch_id: str | None, image: int, output: str,
                     outcome: JobOutcome, line: str, with_out: bool) -> None:
    """Record one finished output of an image (queued: the journal's thread writes it)."""
    if journal is None or batch_id is None:
        return
    result = outcome.result
    if outcome.ok and result is not None:
        saved = line.rsplit("\t", 1)[1] if with_out else None  # the line's last field
        journal.record_done(batch_id, image, key=result.key, url=result.url, output=output,
                            expires_at=result.expires_at, instance_id=result.instance_id,
                            format=result.format, width=result.width,
                            height=result.height, bytes=result.bytes,
                            saved_path=saved if saved and not saved.startswith("skipped:")
                            else None, hash_path=Path(outcome.job.image)
                            if isinstance(outcome.job.image, Path) else None)
    else:
        journal.record_failed(batch_id, image, " ".join(str(outcome.error).split()), output)


def _finish(outcome: JobOutcome, plan: BatchPlan, runs: Sequence[OutputRun], planned: PlannedName,
            out_dir: Path | None, on_conflict: OnConflict = OnConflict.UNIQUE,
            tally: Tally | None = None, *,
            reuse_identical: bool = False) -> tuple[JobOutcome, str]:
    """Save a downloaded result if asked; return the outcome and its stdout line."""
    image, which = divmod(outcome.index, len(runs))
    source = str(plan.inputs[image])
    # a recipe's lines name the output too: FILE OUTPUT URL INSTANCE [SAVED]
    head = [source, runs[which].name] if plan.recipe is not None else [source]
    if outcome.ok and outcome.result is not None:
        result = outcome.result
        fields = [*head, result.url, result.instance_id]
        if out_dir is not None and outcome.data is not None:
            final = planned.with_result(result.width, result.height, result.format)
            folder = out_dir / final.folder if final.folder else out_dir
            target = folder / next(final.candidates())
            try:
                folder.mkdir(parents=True, exist_ok=True)
                # a resumed image may have been saved just before the batch stopped (the
                # journal had not recorded it yet): the same bytes under one of its names
                # are that save, not a name taken by another file
                earlier = (identical_file(folder, final.candidates(), outcome.data)
                           if reuse_identical and on_conflict is OnConflict.UNIQUE else None)
                written = earlier or save_result(folder, final.candidates(), outcome.data,
                                                 on_conflict, natural=final.natural())
            except OSError as exc:
                error = ClientError(f"cannot write {target}: {exc.strerror or exc}")
                return JobOutcome(outcome.index, outcome.job, result, error), \
                    "\t".join([*head, "FAILED", str(error)])
            if tally is not None:
                tally.saves[written.action] += 1
            fields.append(str(written.path) if written.saved
                          else f"skipped: {written.path} exists")
        return outcome, "\t".join(fields)
    reason = " ".join(str(outcome.error).split())  # one line, whatever the server said
    return outcome, "\t".join([*head, "FAILED", reason])


def identical_file(folder: Path, names: Iterable[str], data: bytes) -> SaveOutcome | None:
    """The first of ``names`` in ``folder`` holding exactly ``data``, up to the first free
    name (the names a unique save would have tried)."""
    for name in names:
        target = folder / name
        try:
            if target.stat().st_size == len(data) and target.read_bytes() == data:
                return SaveOutcome(target, SaveAction.WRITTEN)
        except FileNotFoundError:
            return None
        except OSError:
            continue
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(split_resume_id(sys.argv[1:] if argv is None else argv))
    journal: Journal | None = None
    try:
        try:
            history_days = batch_journal.history_days()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if args.resume_batch is not None:
            journal = batch_journal.open_journal(sys.stderr)
            apply_stored_batch(args, journal)
        plan = plan_from_args(args)
    except UsageError as exc:
        if journal is not None:
            journal.close()
        parser.error(str(exc))  # exits with status 2
    if journal is None:
        journal = batch_journal.open_journal(sys.stderr)
    if journal is not None:
        journal.prune(history_days)  # queued: the writer prunes while the batch starts
    tally = Tally(total=len(plan.inputs))
    display = ProgressDisplay(sys.stderr, tally, is_tty=sys.stderr.isatty())
    try:
        return _run(args, plan, tally, display, journal, parser.prog)
    finally:
        if journal is not None:
            journal.close()  # what finished is committed before the process ends


def _run(args: argparse.Namespace, plan: BatchPlan, tally: Tally, display: ProgressDisplay,
         journal: Journal | None, prog: str) -> int:
    try:
        code = asyncio.run(run_batch(args, plan, tally, display, sys.stdout, journal))
    except UsageError as exc:
        display.clear()
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        display.clear()
        print(f"interrupted: {tally.summary(cancelled=True)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `| head`); stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    display.clear()
    if tally.total and (tally.finished or code == EXIT_OK):
        print(tally.summary(), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
