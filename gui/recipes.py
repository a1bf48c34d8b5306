"""Recipes: a named pipeline plus one or more outputs, kept as small JSON files.

A recipe file (``version`` 1)::

    {"version": 1, "name": "web",
     "steps": [{"op": "rotate", "angle": 0}],
     "outputs": [
       {"name": "large", "steps": [{"op": "resize", "width": 2048}], "format": "jpeg",
        "quality": 85, "template": "{stem}.{output}.{ext}"},
       {"name": "thumb", "steps": [{"op": "resize", "width": 256}], "format": "webp"}]}

Every output runs the shared ``steps`` then its own ``steps`` (one request per output:
the server's result keys are content-addressed, so outputs never mix). The encoder
fields (``progressive``, ``subsampling``, ``lossless``, ``icc``, ``metadata``) are
optional; unset means the server's default.

Two checks: :func:`parse_recipe` the file's shape (pydantic; version, types, the name
template), :func:`check_recipe` the steps against the server's ``GET /operations``
(unknown operation, unknown or out-of-range parameter: refused with the allowed range
or choices). :class:`RecipeStore` saves, loads, renames and deletes recipes in the
user's config folder, next to the settings, with atomic writes. No Tk.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gui.client import Job, OperationSpec
from gui.opspecs import SpecError, check_steps
from gui.output_rules import DEFAULT_TEMPLATE, TemplateError, parse_template
from server.atomic import write_atomic as write_file

RECIPE_VERSION = 1
RECIPE_FORMATS = ("png", "jpeg", "webp", "avif")
ENCODER_FIELDS = ("progressive", "subsampling", "lossless", "icc", "metadata")
MAX_OUTPUTS = 16
MAX_RECIPE_BYTES = 256 * 1024  # a recipe is a few hundred bytes; refuse anything huge
_NAME = re.compile(r"^[^\x00-\x1f/\\]{1,80}$")


class RecipeError(ValueError):
    """A recipe that cannot be used; ``problems`` names each reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _check_steps_shape(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, step in enumerate(steps):
        if not isinstance(step.get("op"), str) or not step["op"]:
            raise ValueError(f'step {i + 1} needs an "op" naming the operation, like '
                             '{"op": "resize", "width": 512}')
    return steps


Steps = Annotated[list[dict[str, Any]], Field(default_factory=list)]


class RecipeOutput(BaseModel):
    """One result per input: the shared pipeline, this tail, this encoding, this name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "out"
    steps: Steps
    format: str | None = None  # one of RECIPE_FORMATS; None: the input's format
    quality: Annotated[int, Field(ge=1, le=100)] | None = None
    template: str = DEFAULT_TEMPLATE
    progressive: bool | None = None
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] | None = None
    lossless: bool | None = None
    icc: Literal["srgb", "keep"] | None = None
    metadata: Literal["strip", "keep-no-location", "keep"] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("an output's name is 1 to 80 characters, without / or \\")
        return value

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _check_steps_shape(value)

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is None:
            return None
        fmt = {"jpg": "jpeg"}.get(value.lower(), value.lower())
        if fmt not in RECIPE_FORMATS:
            raise ValueError(f"format {value!r} is not one of {', '.join(RECIPE_FORMATS)} "
                             "(leave it out to keep the input's format)")
        return fmt

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            parse_template(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
        return value

    def encoder_options(self) -> dict[str, Any]:
        """The encoder fields that are set (the others stay the server's default)."""
        return {name: getattr(self, name) for name in ENCODER_FIELDS
                if getattr(self, name) is not None}


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    name: str
    steps: Steps
    outputs: Annotated[list[RecipeOutput], Field(min_length=1, max_length=MAX_OUTPUTS)]

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if value != RECIPE_VERSION or isinstance(value, bool):
            raise ValueError(f"recipe version {value!r} is not supported: this ImageFleet "
                             f"reads version {RECIPE_VERSION} (a newer ImageFleet may have "
                             "written it)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value) or not value.strip():
            raise ValueError("a recipe's name is 1 to 80 characters, without / or \\")
        return value.strip()

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return _check_steps_shape(value)

    @model_validator(mode="after")
    def _distinct_outputs(self) -> Recipe:
        names = [out.name.lower() for out in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError("every output needs its own name (compared ignoring case)")
        if not self.steps and any(not out.steps for out in self.outputs):
            raise ValueError("an output has no steps to run: give the recipe or that "
                             "output steps")
        return self

    def output_steps(self, output: RecipeOutput) -> list[dict[str, Any]]:
        """What one output's request runs: the shared pipeline, then its tail."""
        return [dict(step) for step in (*self.steps, *output.steps)]

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2) + "\n"


def _where(loc: Sequence[Any]) -> str:
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item + 1}]"] if parts else [f"[{item + 1}]"]
        elif item not in ("function-after", "function-before", "literal", "int",
                          "constrained-int"):
            parts.append(str(item))
    return ".".join(parts) or "recipe"


def _describe(error: Mapping[str, Any]) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    where = _where(error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (see the README's Batch recipes for the fields)"
    if error["type"] == "missing":
        return f"{where}: missing"
    if error["type"] in ("less_than_equal", "greater_than_equal", "int_parsing", "int_type"):
        return f"{where}: must be a whole number from 1 to 100, got {error.get('input')!r}"
    return f"{where}: {message}"


def parse_recipe(data: Any) -> Recipe:
    """A recipe from parsed JSON; raises RecipeError listing every problem of its shape."""
    if not isinstance(data, dict):
        raise RecipeError(["a recipe is a JSON object with version, name, steps, outputs"])
    if "version" not in data:
        raise RecipeError([f"recipe has no version (this ImageFleet reads version "
                           f"{RECIPE_VERSION})"])
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        # a wrong version makes the other errors meaningless: say that one alone
        errors = exc.errors()
        version = [e for e in errors if e["loc"][:1] == ("version",)]
        raise RecipeError([_describe(e) for e in (version or errors)]) from None


def load_recipe_text(text: str, source: str = "recipe") -> Recipe:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecipeError([f"{source} is not valid JSON (line {exc.lineno}: {exc.msg})"]) \
            from None
    try:
        return parse_recipe(data)
    except RecipeError as exc:
        raise RecipeError([f"{source}: {p}" for p in exc.problems]) from None


def read_recipe_file(path: Path) -> Recipe:
    """Import: a recipe from a JSON file anywhere. Raises RecipeError (OSError too)."""
    with open(path, "rb") as handle:
        raw = handle.read(MAX_RECIPE_BYTES + 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError([f"{path} is larger than {MAX_RECIPE_BYTES // 1024} KiB: not a "
                           "recipe"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError([f"{path} is not UTF-8 text: not a recipe"]) from None
    return load_recipe_text(text, str(path))


def check_recipe(recipe: Recipe, operations: Sequence[OperationSpec]) -> Recipe:
    """The recipe with every step checked and typed by the server's operation specs.

    Raises RecipeError naming each step that is wrong (``outputs[2] (thumb) step 1:
    parameter width=99999 is invalid: expected width (int 0..32768, default 0)``)."""
    problems: list[str] = []

    def checked(where: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        typed = []
        for i, step in enumerate(steps, start=1):
            try:
                typed.extend(check_steps(operations, [step]))
            except SpecError as exc:
                problems.append(f"{where} step {i}: {exc}")
        return typed

    steps = checked("steps", recipe.steps)
    outputs = [out.model_copy(update={"steps": checked(
        f"outputs[{n}] ({out.name})", out.steps)}) for n, out in enumerate(recipe.outputs, 1)]
    if problems:
        raise RecipeError(problems)
    return recipe.model_copy(update={"steps": steps, "outputs": outputs})


def wired_encoder_fields() -> frozenset[str]:
    """The encoder fields this version's client sends (the ones ``Job`` carries)."""
    return frozenset(f.name for f in dataclasses.fields(Job)) & frozenset(ENCODER_FIELDS)


def job_options(recipe: Recipe, output: RecipeOutput) -> dict[str, Any]:
    """Keyword arguments for ``Job``/``ImageFleetClient.process`` for one output: its
    steps, format and quality as today, and the encoder fields only when set.

    A set field this client cannot send is refused, never dropped in silence."""
    options = output.encoder_options()
    unsupported = sorted(set(options) - wired_encoder_fields())
    if unsupported:
        raise RecipeError([f"output {output.name!r} sets {', '.join(unsupported)}, which "
                           "this version's client cannot send yet; remove it or update "
                           "ImageFleet"])
    return {"steps": recipe.output_steps(output), "format": output.format,
            "quality": output.quality, **options}


def recipe_from_single(name: str, steps: Sequence[Mapping[str, Any]], image_format: str | None,
                       quality: int | None, template: str = DEFAULT_TEMPLATE) -> Recipe:
    """A one-output recipe from what the Process view shows (Save as recipe)."""
    return parse_recipe({
        "version": RECIPE_VERSION, "name": name,
        "steps": [dict(step) for step in steps],
        "outputs": [{"name": "out", "format": image_format,
                     "quality": quality if image_format in ("jpeg", "webp", "avif") else None,
                     "template": template}],
    })


# --------------------------------------------------------------------------- the store


def recipes_dir(config_path: Path) -> Path:
    """Recipes live beside the settings file (``<config>/imagefleet/recipes/``)."""
    return config_path.parent / "recipes"


def _file_name(name: str) -> str:
    """A recipe's file: its name made safe (the name itself is kept inside the file)."""
    safe = re.sub(r"[^A-Za-z0-9._ -]", "_", name).strip(" .") or "recipe"
    return safe.lower() + ".json"


def write_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, then a rename: a crash never leaves half a file.
    Recipes hold no secrets (the token stays in the settings), so others may read them."""
    write_file(path, text, 0o644)


class RecipeStore:
    """Saved recipes in one folder, one JSON file each. Blocking file I/O: the app calls
    it on its worker thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, name: str) -> Path:
        return self.folder / _file_name(name)

    def names(self) -> list[str]:
        """The recipes' names, sorted; files that are not valid recipes are left out
        (and left alone)."""
        found = []
        try:
            entries = sorted(self.folder.glob("*.json"))
        except OSError:
            return []
        for path in entries:
            try:
                found.append(read_recipe_file(path).name)
            except (OSError, RecipeError):
                continue
        return sorted(found, key=str.lower)

    def load(self, name: str) -> Recipe:
        path = self._path(name)
        if not path.exists():
            raise RecipeError([f"no saved recipe named {name!r}"])
        return read_recipe_file(path)

    def save(self, recipe: Recipe, *, replace_existing: bool = False) -> Path:
        path = self._path(recipe.name)
        if path.exists() and not replace_existing:
            existing = _existing_name(path)
            raise RecipeError([f"a recipe named {existing or recipe.name!r} exists; "
                               "choose another name or replace it"])
        write_atomic(path, recipe.to_json())
        return path

    def rename(self, old: str, new: str) -> Recipe:
        recipe = self.load(old)
        renamed = parse_recipe({**recipe.model_dump(mode="json", exclude_none=True),
                                "name": new})
        target = self._path(renamed.name)
        if target != self._path(old) and target.exists():
            existing = _existing_name(target) or new
            raise RecipeError([f"a recipe named {existing!r} exists; choose another name"])
        write_atomic(target, renamed.to_json())
        if target != self._path(old):
            self._path(old).unlink(missing_ok=True)
        return renamed

    def delete(self, name: str) -> None:
        path = self._path(name)
        if not path.exists():
            raise RecipeError([f"no saved recipe named {name!r}"])
        path.unlink()


def _existing_name(path: Path) -> str | None:
    try:
        return read_recipe_file(path).name
    except (OSError, RecipeError):
        return None


def export_recipe(recipe: Recipe, path: Path) -> None:
    write_atomic(path, recipe.to_json())
