"""Recipes in the real app under Xvfb on a real embedded local fleet: the recipe bar
(import, export, save as, rename, delete; bad recipes refused), several outputs per
image with a link each, Save all names equal to the preview, and the output rules in
Settings (name template, conflict policy shared with Save all).

One app for the module; the tests run in order and each clears the list first.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_gui import ScriptedDialogs, app_environ, pump_until
from PIL import Image

from gui.recipes import read_recipe_file
from gui.views.process import NO_RECIPE

pytestmark = pytest.mark.gui

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
FLEET_START = 60.0
PROCESS_TIMEOUT = 90.0

RECIPE = {
    "version": 1,
    "name": "web",
    "steps": [{"op": "grayscale"}],
    "outputs": [
        {"name": "large", "steps": [{"op": "resize", "width": 200}], "format": "jpeg",
         "quality": 80, "template": "{stem}.{output}.{ext}"},
        {"name": "small", "steps": [{"op": "resize", "width": 48}], "format": "webp",
         "template": "{n:03}-{stem}.{output}.{ext}"},
        {"name": "thumb", "steps": [{"op": "resize", "width": 24, "height": 24,
                                     "mode": "fill"}], "format": "png",
         "template": "{stem}.{output}.{width}x{height}.{ext}"},
    ],
}


@pytest.fixture(scope="module")
def app(x_display: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The module's app (overrides conftest's Flask ``app``) on the session's display."""
    from gui.app import ImageFleetApp

    env = app_environ(tmp_path_factory.mktemp("gui-recipes"))
    dialogs = ScriptedDialogs()
    instance = ImageFleetApp(environ=env, dialogs=dialogs)
    instance.scripted = dialogs
    try:
        pump_until(instance, lambda: instance.connected is not None, FLEET_START,
                   "the embedded fleet to start and the operations to load")
        yield instance
        assert instance.failures == []  # no callback of the whole module raised
    finally:
        instance.close()


def idle(app: Any) -> None:
    pump_until(app, lambda: not app.process.batch.running and app.process.recipes.busy == 0
               and not app.process.preview_busy, PROCESS_TIMEOUT, "an idle app")


def clear_list(app: Any) -> None:
    idle(app)
    for job in list(app.process.batch.jobs):
        app.process.remove_image(job.id)
    app.process.clear_pipeline()


def add(app: Any, paths: list[Path]) -> None:
    before = len(app.process.batch)
    app.process.add_images(paths)
    pump_until(app, lambda: len(app.process.batch) == before + len(paths)
               and app.process.images_loaded(), 20, f"{len(paths)} images in the list")


def settle(app: Any) -> list[str]:
    """Run the debounced settings change now; wait for the names it previews."""
    app.unschedule("preview")
    app.process._settings_settled()
    seq = app.process._names_seq
    pump_until(app, lambda: app.process.names_shown_seq == seq, 10, "the name preview")
    return list(app.process.names_preview)


def save_all(app: Any, folder: Path, summary: str) -> None:
    app.hide_banner()
    app.scripted.directory = str(folder)
    app.process.save_all()
    pump_until(app, lambda: summary in app.banner_text, 30, summary)


def test_recipe_bar_import_export_save_as_rename_delete(app: Any, tmp_path: Path) -> None:
    idle(app)
    source = tmp_path / "web.json"
    source.write_text(json.dumps(RECIPE))
    app.scripted.recipe_file = str(source)
    app.process.import_recipe()
    idle(app)
    assert app.process.recipes.active is not None
    assert app.process_view.recipe_var.get() == "web"
    assert "large: grayscale+resize, jpeg q80" in app.process_view.recipe_outputs.cget("text")
    assert "Runs: recipe web: 3 outputs" in app.process_view.runs_label.cget("text")
    stored = app.config_path.parent / "recipes" / "web.json"
    assert read_recipe_file(stored) == read_recipe_file(source)

    exported = tmp_path / "exported.json"
    app.scripted.recipe_file = str(exported)
    app.process.export_recipe()
    idle(app)
    assert read_recipe_file(exported) == read_recipe_file(source)  # round trip

    app.scripted.strings = ["web 2"]
    app.process.save_recipe_as()
    idle(app)
    assert app.process.recipes.names == ["web", "web 2"]
    app.scripted.strings = ["print"]
    app.process.rename_recipe()
    idle(app)
    assert app.process.recipes.names == ["print", "web"]
    assert app.process_view.recipe_var.get() == "print"
    app.scripted.confirm_answer = True
    app.process.delete_recipe()
    idle(app)
    assert app.process.recipes.names == ["web"]
    assert app.process.recipes.active is None
    assert app.process_view.recipe_var.get() == NO_RECIPE
    assert sorted(p.name for p in stored.parent.iterdir()) == ["web.json"]
    app.process.recipe_picked("web")
    idle(app)
    assert app.process.recipes.active is not None


