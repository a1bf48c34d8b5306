"""Recipes, output rules and several outputs per input: the pure parts (recipe model,
name templates, the batch's names), then `python -m scripts.process --recipe` end to end
against a real `python -m server` on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import cv2
import pytest

from gui.client import ImageFleetClient, OperationSpec
from gui.naming import OnConflict, save_result
from gui.output_rules import (
    DEFAULT_TEMPLATE,
    OutputNaming,
    TemplateError,
    mirrored_folder,
    parse_template,
    plan_names,
    preview_lines,
    render,
    sanitise,
)
from gui.recipes import (
    Recipe,
    RecipeError,
    RecipeStore,
    check_recipe,
    export_recipe,
    job_options,
    parse_recipe,
    read_recipe_file,
    recipe_from_single,
    recipes_dir,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "testdata" / "images"

WEB = {
    "version": 1,
    "name": "web",
    "steps": [{"op": "rotate", "angle": 0, "expand": False}],
    "outputs": [
        {"name": "large", "steps": [{"op": "resize", "width": 300}], "format": "jpeg",
         "quality": 85, "template": "{stem}.{output}.{width}x{height}.{ext}"},
        {"name": "small", "steps": [{"op": "resize", "width": 64}], "format": "webp",
         "template": "{n:03}-{stem}.{output}.{ext}"},
        {"name": "thumb", "steps": [{"op": "resize", "width": 32, "height": 32,
                                     "mode": "fill"}], "format": "png"},
    ],
}


def web_recipe() -> Recipe:
    return parse_recipe(json.loads(json.dumps(WEB)))


# --------------------------------------------------------------------------- recipe model


def test_recipe_round_trip_save_export_import_load(tmp_path: Path) -> None:
    recipe = web_recipe()
    store = RecipeStore(recipes_dir(tmp_path / "config" / "imagefleet" / "settings.json"))
    path = store.save(recipe)
    assert path.parent == tmp_path / "config" / "imagefleet" / "recipes"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp left
    export_recipe(store.load("web"), tmp_path / "shared.json")
    imported = read_recipe_file(tmp_path / "shared.json")
    assert imported == recipe == store.load("web")
    assert json.loads((tmp_path / "shared.json").read_text())["version"] == 1
    assert store.names() == ["web"]


def test_store_rename_delete_and_refuses_to_clobber(tmp_path: Path) -> None:
    store = RecipeStore(tmp_path / "recipes")
    store.save(web_recipe())
    other = recipe_from_single("Print", [{"op": "grayscale"}], "png", 90)
    store.save(other)
    with pytest.raises(RecipeError, match="a recipe named 'web' exists"):
        store.save(web_recipe())
    with pytest.raises(RecipeError, match="'Print' exists"):
        store.rename("web", "print")
    renamed = store.rename("web", "Web 2026")
    assert renamed.outputs == web_recipe().outputs
    assert store.names() == ["Print", "Web 2026"]
    store.delete("Print")
    assert store.names() == ["Web 2026"]
    with pytest.raises(RecipeError, match="no saved recipe named 'Print'"):
        store.load("Print")
    (tmp_path / "recipes" / "broken.json").write_text("{not json")
    assert store.names() == ["Web 2026"]  # a broken file is left alone, not listed
    assert other.outputs[0].quality is None  # quality only for lossy formats


@pytest.mark.parametrize(("change", "reason"), [
    ({"version": 2}, "recipe version 2 is not supported: this ImageFleet reads version 1"),
    ({"version": None}, "recipe version None is not supported"),
    ({"outputs": []}, "outputs: List should have at least 1 item"),
    ({"outputs": [{"template": "{stem}.{colour}.{ext}"}]},
     "unknown field {colour}; the fields are {stem}, {ext}, {op}"),
    ({"outputs": [{"template": "{n:zz}.{ext}"}]}, "bad format spec 'zz' for {n}"),
    ({"outputs": [{"template": "{stem!r}.{ext}"}]}, "{stem!r} is not allowed"),
    ({"outputs": [{"template": "../{stem}.{ext}"}]}, "must not contain / or \\"),
    ({"outputs": [{"template": "{stem.upper}"}]}, "unknown field {stem.upper}"),
    ({"outputs": [{"quality": 300}]}, "quality: must be a whole number from 1 to 100, got 300"),
    ({"outputs": [{"format": "gif"}]}, "format 'gif' is not one of png, jpeg, webp"),
    ({"outputs": [{"subsampling": "4:1:1"}]}, "'4:4:4', '4:2:2' or '4:2:0'"),
    ({"outputs": [{"metadata": "all"}]}, "'strip', 'keep-no-location' or 'keep'"),
    ({"outputs": [{"name": "a"}, {"name": "A"}]}, "every output needs its own name"),
    ({"outputs": [{"colour": "srgb"}]}, "outputs[1].colour: unknown field"),
    ({"steps": [{"operation": "grayscale"}]}, 'step 1 needs an "op"'),
])
def test_bad_recipes_are_refused_with_the_reason(change: dict[str, Any], reason: str) -> None:
    data = {"version": 1, "name": "x", "steps": [{"op": "grayscale"}],
            "outputs": [{"name": "out"}], **change}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data)
    assert reason in str(caught.value)


def test_a_file_that_is_not_a_recipe_says_so(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text('{"version": 1,')
    with pytest.raises(RecipeError, match=r"is not valid JSON \(line 1"):
        read_recipe_file(path)
    path.write_text('{"name": "x", "outputs": [{}]}')
    with pytest.raises(RecipeError, match="recipe has no version"):
        read_recipe_file(path)


def test_encoder_fields_are_kept_and_never_dropped_silently() -> None:
    recipe = parse_recipe({**WEB, "outputs": [{**WEB["outputs"][0], "progressive": True,
                                               "subsampling": "4:2:0", "icc": "srgb",
                                               "metadata": "keep-no-location"}]})
    out = recipe.outputs[0]
    assert out.encoder_options() == {"progressive": True, "subsampling": "4:2:0",
                                     "icc": "srgb", "metadata": "keep-no-location"}
    assert read_json_round_trip(recipe) == recipe
    plain = job_options(web_recipe(), web_recipe().outputs[0])
    assert plain == {"steps": [{"op": "rotate", "angle": 0, "expand": False},
                               {"op": "resize", "width": 300}],
                     "format": "jpeg", "quality": 85}
    try:
        options = job_options(recipe, out)
    except RecipeError as exc:  # this client has no encoder options yet: refused, named
        assert "sets icc, metadata, progressive, subsampling" in str(exc)
    else:  # the client sends them: every set field is passed on
        assert options["subsampling"] == "4:2:0" and options["metadata"] == "keep-no-location"


def read_json_round_trip(recipe: Recipe) -> Recipe:
    return parse_recipe(json.loads(recipe.to_json()))


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(("text", "reason"), [
    ("", "the name template is empty"),
    ("{stem}.{size}.{ext}", "unknown field {size}"),
    ("{n:q}", "bad format spec 'q' for {n} (a whole number)"),
    ("{stem:d}", "bad format spec 'd' for {stem} (text)"),
    ("{stem", "expected '}'"),
    ("{}", "empty field {}"),
    ("a/{stem}", "must not contain / or \\"),
])
def test_bad_templates_are_refused(text: str, reason: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(text)
    assert reason in str(caught.value)


def test_every_field_renders_and_unknown_ones_are_marked() -> None:
    template = parse_template("{date}_{n:04}_{recipe}_{output}_{stem}.{op}.{width}x{height}.{ext}")
    planned = plan_names([("IMG 1.png", "")], [OutputNaming(template, "resize", None, "big")],
                         recipe="web", run_date=date(2026, 3, 9))
    item = planned[0][0]
    preview = item.preview()
    assert preview.name == "2026-03-09_0001_web_big_IMG 1.resize.{width}x{height}.{ext}"
    assert not preview.complete
    written = item.with_result(640, 480, "jpeg")
    assert written.preview().name == "2026-03-09_0001_web_big_IMG 1.resize.640x480.jpg"
    assert written.preview().complete


def test_names_are_sanitised() -> None:
    assert sanitise("../../etc/passwd") == "_._etc_passwd"
    assert ".." not in sanitise("a..b...c")
    assert sanitise(".hidden") == "hidden"
    assert sanitise("") == "_"
    assert sanitise("x" * 300 + ".jpg").endswith(".jpg")
    assert len(sanitise("é" * 300 + ".jpg").encode()) <= 255
    # a stem from a user's file name never makes a path
    template = parse_template("{stem}.{ext}")
    evil = plan_names([("..\\..\\x.png", "")], [OutputNaming(template, "op", "png")])
    assert "\\" not in evil[0][0].preview().name and ".." not in evil[0][0].preview().name


def test_default_template_keeps_the_established_names() -> None:
    template = parse_template(DEFAULT_TEMPLATE)
    planned = plan_names([("photo.png", ""), ("photo.jpg", ""), ("photo-2.png", "")],
                         [OutputNaming(template, "grayscale", "png")])
    assert [row[0].preview().name for row in planned] == [
        "photo.grayscale.png", "photo-3.grayscale.png", "photo-2.grayscale.png"]


def test_mirrored_folders_keep_same_names_apart_only_within_a_folder() -> None:
    assert mirrored_folder("in/a/b/x.jpg", "in") == "a/b"
    assert mirrored_folder("in/x.jpg", "in") == ""
    assert mirrored_folder("elsewhere/x.jpg", None) == ""
    template = parse_template("{stem}.{ext}")
    planned = plan_names([("x.png", "a"), ("x.png", "b"), ("X.png", "a")],
                         [OutputNaming(template, "op", "png")])
    assert preview_lines(planned) == ["a/x.png", "b/x.png", "a/X-2.png"]


def test_several_outputs_sharing_a_name_are_told_apart_before_the_run() -> None:
    template = parse_template("{stem}.{ext}")  # no {output}: both outputs would be x.webp
    planned = plan_names([("x.png", "")], [OutputNaming(template, "a", "webp", "one"),
                                          OutputNaming(template, "b", "webp", "two")])
    assert preview_lines(planned) == ["x.webp", "x-2.webp"]
    # without {stem} the number goes before the extension
    fixed = parse_template("result.{ext}")
    planned = plan_names([("x.png", ""), ("y.png", "")], [OutputNaming(fixed, "a", "png")])
    assert preview_lines(planned) == ["result.png", "result-2.png"]
    # ... and the unique policy's next names skip the ones the batch owns
    candidates = planned[0][0].candidates()
    assert [next(candidates) for _ in range(2)] == ["result.png", "result-3.png"]


@pytest.mark.parametrize("policy", list(OnConflict))
def test_each_conflict_policy_with_template_names(tmp_path: Path, policy: OnConflict) -> None:
    template = parse_template("{stem}.{width}.{ext}")
    item = plan_names([("x.png", "")], [OutputNaming(template, "a", "png")])[0][0]
    final = item.with_result(7, 7, "png")
    (tmp_path / "x.7.png").write_bytes(b"theirs")
    outcome = save_result(tmp_path, final.candidates(), b"ours", policy, final.natural())
    if policy is OnConflict.UNIQUE:
        assert outcome.path.name == "x-2.7.png"
        assert (tmp_path / "x.7.png").read_bytes() == b"theirs"
    elif policy is OnConflict.OVERWRITE:
        assert (tmp_path / "x.7.png").read_bytes() == b"ours"
    else:
        assert not outcome.saved and (tmp_path / "x.7.png").read_bytes() == b"theirs"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.7.png"]


def test_render_is_the_function_behind_preview_and_names() -> None:
    template = parse_template("{stem}-{n:02}.{ext}")
    item = plan_names([("a.png", "")], [OutputNaming(template, "op", "png")])[0][0]
    assert item.preview() == render(template, item.fields, item.number)
    assert next(item.with_result(1, 1, "png").candidates()) == item.preview().name


# --------------------------------------------------------------------------- the server


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scripts.process", *args], cwd=REPO,
                          env=clean_env(), capture_output=True, text=True, timeout=180,
                          check=False)


@pytest.fixture(scope="module")
def endpoint(module_server_process: Any) -> str:
    return module_server_process().url


@pytest.fixture(scope="module")
def operations(endpoint: str) -> list[OperationSpec]:
    async def fetch() -> list[OperationSpec]:
        async with ImageFleetClient(endpoint) as client:
            return list(await client.operations())

    return asyncio.run(fetch())


def test_recipes_are_checked_against_the_servers_operations(
        operations: list[OperationSpec]) -> None:
    checked = check_recipe(web_recipe(), operations)
    assert checked.outputs[0].steps == [{"op": "resize", "width": 300}]
    unknown = parse_recipe({**WEB, "steps": [{"op": "sharpen_a_lot"}]})
    with pytest.raises(RecipeError, match=r"steps step 1: unknown operation 'sharpen_a_lot'; "
                                          r"valid operations: .*grayscale"):
        check_recipe(unknown, operations)
    too_wide = parse_recipe({**WEB, "outputs": [
        {"name": "huge", "steps": [{"op": "resize", "width": 10**6}]}]})
    with pytest.raises(RecipeError, match=r"outputs\[1\] \(huge\) step 1: parameter "
                                          r"width=1000000 is invalid: expected width "
                                          r"\(int 0\.\.\d+"):
        check_recipe(too_wide, operations)
    bad_choice = parse_recipe({**WEB, "outputs": [
        {"name": "o", "steps": [{"op": "resize", "width": 5, "mode": "squash"}]}]})
    with pytest.raises(RecipeError, match=r"one of fit\|fill\|exact"):
        check_recipe(bad_choice, operations)


def test_several_outputs_per_input_from_the_command_line(endpoint: str,
                                                         tmp_path: Path) -> None:
    recipe = tmp_path / "web.json"
    recipe.write_text(json.dumps(WEB))
    inputs = tmp_path / "in"
    (inputs / "a" / "b").mkdir(parents=True)
    shutil.copy(IMAGES / "astronaut.png", inputs / "a" / "b" / "astro.png")
    shutil.copy(IMAGES / "camera.png", inputs / "cam.png")
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--recipe", str(recipe), "--recursive",
               "--out", str(out), str(inputs))
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    assert len(rows) == 6  # 2 images x 3 outputs, one line (and one link) each
    assert sorted((Path(r[0]).name, r[1]) for r in rows) == sorted(
        (name, output) for name in ("astro.png", "cam.png")
        for output in ("large", "small", "thumb"))
    assert all(r[2].startswith(endpoint + "/results/") for r in rows)
    assert len({r[2] for r in rows}) == 6  # a link per output
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    # the inputs are sorted: a/b/astro.png is n=1, cam.png n=2
    assert written == sorted([
        "a/b/astro.large.300x300.jpg", "a/b/001-astro.small.webp",
        "a/b/astro.rotate+resize.png",
        "cam.large.300x300.jpg", "002-cam.small.webp", "cam.rotate+resize.png"])
    for row in rows:
        assert Path(row[4]).exists()
    assert cv2.imread(str(out / "cam.rotate+resize.png")).shape[:2] == (32, 32)
    assert cv2.imread(str(out / "a/b/001-astro.small.webp")).shape[1] == 64
    assert "2 ok, 0 failed" in done.stderr
    assert "6 results (3 outputs per image)" in done.stderr


def test_the_preview_equals_the_names_written(endpoint: str, tmp_path: Path) -> None:
    template = "{stem}_{n:02}.{op}.{ext}"
    sources = sorted(IMAGES.glob("*.png"))[:3]
    planned = plan_names([(p.name, "") for p in sources],
                         [OutputNaming(parse_template(template), "grayscale", "png")])
    preview = preview_lines(planned, limit=10)
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "grayscale", "--format", "png",
               "--name-template", template, "--out", str(out), *map(str, sources))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(preview)
    saved = {Path(line.split("\t")[0]).name: Path(line.split("\t")[3]).name
             for line in done.stdout.splitlines()}
    assert [saved[p.name] for p in sources] == preview


def test_late_fields_fill_in_what_the_preview_marked(endpoint: str, tmp_path: Path) -> None:
    template = "{stem}.{width}x{height}.{ext}"
    planned = plan_names([("camera.png", "")],
                         [OutputNaming(parse_template(template), "resize", None)])
    assert preview_lines(planned) == ["camera.{width}x{height}.{ext}"]
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "resize", "--param", "width=100",
               "--name-template", template, "--out", str(out), str(IMAGES / "camera.png"))
    assert done.returncode == 0, done.stderr
    assert [p.name for p in out.iterdir()] == ["camera.100x100.png"]


@pytest.mark.parametrize("policy", ["unique", "overwrite", "skip"])
def test_each_conflict_policy_for_recipe_outputs(endpoint: str, tmp_path: Path,
                                                 policy: str) -> None:
    recipe = tmp_path / "thumb.json"
    recipe.write_text(json.dumps({"version": 1, "name": "t", "steps": [],
                                  "outputs": [{"name": "t", "format": "png",
                                               "steps": [{"op": "resize", "width": 16}],
                                               "template": "{stem}.{output}.{ext}"}]}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "camera.t.png").write_bytes(b"theirs")
    done = cli("--endpoint", endpoint, "--recipe", str(recipe), "--on-conflict", policy,
               "--out", str(out), str(IMAGES / "camera.png"))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    if policy == "unique":
        assert names == ["camera-2.t.png", "camera.t.png"]
        assert (out / "camera.t.png").read_bytes() == b"theirs"
    elif policy == "overwrite":
        assert names == ["camera.t.png"]
        assert cv2.imread(str(out / "camera.t.png")).shape[1] == 16
    else:
        assert names == ["camera.t.png"] and (out / "camera.t.png").read_bytes() == b"theirs"
        assert "skipped:" in done.stdout


def test_bad_recipes_stop_the_command_before_any_upload(endpoint: str, tmp_path: Path) -> None:
    import requests

    before = requests.get(f"{endpoint}/health", timeout=5).json()["processed"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**WEB, "outputs": [
        {"name": "o", "steps": [{"op": "resize", "width": -5}]}]}))
    done = cli("--endpoint", endpoint, "--recipe", str(bad), str(IMAGES / "camera.png"))
    assert done.returncode == 2
    assert "outputs[1] (o) step 1: parameter width=-5 is invalid" in done.stderr
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({**WEB, "version": 3}))
    done = cli("--endpoint", endpoint, "--recipe", str(newer), str(IMAGES / "camera.png"))
    assert done.returncode == 2 and "recipe version 3 is not supported" in done.stderr
    done = cli("--endpoint", endpoint, "--recipe", str(bad), "--format", "png",
               str(IMAGES / "camera.png"))
    assert done.returncode == 2 and "--format cannot go with --recipe" in done.stderr
    done = cli("--endpoint", endpoint, "--op", "grayscale", "--recipe", str(bad),
               str(IMAGES / "camera.png"))
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    done = cli("--endpoint", endpoint, "--op", "grayscale", "--name-template", "{nope}",
               str(IMAGES / "camera.png"))
    assert done.returncode == 2 and "unknown field {nope}" in done.stderr
    assert requests.get(f"{endpoint}/health", timeout=5).json()["processed"] == before


# --------------------------------------------------------------------------- the app's model


def test_a_recipe_run_sends_one_request_per_output_and_counts_results() -> None:
    from gui.viewmodel.batch import Overall
    from gui.viewmodel.requests import output_requests, recipe_request

    request = recipe_request(web_recipe(), 600)
    sent = output_requests(request)
    assert [out.name for out, _kwargs in sent] == ["large", "small", "thumb"]
    assert sent[1][1] == {"steps": [{"op": "rotate", "angle": 0, "expand": False},
                                    {"op": "resize", "width": 64}],
                          "format": "webp", "quality": None, "expires_in": 600}
    assert request.client_kwargs() == sent[0][1]  # the quick preview shows the first output
    assert request.same_output(recipe_request(web_recipe(), 60))  # lifetime does not count
    assert not request.same_output(recipe_request(
        parse_recipe({**WEB, "outputs": WEB["outputs"][:2]}), 600))
    overall = Overall(0.5, 1, 0, 0, 1, 0, 2, outputs=3)
    assert overall.text.startswith("1 of 2 images done (3 of 6 results)")


def test_settings_refuse_a_bad_name_template() -> None:
    from gui.settings import SettingsError, parse_settings

    assert parse_settings({"name_template": "{n:04}.{ext}"}).name_template == "{n:04}.{ext}"
    with pytest.raises(SettingsError, match=r"name_template: .*unknown field \{size\}"):
        parse_settings({"name_template": "{stem}.{size}"})


def test_the_app_lists_sub_folders_only_when_asked(tmp_path: Path) -> None:
    from gui.viewmodel.batch import Batch
    from gui.viewmodel.formatting import expand_paths, expand_paths_in_folders

    for relative in ("a/b/x.png", "a/y.png", "z.png", ".git/q.png", "a/.thumb.png"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    found, missing = expand_paths([tmp_path])
    assert [p.name for p in found] == ["z.png"] and not missing
    found, folders, _missing = expand_paths_in_folders([tmp_path], recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["z.png", "a/y.png",
                                                                    "a/b/x.png"]
    batch = Batch()
    batch.add(found, folders=folders)
    assert [job.folder for job in batch.jobs] == ["", "a", "a/b"]
