"""Process many images through an ImageFleet endpoint from the command line.

    python -m scripts.process --endpoint URL [--token T] [--ca-file PEM]
        (--op NAME [--param k=v ...] | --steps JSON) [--format F] [--concurrency N]
        [--out DIR] FILES_OR_FOLDERS...

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

A busy fleet (503 ``overloaded``) is waited for, not failed: such answers are retried
for up to ``--patience`` seconds without using ``--attempts``, and the client keeps
fewer requests in flight while they come (see gui/client.py), so ``--concurrency 64``
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gui.client import (
    ClientError,
    ImageFleetClient,
    InvalidRequest,
    Job,
    JobOutcome,
    OperationSpec,
    ParamSpec,
    ProgressEvent,
    RetryPolicy,
    Timeout,
    pinned_context,
)
from gui.naming import (
    ON_CONFLICT_CHOICES,
    OnConflict,
    SaveAction,
    candidate_names,
    extension_for,  # noqa: F401 - part of this module's interface since before gui.naming
    output_numbers,
    output_stems,
    pipeline_label,
    result_name,
    save_result,
)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
FORMATS = ("png", "jpeg", "webp")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_EXPIRES_IN = 7 * 24 * 3600
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})


class UsageError(Exception):
    """A mistake in the command line; reported with exit status 2."""


# --------------------------------------------------------------------------- pure helpers


def expand_inputs(arguments: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Files as given, folders as their image files (sorted); duplicates dropped.

    A file named explicitly is taken whatever its extension (the server says if it
    is not an image). Raises UsageError for a missing path or when nothing is left.
    """
    missing = [arg for arg in arguments if not Path(arg).exists()]
    if missing:
        raise UsageError("no such file or folder: " + ", ".join(missing))
    found: list[Path] = []
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
        else:
            candidates = [path]
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                found.append(candidate)
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


def describe_param(spec: ParamSpec) -> str:
    """``ksize (int 1..151, default 15)``: what a user may pass."""
    if spec.type == "choice":
        allowed = "one of " + "|".join(str(c) for c in spec.choices or ())
    elif spec.type == "bool":
        allowed = "bool"
    else:
        low = "" if spec.min is None else _number(spec.min)
        high = "" if spec.max is None else _number(spec.max)
        allowed = f"{spec.type} {low}..{high}" if low or high else spec.type
    return f"{spec.name} ({allowed}, default {spec.default!r})"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def coerce_value(spec: ParamSpec, value: Any) -> Any:
    """Type ``value`` (text from the command line, or a JSON value) by ``spec``.

    Raises UsageError naming the parameter and what it allows.
    """
    what = f"parameter {spec.name}={value!r} is invalid: expected {describe_param(spec)}"
    if spec.type == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise UsageError(what)
    if spec.type == "choice":
        choices = spec.choices or ()
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise UsageError(what)
    if spec.type in ("int", "float"):
        number: float
        try:
            if isinstance(value, bool):
                raise ValueError
            if spec.type == "int":
                number = value if isinstance(value, int) else int(str(value).strip())
            else:
                number = float(value)
        except (TypeError, ValueError):
            raise UsageError(what) from None
        if math.isnan(number) or math.isinf(number):
            raise UsageError(what)
        if (spec.min is not None and number < spec.min) or (
            spec.max is not None and number > spec.max
        ):
            raise UsageError(what)
        return number
    # A type this client does not know yet: pass JSON-looking text through typed.
    return guess_value(value) if isinstance(value, str) else value


def guess_value(text: str) -> Any:
    """Text → its JSON value if it parses (``5`` → 5, ``true`` → True), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_operation(operations: Sequence[OperationSpec], name: str) -> OperationSpec:
    for op in operations:
        if op.name == name:
            return op
    valid = ", ".join(op.name for op in operations)
    raise UsageError(f"unknown operation {name!r}; valid operations: {valid}")


def coerce_params(op: OperationSpec, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check names against ``op`` and type every value; UsageError lists the valid ones."""
    params: dict[str, Any] = {}
    for name, value in raw.items():
        spec = op.param(name)
        if spec is None:
            valid = "; ".join(describe_param(p) for p in op.params) or "none"
            raise UsageError(
                f"unknown parameter {name!r} for {op.name}; valid parameters: {valid}"
            )
        params[name] = coerce_value(spec, value)
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


def check_steps(operations: Sequence[OperationSpec], steps: list[dict[str, Any]]) -> list[dict]:
    """Validate each step's operation and parameters against the server's list."""
    checked = []
    for step in steps:
        op = find_operation(operations, step["op"])
        params = coerce_params(op, {k: v for k, v in step.items() if k != "op"})
        checked.append({"op": op.name, **params})
    return checked


# --------------------------------------------------------------------------- progress


