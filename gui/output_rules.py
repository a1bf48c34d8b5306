"""Output rules: the name template, mirrored sub-folders and the batch's numbering.

One module for the command line (``python -m scripts.process --name-template``) and the
desktop app (Save all, the name preview), so the same inputs get the same names from
both. No Tk, no I/O: writing goes through :func:`gui.naming.save_result`, which applies
the conflict policy (unique, overwrite, skip) to the candidate names made here.

A template is Python format syntax over these fields:

``{stem}`` the input's name without its suffix, ``{ext}`` the result's extension
(``jpg`` for JPEG), ``{op}`` the pipeline (``resize+grayscale``), ``{recipe}`` and
``{output}`` the recipe's and the output's names, ``{width}``/``{height}`` of the
result, ``{n}`` the input's position in the batch (from 1; ``{n:04}`` → ``0007``) and
``{date}`` the day of the run (``YYYY-MM-DD``). Any format spec that suits the value is
allowed (``{n:04}``, ``{width:05d}``, ``{stem:.20}``).

``{width}`` and ``{height}`` are known only once the server has answered, and ``{ext}``
too when the output keeps the input's format. :func:`render` leaves such a field as
``{width}`` and says the name is incomplete; the preview shows exactly that, and the
names written are the same function's answer once the values are known.

Inputs of one batch that would get the same name (in the same folder) are told apart in
input order: the first keeps the name, the next ones get ``-2``, ``-3``, ... on the stem
(or before the extension when the template has no ``{stem}``). Names are decided before
the run from what is known then, so they never depend on which image finishes first.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import PurePosixPath

from gui.naming import extension_for, numbered

DEFAULT_TEMPLATE = "{stem}.{op}.{ext}"
FIELDS = ("stem", "ext", "op", "recipe", "output", "width", "height", "n", "date")
LATE_FIELDS = frozenset({"width", "height"})  # known after processing only
_INT_FIELDS = frozenset({"width", "height", "n"})
_SAMPLE = {"stem": "photo", "ext": "jpg", "op": "resize", "recipe": "web", "output": "large",
           "width": 2048, "height": 1365, "n": 7, "date": "2026-01-31"}
MAX_NAME_BYTES = 255  # what common file systems allow for one name
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')  # separators, controls, Windows' reserved
_DOTS = re.compile(r"\.{2,}")


class TemplateError(ValueError):
    """A name template that cannot be used; the message says what is wrong and what is
    allowed."""


@dataclass(frozen=True)
class NameTemplate:
    """A checked template; ``fields`` are the ones it uses."""

    text: str
    fields: frozenset[str]
    # (literal, field or None, format spec): parsed once, rendered many times
    parts: tuple[tuple[str, str | None, str], ...] = ()

    @property
    def has_late_fields(self) -> bool:
        return bool(self.fields & LATE_FIELDS)


@functools.lru_cache(maxsize=64)
def parse_template(text: str) -> NameTemplate:
    """Check a template; raises TemplateError naming the problem and the allowed fields.
    (Cached: a batch names thousands of results from the same few templates.)"""
    allowed = ", ".join("{" + name + "}" for name in FIELDS)
    if not text or not text.strip():
        raise TemplateError(f"the name template is empty; use fields {allowed}, "
                            f"e.g. {DEFAULT_TEMPLATE}")
    try:
        parts = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise TemplateError(f"name template {text!r}: {exc} (write {{{{ and }}}} for a "
                            "literal brace)") from None
    used: set[str] = set()
    literal = ""
    for prefix, name, spec, conversion in parts:
        literal += prefix
        if name is None:
            continue
        if name == "":
            raise TemplateError(f"name template {text!r} has an empty field {{}}; "
                                f"use one of {allowed}")
        if name not in FIELDS:
            raise TemplateError(f"name template {text!r}: unknown field {{{name}}}; "
                                f"the fields are {allowed}")
        if conversion:
            raise TemplateError(f"name template {text!r}: {{{name}!{conversion}}} is not "
                                "allowed; use a format spec like {n:04}")
        if spec and "{" in spec:
            raise TemplateError(f"name template {text!r}: nested fields in {{{name}:{spec}}} "
                                "are not allowed")
        try:
            format(_SAMPLE[name], spec or "")
        except (ValueError, TypeError) as exc:
            kind = "a whole number" if name in _INT_FIELDS else "text"
            raise TemplateError(f"name template {text!r}: bad format spec {spec!r} for "
                                f"{{{name}}} ({kind}): {exc}") from None
        used.add(name)
    if "/" in literal or "\\" in literal:
        raise TemplateError(f"name template {text!r} must not contain / or \\: it names a "
                            "file; sub-folders come from the inputs' folders")
    return NameTemplate(text, frozenset(used),
                        tuple((prefix, name, spec or "") for prefix, name, spec, _c in parts))


@dataclass(frozen=True)
class NameFields:
    """The values one result's name is made of; ``None`` = not known yet."""

    stem: str
    op: str
    ext: str | None = None
    recipe: str = ""
    output: str = ""
    n: int = 1
    date: str = ""
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class RenderedName:
    name: str
    complete: bool  # False: some field is shown as {field} until the result is known