@pytest.mark.parametrize(("change", "reason"), [
    ({"steps": [{"op": "no_such_op"}]}, "unknown operation 'no_such_op'; valid operations"),
    ({"outputs": [{"name": "o", "steps": [{"op": "resize", "width": -1}]}]},
     "parameter width=-1 is invalid: expected width (int 0.."),
    ({"version": 9}, "recipe version 9 is not supported"),
    ({"outputs": [{"name": "o", "template": "{stem}.{size}"}]}, "unknown field {size}"),
])
def test_bad_recipes_are_refused_on_import(app: Any, tmp_path: Path, change: dict[str, Any],
                                           reason: str) -> None:
    idle(app)
    names = list(app.process.recipes.names)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**RECIPE, "name": "bad", **change}))
    app.scripted.recipe_file = str(bad)
    app.process.import_recipe()
    idle(app)
    assert reason in app.errors_shown[-1]
    assert app.process.recipes.names == names
    assert not (app.config_path.parent / "recipes" / "bad.json").exists()


def test_several_outputs_per_image_and_names_equal_the_preview(app: Any,
                                                               tmp_path: Path) -> None:
    clear_list(app)
    app.process.recipe_picked("web")
    idle(app)
    for name in ("camera.png", "coffee.png"):
        shutil.copyfile(IMAGES / name, tmp_path / name)
    add(app, [tmp_path / "camera.png", tmp_path / "coffee.png"])
    preview = settle(app)
    assert preview == ["camera.large.jpg", "001-camera.small.webp",
                       "camera.thumb.{width}x{height}.png", "coffee.large.jpg"]
    assert "{height}, {width}: filled in from each result" in \
        app.process_view.names_label.cget("text")
    app.process.process_all()
    pump_until(app, lambda: not app.process.batch.running, PROCESS_TIMEOUT, "the run")
    jobs = app.process.batch.jobs
    assert [j.status.value for j in jobs] == ["done", "done"]
    assert [name for name, _info in jobs[0].outputs] == ["large", "small", "thumb"]
    assert len({info.url for job in jobs for _n, info in job.outputs}) == 6  # a link each
    assert "2 of 2 images done (6 of 6 results)" in app.process_view.overall_label.cget("text")

    app.process.select_image(jobs[0].id)
    pump_until(app, lambda: app.process.shown_result == jobs[0].id or "Outputs:" in
               app.process_view.result_meta.cget("text"), 20, "the result panel")
    assert "Outputs: large 200×200 JPEG · small 48×48 WEBP · thumb 24×24 PNG" in \
        app.process_view.result_meta.cget("text")
    app.process.copy_link()
    assert app.clipboard_get().splitlines()[0].startswith("large: http")

    out = tmp_path / "out"
    out.mkdir()
    save_all(app, out, f"Saved 6 files to {out} (0 renamed, 0 skipped, 0 overwritten).")
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(["camera.large.jpg", "001-camera.small.webp",
                              "camera.thumb.24x24.png", "coffee.large.jpg",
                              "002-coffee.small.webp", "coffee.thumb.24x24.png"])
    filled = [name.replace("{width}x{height}", "24x24") for name in preview]
    assert set(filled) <= set(written)
    assert settle(app) == filled  # after the run the preview knows every field
    with Image.open(out / "001-camera.small.webp") as small:
        assert small.size == (48, 48)


