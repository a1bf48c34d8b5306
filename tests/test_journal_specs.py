"""The app's journal specs (``gui.journal_controller``): a request written to the journal
reads back as the same request, a recipe's outputs included, and a command-line batch's
spec reads as the request the app runs for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gui.journal_controller import request_spec, spec_request
from gui.recipes import parse_recipe
from gui.viewmodel.requests import OutputSettings, ProcessRequest, RequestStep, recipe_request
from scripts.batch_journal import job_spec

RECIPE = {
    "version": 1, "name": "web",
    "steps": [{"op": "rotate", "angle": 90}],
    "outputs": [
        {"name": "large", "steps": [{"op": "resize", "width": 2048}], "format": "jpeg",
         "quality": 85, "progressive": True},
        {"name": "thumb", "steps": [{"op": "resize", "width": 256}], "format": "webp",
         "template": "{stem}.thumb.{ext}"},
    ],
}


@pytest.mark.parametrize("request_", [
    ProcessRequest("gaussian_blur", {"ksize": 5}, None, "png", None, 3600),
    ProcessRequest(None, None, (RequestStep("grayscale"), RequestStep("resize", {"width": 512})),
                   "jpeg", 80, 600, output=OutputSettings(progressive=True, metadata="keep")),
    recipe_request(parse_recipe(RECIPE), 86400),
], ids=["operation", "pipeline-with-options", "recipe"])
def test_a_request_survives_the_journal(request_: ProcessRequest) -> None:
    spec = json.loads(json.dumps(request_spec(request_)))  # as SQLite stores it
    back = spec_request(spec)
    assert back.same_output(request_)
    assert back.expires_in == request_.expires_in
    assert [o.name for o in back.outputs] == [o.name for o in request_.outputs]


def test_a_command_line_batch_reads_as_the_request_it_ran() -> None:
    spec = job_spec(runs=[("", {"operation": "gaussian_blur", "params": {"ksize": 5},
                                "format": "png"})],
                    operation="gaussian_blur", raw_params={"ksize": "5"}, steps=None,
                    recipe=None, name_template=None, folders=[], encoder={"lossless": True},
                    format="png", quality=None, out_dir=Path("out"), on_conflict="unique",
                    recursive=False)
    request = spec_request(json.loads(json.dumps(spec)))
    assert request.operation == "gaussian_blur"
    assert request.params == {"ksize": 5}  # the checked, typed value, not the raw "5"
    assert request.format == "png"
    assert request.output.lossless


def test_a_command_line_recipe_batch_reads_as_its_recipe() -> None:
    recipe = parse_recipe(RECIPE)
    spec = job_spec(runs=[("large", {}), ("thumb", {})], operation=None, raw_params={},
                    steps=None, recipe=recipe.model_dump(mode="json"), name_template=None,
                    folders=[], encoder={}, format=None, quality=None, out_dir=None,
                    on_conflict="unique", recursive=False)
    request = spec_request(json.loads(json.dumps(spec)))
    assert request.recipe == "web"
    assert [o.name for o in request.outputs] == ["large", "thumb"]
    assert request.same_output(recipe_request(recipe, None))


def test_a_spec_without_an_operation_is_refused() -> None:
    with pytest.raises(ValueError, match="names no operation"):
        spec_request({"kind": "app-request", "operation": None, "steps": None})