def sanitise(name: str) -> str:
    """A file name that stays in its folder: no separators, control characters or
    characters Windows refuses, no ``..``, not hidden, not empty, at most 255 bytes
    (the extension is kept when it is cut)."""
    clean = _DOTS.sub(".", _UNSAFE.sub("_", name)).strip(" ")
    clean = clean.lstrip(".") or "_"
    if len(clean.encode()) > MAX_NAME_BYTES:
        stem, dot, ext = clean.rpartition(".")
        keep = MAX_NAME_BYTES - (len(ext.encode()) + 1 if dot and len(ext) <= 8 else 0)
        cut = (stem if dot and len(ext) <= 8 else clean).encode()[:keep].decode(
            errors="ignore")
        clean = f"{cut}.{ext}" if dot and len(ext) <= 8 else cut
    return clean


def render(template: NameTemplate, values: NameFields, number: int = 1) -> RenderedName:
    """The one function behind both the preview and the names written.

    ``number`` > 1 tells apart inputs of the batch that would share a name (``-N``, on
    the stem when the template has one, else before the extension)."""
    stem = values.stem if number == 1 else numbered(values.stem, number)
    out: list[str] = []
    complete = True
    for prefix, name, spec in template.parts:
        out.append(prefix)
        if name is None:
            continue
        value = stem if name == "stem" else getattr(values, name)
        if value is None:
            out.append("{" + name + "}")  # shown as the field until it is known
            complete = False
        else:
            out.append(format(value, spec))
    text = "".join(out)
    if number > 1 and "stem" not in template.fields:
        base, dot, ext = text.rpartition(".")
        text = f"{base}-{number}.{ext}" if dot and base else f"{text}-{number}"
    return RenderedName(sanitise(text), complete)


@dataclass(frozen=True)
class OutputNaming:
    """One output of a run, as naming sees it."""

    template: NameTemplate
    op: str  # the pipeline label of this output's steps
    format: str | None  # None: the input's format (known after processing)
    output: str = ""
    recipe: str = ""  # when set, this output's {recipe} (else the batch's)


@dataclass(frozen=True)
class PlannedName:
    """Where one result (an input's output) goes, decided before the run."""

    folder: str  # relative to the target folder, "" or "a/b" (mirrored from the input)
    template: NameTemplate
    fields: NameFields
    number: int  # 1 = its own name, n = told apart as -n
    claimed: frozenset[str] = field(default=frozenset(), repr=False)

    def preview(self) -> RenderedName:
        return render(self.template, self.fields, self.number)

    def relative(self, name: str) -> str:
        return str(PurePosixPath(self.folder) / name) if self.folder else name

    def with_result(self, width: int, height: int, image_format: str) -> PlannedName:
        """The same name with what the server answered filled in."""
        ext = self.fields.ext or extension_for(image_format)
        return replace(self, fields=replace(self.fields, width=width, height=height, ext=ext))

    def natural(self) -> str:
        """The name the result would have with no other input of the batch in the way."""
        return render(self.template, self.fields, 1).name

    def candidates(self) -> Iterator[str]:
        """Its name, then the next free numbers (endless) for the ``unique`` policy,
        leaving out names other results of the batch own in the same folder."""
        yield render(self.template, self.fields, self.number).name
        n = max(2, self.number + 1)
        while True:
            name = render(self.template, self.fields, n)
            if _key(self.folder, render(self.template, _unknown(self.fields), n).name) \
                    not in self.claimed:
                yield name.name
            n += 1


