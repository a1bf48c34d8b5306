"""What the Process view's recipe bar does: pick, save as, rename, delete, import and
export recipes (``gui.recipes``). Runs on the Tk main thread; every file step runs on
the app's worker (``asyncio.to_thread``) and comes back as a callback here.

The recipe in use is checked against the server's operations (when connected) before it
is used, so an unknown operation or an out-of-range parameter is refused with the reason
when it is picked or imported, not in the middle of a run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gui.host import RecipeHost
from gui.recipes import (
    Recipe,
    RecipeError,
    RecipeStore,
    check_recipe,
    export_recipe,
    parse_recipe,
    read_recipe_file,
    recipe_from_single,
    recipes_dir,
)
from gui.viewmodel.errors import describe_os_error
from gui.viewmodel.requests import ProcessRequest


def describe_outputs(recipe: Recipe) -> str:
    """One line per output: ``large: resize, jpeg q85 → {stem}.{output}.{ext}``."""
    lines = []
    for out in recipe.outputs:
        steps = "+".join(str(s["op"]) for s in recipe.output_steps(out)) or "no steps"
        fmt = out.format or "original format"
        if out.quality is not None:
            fmt += f" q{out.quality}"
        extra = ", ".join(f"{k} {v}" for k, v in out.encoder_options().items())
        lines.append(f"{out.name}: {steps}, {fmt}{', ' + extra if extra else ''} → "
                     f"{out.template}")
    return "\n".join(lines)


def request_steps(request: ProcessRequest) -> list[dict[str, Any]]:
    """The steps a (non-recipe) request runs, as a recipe holds them."""
    if request.steps:
        return [{"op": step.op, **step.params} for step in request.steps]
    return [{"op": request.operation, **dict(request.params or {})}]


class RecipeController:
    """See the module docstring. ``on_changed`` is called when the recipe in use
    changed (the Process view's "Runs:" line, names and stale marks follow)."""

    def __init__(self, app: RecipeHost, on_changed: Callable[[], None]) -> None:
        self.app = app
        self.on_changed = on_changed
        self.store = RecipeStore(recipes_dir(app.config_path))
        self.names: list[str] = []
        self.active: Recipe | None = None  # checked against the operations when connected
        self.busy = 0  # file steps on their way (tests wait for 0)

    # ------------------------------------------------------------------ plumbing
    def _run(self, func: Callable[..., Any], *args: Any,
             done: Callable[[Any], None] | None = None) -> None:
        self.busy += 1

        def ok(value: Any) -> None:
            self.busy -= 1
            if done is not None:
                done(value)

        def failed(exc: BaseException) -> None:
            self.busy -= 1
            self._show_problem(exc)
            self._show()

        self.app.submit(asyncio.to_thread(func, *args), ok, failed)

    def _show_problem(self, exc: BaseException) -> None:
        if isinstance(exc, RecipeError):
            self.app.show_error("Recipe refused: " + "; ".join(exc.problems))
        elif isinstance(exc, OSError):
            self.app.show_error(describe_os_error(exc, "use the recipe file"))
        else:
            self.app.report_error(exc)

    def _show(self) -> None:
        active = self.active
        self.app.process_view.set_recipes(self.names, active.name if active else None,
                                          describe_outputs(active) if active else "")

    def _operations(self) -> list[Any] | None:
        return list(self.app.connected.operations) if self.app.connected else None

    def _checked(self, recipe: Recipe) -> Recipe:
        """Raises RecipeError; unchecked while not connected (checked on connect)."""
        operations = self._operations()
        return recipe if operations is None else check_recipe(recipe, operations)

    def _use(self, recipe: Recipe | None) -> None:
        self.active = recipe
        self._show()
        self.on_changed()

    def refresh(self) -> None:
        def listed(names: list[str]) -> None:
            self.names = names
            if self.active is not None and self.active.name not in names:
                self.names = sorted([*names, self.active.name], key=str.lower)
            self._show()

        self._run(self.store.names, done=listed)

    def on_connected(self) -> None:
        """Check the recipe in use against this server's operations."""
        if self.active is None:
            return
        try:
            self.active = self._checked(self.active)
        except RecipeError as exc:
            self._show_problem(exc)
            self._use(None)

    # ------------------------------------------------------------------ the bar
    def picked(self, label: str) -> None:
        if label not in self.names:  # "(none: the settings below)"
            self._use(None)
            return

        def loaded(recipe: Recipe) -> None:
            try:
                self._use(self._checked(recipe))
            except RecipeError as exc:
                self._show_problem(exc)
                self._use(None)

        self._run(self.store.load, label, done=loaded)

    def _taken(self, name: str) -> bool:
        return name.strip().lower() in {n.lower() for n in self.names}

    def _save(self, recipe: Recipe, then: str) -> None:
        """Save into the store (asking before replacing one of the same name), use it."""
        if self._taken(recipe.name) and not self.app.dialogs.confirm(
                "Replace recipe?", f"A recipe named {recipe.name!r} exists. Replace it?"):
            return

        def saved(_path: Path) -> None:
            self.names = sorted({*self.names, recipe.name}, key=str.lower)
            self._use(recipe)
            self.app.show_info(then)

        self._run(lambda: self.store.save(recipe, replace_existing=True), done=saved)

    def save_as(self, current: Callable[[], ProcessRequest], template: str) -> None:
        """A new recipe: a copy of the one in use, or the settings on screen."""
        initial = f"{self.active.name} copy" if self.active else ""
        name = self.app.dialogs.ask_string("Save recipe", "Name of the recipe:", initial)
        if not name:
            return
        try:
            if self.active is not None:
                recipe = parse_recipe({**self.active.model_dump(mode="json",
                                                                exclude_none=True),
                                       "name": name})
            else:
                request = current()
                recipe = self._checked(recipe_from_single(
                    name, request_steps(request), request.format, request.quality, template))
        except ValueError as exc:  # RecipeError, or settings that cannot run yet
            self._show_problem(exc if isinstance(exc, RecipeError) else RecipeError([str(exc)]))
            return
        self._save(recipe, f"Saved recipe {recipe.name!r}.")

    def rename(self) -> None:
        old = self.active
        if old is None:
            self.app.show_error("Pick a recipe to rename first.")
            return
        new = self.app.dialogs.ask_string("Rename recipe", f"New name for {old.name!r}:",
                                          old.name)
        if not new or new == old.name:
            return
        if self._taken(new) and new.strip().lower() != old.name.lower():
            self.app.show_error(f"A recipe named {new!r} exists; choose another name.")
            return

        def renamed(recipe: Recipe) -> None:
            self.names = sorted({*(n for n in self.names if n != old.name), recipe.name},
                                key=str.lower)
            self._use(self._with_checked_steps(recipe, old))
            self.app.show_info(f"Renamed {old.name!r} to {recipe.name!r}.")

        self._run(self.store.rename, old.name, new, done=renamed)

    @staticmethod
    def _with_checked_steps(recipe: Recipe, checked: Recipe) -> Recipe:
        return checked.model_copy(update={"name": recipe.name})

    def delete(self) -> None:
        recipe = self.active
        if recipe is None:
            self.app.show_error("Pick a recipe to delete first.")
            return
        if not self.app.dialogs.confirm("Delete recipe?",
                                        f"Delete the recipe {recipe.name!r}?"):
            return

        def deleted(_none: None) -> None:
            self.names = [n for n in self.names if n != recipe.name]
            self._use(None)
            self.app.show_info(f"Deleted recipe {recipe.name!r}.")

        self._run(self.store.delete, recipe.name, done=deleted)

    def import_(self) -> None:
        path = self.app.dialogs.ask_open_recipe()
        if not path:
            return

        def read(recipe: Recipe) -> None:
            try:
                checked = self._checked(recipe)
            except RecipeError as exc:
                self._show_problem(exc)
                return
            self._save(checked, f"Imported recipe {recipe.name!r} from {path}.")

        self._run(read_recipe_file, Path(path), done=read)

    def export(self) -> None:
        recipe = self.active
        if recipe is None:
            self.app.show_error("Pick a recipe to export first.")
            return
        path = self.app.dialogs.ask_save_recipe(f"{recipe.name}.json")
        if not path:
            return
        self._run(export_recipe, recipe, Path(path),
                  done=lambda _none: self.app.show_info(f"Exported {recipe.name!r} to {path}."))


def outputs_summary(outputs: Mapping[str, Any]) -> str:
    """``large 300×200 · small 64×43``: a result's outputs for the result panel."""
    return " · ".join(f"{name} {info.width}×{info.height} {info.format.upper()}"
                      for name, info in outputs.items())