def test_output_rules_in_settings_are_shared_with_save_all(app: Any, tmp_path: Path) -> None:
    clear_list(app)
    app.process.recipe_picked(NO_RECIPE)
    idle(app)
    app.process_view.select_operation("invert")
    app.process_view.format_var.set("png")
    view = app.settings_view
    form = view.raw_values()
    app.apply_settings({**form, "name_template": "{n:02}_{stem}.{op}.{ext}",
                        "on_conflict": "overwrite"})
    assert app.settings.name_template == "{n:02}_{stem}.{op}.{ext}"
    assert app.process_view.on_conflict() == "overwrite"  # the menu by Save all follows
    pump_until(app, lambda: app.config_path.exists() and json.loads(
        app.config_path.read_text()).get("on_conflict") == "overwrite", 10, "saved settings")
    for name in ("rocket.jpg", "chelsea.png"):
        shutil.copyfile(IMAGES / name, tmp_path / name)
    add(app, [tmp_path / "rocket.jpg", tmp_path / "chelsea.png"])
    preview = settle(app)
    assert preview == ["01_rocket.invert.png", "02_chelsea.invert.png"]
    app.process.process_all()
    pump_until(app, lambda: not app.process.batch.running, PROCESS_TIMEOUT, "the run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "01_rocket.invert.png").write_bytes(b"old")
    save_all(app, out, f"Saved 2 files to {out} (0 renamed, 0 skipped, 1 overwritten).")
    assert sorted(p.name for p in out.iterdir()) == sorted(preview)
    assert (out / "01_rocket.invert.png").read_bytes() != b"old"

    # a bad template is refused with the reason; the good one stays
    app.apply_settings({**view.raw_values(), "name_template": "{stem}/{nope}"})
    assert "unknown field {nope}" in view.message.cget("text")
    assert app.settings.name_template == "{n:02}_{stem}.{op}.{ext}"

    # the menu by Save all changes the Settings view's too (one setting)
    app.process.on_conflict_changed("skip")
    assert view.raw_values()["on_conflict"] == "skip"
    save_all(app, out, f"Saved 0 files to {out} (0 renamed, 2 skipped, 0 overwritten).")
    app.process.on_conflict_changed("unique")
    save_all(app, out, f"Saved 2 files to {out} (2 renamed, 0 skipped, 0 overwritten).")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*preview, "01_rocket-2.invert.png", "02_chelsea-2.invert.png"])


def test_folders_with_sub_folders_are_mirrored_by_save_all(app: Any, tmp_path: Path) -> None:
    clear_list(app)
    app.process.recipe_picked(NO_RECIPE)
    idle(app)
    app.process_view.select_operation("grayscale")
    app.process_view.format_var.set("png")
    root = tmp_path / "shoot"
    for relative, source in (("day1/a.png", "camera.png"), ("day2/a.png", "coffee.png"),
                             ("top.png", "chelsea.png"), (".hidden/x.png", "camera.png")):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IMAGES / source, root / relative)
    app.apply_settings({**app.settings_view.raw_values(), "name_template": "{stem}.{op}.{ext}",
                        "on_conflict": "unique"})
    app.process_view.subfolders_var.set(True)
    try:
        app.process.add_images([root])
        pump_until(app, lambda: len(app.process.batch) == 3 and app.process.images_loaded(),
                   20, "3 images from the folder and its sub-folders")
    finally:
        app.process_view.subfolders_var.set(False)
    assert [job.folder for job in app.process.batch.jobs] == ["", "day1", "day2"]
    preview = settle(app)
    # the same stem in two folders keeps its name in each
    assert preview == ["top.grayscale.png", "day1/a.grayscale.png", "day2/a.grayscale.png"]
    app.process.process_all()
    pump_until(app, lambda: not app.process.batch.running, PROCESS_TIMEOUT, "the run")
    out = tmp_path / "out"
    out.mkdir()
    save_all(app, out, f"Saved 3 files to {out} (0 renamed, 0 skipped, 0 overwritten).")
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == sorted(preview)