def _unknown(values: NameFields) -> NameFields:
    """What is known before the run: the key batch names are told apart by."""
    if values.width is None and values.height is None:
        return values
    return replace(values, width=None, height=None)


def _stem(file_name: str) -> str:
    """``Path(file_name).stem`` without building a Path (thousands per batch)."""
    dot = file_name.rfind(".")
    return file_name[:dot] if 0 < dot < len(file_name) - 1 else file_name


def _key(folder: str, name: str) -> str:
    return f"{folder.lower()}/{name.lower()}"  # some file systems ignore case


def mirrored_folder(path: PurePosixPath | str, root: str | None) -> str:
    """``root/a/b/x.jpg`` → ``a/b``; "" for a file given by itself (``root`` None)."""
    if root is None:
        return ""
    parent = PurePosixPath(str(path)).parent
    try:
        relative = parent.relative_to(PurePosixPath(root))
    except ValueError:
        return ""
    return "" if str(relative) == "." else str(relative)


def plan_names(inputs: Sequence[tuple[str, str]], outputs: Sequence[OutputNaming], *,
               recipe: str = "", run_date: date | None = None) -> list[list[PlannedName]]:
    """Names for every (input, output) of a batch: ``inputs`` are (file name, mirrored
    folder) in input order; the answer is one list per input, one entry per output.

    Pure and O(results): the same call makes the preview and the names written."""
    return plan_batch_names([(name, folder, outputs) for name, folder in inputs],
                            recipe=recipe, run_date=run_date)


def plan_batch_names(inputs: Sequence[tuple[str, str, Sequence[OutputNaming]]], *,
                     recipe: str = "", run_date: date | None = None
                     ) -> list[list[PlannedName]]:
    """:func:`plan_names` where each input has outputs of its own (the app's images may
    have been made with different settings): (file name, folder, outputs) per input."""
    day = (run_date or date.today()).isoformat()
    rows: list[list[tuple[str, NameTemplate, NameFields]]] = []
    for index, (file_name, folder, outputs) in enumerate(inputs, start=1):
        stem = _stem(file_name)
        rows.append([(folder, out.template, NameFields(
            stem=stem, op=out.op, ext=extension_for(out.format) if out.format else None,
            recipe=out.recipe or recipe, output=out.output, n=index, date=day))
            for out in outputs])
    # First come, first served in input order; the later ones take the next number
    # whose name no result of the batch owns. Compared on what is known before the run.
    keys = [[_key(folder, render(template, _unknown(values)).name)
             for folder, template, values in row] for row in rows]
    claimed = {key for row in keys for key in row}
    seen: set[str] = set()
    numbers: list[list[int]] = []
    for row, row_keys in zip(rows, keys, strict=True):
        row_numbers = []
        for (folder, template, values), key in zip(row, row_keys, strict=True):
            n = 1
            if key in seen:
                n = 2
                while (taken := _key(folder, render(template, _unknown(values), n).name)) \
                        in claimed:
                    n += 1
                claimed.add(taken)
            seen.add(key)
            row_numbers.append(n)
        numbers.append(row_numbers)
    frozen = frozenset(claimed)
    return [[PlannedName(folder, template, values, n, frozen)
             for (folder, template, values), n in zip(row, row_numbers, strict=True)]
            for row, row_numbers in zip(rows, numbers, strict=True)]


def preview_lines(planned: Sequence[Sequence[PlannedName]], limit: int = 5) -> list[str]:
    """The first names of a plan, as the preview shows them (``{width}`` until known)."""
    lines = []
    for row in planned:
        for item in row:
            if len(lines) == limit:
                return lines
            lines.append(item.relative(item.preview().name))
    return lines


def explain_preview(planned: Sequence[Sequence[PlannedName]]) -> str:
    """The note under the preview when some names are only complete after the run."""
    late = sorted({name for row in planned for item in row
                   for name in ("width", "height", "ext")
                   if getattr(item.fields, name) is None and name in item.template.fields})
    if not late:
        return ""
    shown = ", ".join("{" + name + "}" for name in late)
    return f"{shown}: filled in from each result (known after processing)."


def output_label(steps: Sequence[Mapping[str, object]]) -> str:
    """``resize+grayscale``: the ``{op}`` of a list of steps."""
    return "+".join(str(step["op"]) for step in steps) or "original"