@dataclass
class Tally:
    """Counts for the progress line and the summary."""

    total: int
    started: float = field(default_factory=time.monotonic)
    ok: int = 0
    failed: int = 0
    busy: int = 0  # back-pressure answers (503 overloaded) waited out and retried
    saves: dict[SaveAction, int] = field(default_factory=lambda: dict.fromkeys(SaveAction, 0))

    @property
    def finished(self) -> int:
        return self.ok + self.failed

    def summary(self, *, cancelled: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.finished / elapsed if elapsed > 0 else 0.0
        text = f"{self.ok} ok, {self.failed} failed in {elapsed:.1f} s ({rate:.2f} images/s)"
        renamed, skipped, overwritten = (self.saves[SaveAction.RENAMED],
                                         self.saves[SaveAction.SKIPPED],
                                         self.saves[SaveAction.OVERWRITTEN])
        if renamed or skipped or overwritten:
            text += f"; {renamed} renamed, {skipped} skipped, {overwritten} overwritten"
        if self.busy:
            text += f"; server busy {self.busy} times"
        if cancelled:
            text += f"; cancelled with {self.total - self.finished} not finished"
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

    def redraw(self) -> None:
        if self.is_tty:
            self._draw(time.monotonic())

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
               "<stem>-2, <stem>-3, ... in input order.",
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
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--op", metavar="NAME", help="operation name (see GET /operations)")
    what.add_argument("--steps", metavar="JSON",
                      help='a pipeline, e.g. \'[{"op": "grayscale"}, {"op": "gaussian_blur", '
                           '"ksize": 5}]\'')
    parser.add_argument("--param", metavar="NAME=VALUE", action="append", default=[],
                        help="an operation parameter; repeat for several (with --op)")
    parser.add_argument("--format", type=_format, help="output format: png, jpeg or webp "
                        "(default: the input's)")
    parser.add_argument("--quality", type=_bounded_int(1, 100), help="JPEG/WebP quality 1-100")
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
    parser.add_argument("inputs", nargs="+", metavar="FILES_OR_FOLDERS")
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
class Plan:
    """What to run, decided from the arguments before any image is uploaded."""

    inputs: list[Path]
    stems: list[str]
    numbers: list[int]  # each stem's number: 1 = the input's own, n = <stem>-n
    operation: str | None
    raw_params: dict[str, str]
    steps: list[dict[str, Any]] | None
    label: str


def plan_from_args(args: argparse.Namespace) -> Plan:
    if not args.endpoint:
        raise UsageError("--endpoint is required (or set IMAGEFLEET_ENDPOINT)")
    if args.param and args.steps is not None:
        raise UsageError("--param goes with --op; put a step's parameters in its --steps object")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    steps = parse_steps(args.steps) if args.steps is not None else None
    raw_params = parse_param_pairs(args.param)
    inputs = expand_inputs(args.inputs, recursive=args.recursive)
    return Plan(
        inputs=inputs,
        stems=output_stems(inputs),
        numbers=output_numbers(inputs),
        operation=args.op,
        raw_params=raw_params,
        steps=steps,
        label=pipeline_label(args.op, steps),
    )


async def run_batch(
    args: argparse.Namespace, plan: Plan, tally: Tally, display: ProgressDisplay, out: TextIO
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
        if plan.operation is not None:
            op = find_operation(operations, plan.operation)
            params: dict[str, Any] | None = coerce_params(op, plan.raw_params)
            steps = None
        else:
            params = None
            steps = check_steps(operations, plan.steps or [])
        if args.out is not None:
            try:
                args.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UsageError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None
        jobs = (
            Job(path, operation=plan.operation, params=params, steps=steps, format=args.format,
                quality=args.quality, expires_in=args.expires_in, name=str(path))
            for path in plan.inputs
        )
        stream = client.iter_process(jobs, download=args.out is not None,
                                     progress=display.event)
        async with contextlib.aclosing(stream):
            async for outcome in stream:
                saved, line = _finish(outcome, plan, args.out, OnConflict(args.on_conflict),
                                      tally)
                if saved.ok:
                    tally.ok += 1
                else:
                    tally.failed += 1
                display.clear()
                print(line, file=out, flush=True)
                display.finished(saved, str(plan.inputs[saved.index]))
    return EXIT_OK if tally.failed == 0 else EXIT_FAILED


def _finish(outcome: JobOutcome, plan: Plan, out_dir: Path | None,
            on_conflict: OnConflict = OnConflict.UNIQUE,
            tally: Tally | None = None) -> tuple[JobOutcome, str]:
    """Save a downloaded result if asked; return the outcome and its stdout line."""
    source = str(plan.inputs[outcome.index])
    if outcome.ok and outcome.result is not None:
        result = outcome.result
        fields = [source, result.url, result.instance_id]
        if out_dir is not None and outcome.data is not None:
            source_path = plan.inputs[outcome.index]
            names = candidate_names(source_path.stem, plan.label, result.format, plan.stems,
                                    plan.numbers[outcome.index])
            target = out_dir / result_name(plan.stems[outcome.index], plan.label,
                                           result.format)
            try:
                written = save_result(out_dir, names, outcome.data, on_conflict,
                                      natural=result_name(source_path.stem, plan.label,
                                                          result.format))
            except OSError as exc:
                error = ClientError(f"cannot write {target}: {exc.strerror or exc}")
                return JobOutcome(outcome.index, outcome.job, result, error), \
                    f"{source}\tFAILED\t{error}"
            if tally is not None:
                tally.saves[written.action] += 1
            fields.append(str(written.path) if written.saved
                          else f"skipped: {written.path} exists")
        return outcome, "\t".join(fields)
    reason = " ".join(str(outcome.error).split())  # one line, whatever the server said
    return outcome, f"{source}\tFAILED\t{reason}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
    except UsageError as exc:
        parser.error(str(exc))  # exits with status 2
    tally = Tally(total=len(plan.inputs))
    display = ProgressDisplay(sys.stderr, tally, is_tty=sys.stderr.isatty())
    try:
        code = asyncio.run(run_batch(args, plan, tally, display, sys.stdout))
    except UsageError as exc:
        display.clear()
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
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
