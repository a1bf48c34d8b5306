"""The desktop app's pure logic, with no Tk and no display: settings, parameter schema →
controls, requests, batch state and progress arithmetic, fleet rows, formatting, the
preview images, and the worker thread's queue."""

from __future__ import annotations

import errno
import io
import json
import math
import stat
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gui import client as api
from gui.client import ProcessResult
from gui.connection import (
    choose_admin_endpoint,
    choose_admin_token,
    choose_endpoint,
    choose_token,
)
from gui.preview import (
    PreviewError,
    compose_split,
    downscaled_bytes,
    fit_within,
    open_image,
    thumbnail,
)
from gui.settings import (
    Settings,
    SettingsError,
    load_settings,
    parse_settings,
    save_settings,
    settings_path,
)
from gui.viewmodel.batch import (
    Batch,
    JobStatus,
    order_depends_on_state,
    order_ids,
    phase_fraction,
    status_text,
)
from gui.viewmodel.errors import describe_error, describe_fleet_error, describe_os_error
from gui.viewmodel.fleet import (
    event_lines,
    fleet_rows,
    fleet_totals,
    format_duration,
    parse_desired,
)
from gui.viewmodel.formatting import expand_paths, format_expiry, parse_path_list
from gui.viewmodel.params import SchemaError, coerce_value, control_for, controls_for, format_value
from gui.viewmodel.requests import (
    OutputSettings,
    RequestStep,
    build_request,
    describe_request,
    describe_step,
    result_filename,
)
from gui.worker import AsyncWorker

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES = REPO_ROOT.parent / "shared" / "testdata" / "images"
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_no_tk_in_the_pure_modules() -> None:
    """The logic tested here must load without Tk (it runs in CI without a display)."""
    import subprocess

    # Every module of the gui.viewmodel package, so a new one is covered too.
    viewmodels = ", ".join(f"gui.viewmodel.{p.stem}"
                           for p in sorted((REPO_ROOT / "gui" / "viewmodel").glob("[!_]*.py")))
    code = (f"import sys; import {viewmodels}, gui.settings, gui.preview, gui.worker, "
            "gui.connection; print('tkinter' in sys.modules, 'customtkinter' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == ["False", "False"]


# --------------------------------------------------------------------------- settings


def test_settings_path_follows_xdg_then_home() -> None:
    assert settings_path({"XDG_CONFIG_HOME": "/x/cfg", "HOME": "/h"}) == Path(
        "/x/cfg/imagefleet/settings.json")
    assert settings_path({"HOME": "/h"}) == Path("/h/.config/imagefleet/settings.json")


def test_parse_settings_accepts_form_text_and_normalises() -> None:
    s = parse_settings({"endpoint": " http://lb.example.com/ ", "token": " t ",
                        "link_ttl_s": "7200", "concurrency": "8", "appearance": "Dark",
                        "fleet_size": 3})
    assert s == Settings("http://lb.example.com", "t", 7200, 8, "dark", 3)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("endpoint", "ftp://x", "endpoint must be an http:// or https:// URL"),
    ("admin_endpoint", "localhost:9000", "admin_endpoint must be an http:// or https:// URL"),
    ("link_ttl_s", 10, "link_ttl_s must be from 60 to 604800, got 10"),
    ("link_ttl_s", 8 * 86400, "link_ttl_s must be from 60 to 604800"),
    ("concurrency", "many", "concurrency must be a whole number from 1 to 32"),
    ("concurrency", True, "concurrency must be a whole number"),
    ("fleet_size", 0, "fleet_size must be from 1 to 8, got 0"),
    ("appearance", "blue", "appearance must be one of system, light, dark"),
    ("colour", "red", "unknown setting 'colour'"),
])
def test_parse_settings_names_each_problem(field: str, value: Any, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings({field: value})
    assert message in str(info.value)


def test_parse_settings_reports_every_problem_at_once() -> None:
    with pytest.raises(SettingsError) as info:
        parse_settings({"concurrency": 0, "fleet_size": 99})
    assert len(info.value.problems) == 2


def test_settings_round_trip_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "imagefleet" / "settings.json"
    assert load_settings(path).settings == Settings()  # missing: defaults, no warning
    assert load_settings(path).warning is None
    saved = Settings(endpoint="https://lb", token="secret", link_ttl_s=600, concurrency=2,
                     appearance="light", fleet_size=1)
    save_settings(saved, path)
    assert load_settings(path).settings == saved
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it may hold the token
    assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize(("content", "warning"), [
    ("{broken", "is not valid JSON (line 1"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"concurrency": -1}), "concurrency must be from 1 to 32"),
])
def test_a_broken_settings_file_gives_defaults_and_a_message(
        tmp_path: Path, content: str, warning: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(content)
    loaded = load_settings(path)
    assert loaded.settings == Settings()
    assert loaded.warning is not None
    assert warning in loaded.warning and str(path) in loaded.warning


def test_endpoint_precedence_flag_env_settings_then_embedded() -> None:
    settings = Settings(endpoint="http://from-settings")
    assert choose_endpoint("http://flag/", {"IMAGEFLEET_ENDPOINT": "http://env"},
                           settings) == "http://flag"
    assert choose_endpoint(None, {"IMAGEFLEET_ENDPOINT": "http://env"}, settings) == "http://env"
    assert choose_endpoint(None, {}, settings) == "http://from-settings"
    assert choose_endpoint(None, {}, Settings()) == ""
    assert choose_admin_endpoint(None, {}, Settings(admin_endpoint="http://admin:9/")) == \
        "http://admin:9"
    assert choose_admin_endpoint("http://flag", {"IMAGEFLEET_ADMIN_ENDPOINT": "http://env"},
                                 Settings()) == "http://flag"
    assert choose_admin_endpoint(None, {}, Settings()) == ""
    assert choose_token({"IMAGEFLEET_TOKEN": "e"}, Settings(token="s")) == "e"
    assert choose_token({}, Settings()) is None


def test_the_admin_token_is_a_setting_of_its_own() -> None:
    """An AWS fleet's /fleet needs the admin token, not the API token: kept like it (in
    the 0600 settings file), overridden by IMAGEFLEET_ADMIN_TOKEN, checked for form."""
    settings = parse_settings({"admin_token": " adm1n-token "})
    assert settings.admin_token == "adm1n-token" and settings.token == ""
    assert choose_admin_token({}, settings) == "adm1n-token"
    assert choose_admin_token({"IMAGEFLEET_ADMIN_TOKEN": "from-env"}, settings) == "from-env"
    assert choose_admin_token({}, Settings()) is None
    with pytest.raises(SettingsError, match="admin_token may not contain spaces"):
        parse_settings({"admin_token": "two words"})
    assert "Set the admin token in Settings" in describe_fleet_error(
        api.ServerError(401, "unauthorized", "missing or wrong token"), "https://lb")
    assert describe_fleet_error(api.ServerError(400, "invalid_desired", "1..4")) == \
        describe_error(api.ServerError(400, "invalid_desired", "1..4"))


# --------------------------------------------------------------------------- schema


def param(name: str, type_: str, default: Any, low: Any = None, high: Any = None,
          choices: Any = None) -> api.ParamSpec:
    return api.ParamSpec(name, type_, default, low, high, choices)


def test_each_parameter_type_gets_its_control() -> None:
    assert control_for(param("invert", "bool", False)).kind == "checkbox"
    dropdown = control_for(param("mode", "choice", "tree", choices=("external", "tree")))
    assert (dropdown.kind, dropdown.choices, dropdown.default) == (
        "dropdown", ("external", "tree"), "tree")
    small_int = control_for(param("threshold", "int", 127, 0, 255))
    assert (small_int.kind, small_int.steps, small_int.default) == ("slider", 255, 127)
    wide_int = control_for(param("width", "int", 640, 1, 20000))
    assert wide_int.kind == "spinbox" and wide_int.increment == 1
    open_int = control_for(param("seed", "int", 0))
    assert open_int.kind == "spinbox"
    float_range = control_for(param("sigma", "float", 1.5, 0.0, 100.0))
    assert (float_range.kind, float_range.steps) == ("slider", 1000)  # 0.1 resolution
    assert control_for(param("scale", "float", 1.0, 0.0, None)).kind == "spinbox"


def test_odd_only_parameters_get_odd_slider_positions() -> None:
    spec = control_for(api.ParamSpec("ksize", "int", 15, 1.0, 151.0, odd=True,
                                description="kernel size"))
    assert (spec.minimum, spec.maximum, spec.steps) == (1, 151, 75)
    positions = {spec.minimum + i * (spec.maximum - spec.minimum) / spec.steps
                 for i in range(spec.steps + 1)}
    assert all(int(p) % 2 == 1 for p in positions)
    assert coerce_value(spec, 14.2) == 15  # a slider value between two odd positions
    assert spec.description == "kernel size"
    even_ends = control_for(api.ParamSpec("block", "int", 11, 2, 256, odd=True))
    assert (even_ends.minimum, even_ends.maximum) == (3, 255)


@pytest.mark.parametrize(("low", "high", "default", "steps"), [
    (0.1, 40.0, 2.0, 399),     # clip limit: 0.1 resolution
    (0.1, 10.0, 1.0, 990),     # gamma: 0.01
    (-255.0, 255.0, 0.0, 510),  # brightness: 1
    (0.0, 1.0, 0.25, 1000),    # sepia strength: 0.001
    (0.0, 3.0, 0.0005, 30000),  # a default off the first grid: a finer one is chosen
])
def test_float_sliders_hit_the_default_exactly(low: float, high: float, default: float,
                                               steps: int) -> None:
    spec = control_for(param("x", "float", default, low, high))
    assert spec.steps == steps
    positions = [low + i * (high - low) / spec.steps for i in range(spec.steps + 1)]
    assert any(coerce_value(spec, p) == default for p in positions)
    assert coerce_value(spec, positions[-1]) == high


def test_unknown_parameter_types_are_refused_not_skipped() -> None:
    with pytest.raises(SchemaError, match="'colour' has type 'rgb'"):
        control_for(param("colour", "rgb", "#fff"))
    with pytest.raises(SchemaError, match="gave no choices"):
        control_for(param("mode", "choice", None, choices=()))


def test_every_operation_the_server_offers_gets_controls() -> None:
    """The schema the real server publishes, through the real client parser."""
    from server.operations import default_registry

    body = {"operations": [op.to_json() for op in default_registry().values()]}
    operations = api.parse_operations(body)
    assert len(operations) >= 5
    for op in operations:
        specs = controls_for(op)
        assert [s.name for s in specs] == [p.name for p in op.params]
        for spec in specs:  # every default is itself valid for its control
            assert coerce_value(spec, spec.default) == spec.default


@pytest.mark.parametrize(("raw", "expected"), [("3", 3), (" 10 ", 10), (0, 0)])
def test_coerce_int_in_range(raw: Any, expected: int) -> None:
    spec = control_for(param("n", "int", 1, 0, 10))
    assert coerce_value(spec, raw) == expected


@pytest.mark.parametrize(("spec_args", "raw", "message"), [
    (("n", "int", 1, 0, 10), "11", "N must be from 0 to 10, got 11"),
    (("n", "int", 1, 0, 10), "abc", "N must be a number from 0 to 10, got 'abc'"),
    (("n", "int", 1, 0, 20000), "2.5", "N must be a whole number from 0 to 20000"),
    (("n", "float", 1, 0.5, None), "0.1", "N must be of at least 0.5"),
    (("n", "float", 1, None, None), "nan", "N must be a finite number"),
    (("mode", "choice", "a", None, None, ("a", "b")), "c", "Mode must be one of a, b"),
])
def test_coerce_rejects_with_the_allowed_range(spec_args: tuple, raw: str, message: str) -> None:
    spec = control_for(param(*spec_args))
    with pytest.raises(ValueError) as info:
        coerce_value(spec, raw)
    assert message in str(info.value)


def test_float_slider_values_are_rounded_and_formatted() -> None:
    spec = control_for(param("sigma", "float", 1.0, 0.0, 10.0))
    assert coerce_value(spec, 2.3000000000000003) == pytest.approx(2.3)
    assert format_value(spec, 2.3000000000000003) == "2.3"
    assert format_value(control_for(param("n", "int", 1, 0, 9)), 4.6) == "5"
    assert coerce_value(control_for(param("b", "bool", False)), "true") is True


# --------------------------------------------------------------------------- requests


def test_single_operation_request() -> None:
    request = build_request(operation="gaussian_blur", params={"ksize": 5}, pipeline=[],
                            output_format="png", quality=80, expires_in=600)
    assert request.client_kwargs() == {"operation": "gaussian_blur", "params": {"ksize": 5},
                                       "format": "png", "quality": None, "expires_in": 600}
    assert request.label == "gaussian_blur"


def test_pipeline_wins_over_the_selected_operation() -> None:
    steps = [RequestStep("grayscale"), RequestStep("gaussian_blur", {"ksize": 7})]
    request = build_request(operation="invert", params={}, pipeline=steps,
                            output_format="jpeg", quality=70, expires_in=None)
    assert request.client_kwargs()["steps"] == [{"op": "grayscale"},
                                                {"op": "gaussian_blur", "ksize": 7}]
    assert "operation" not in request.client_kwargs()
    assert request.quality == 70 and request.format == "jpeg"
    assert request.label == "grayscale+gaussian_blur"
    assert describe_step(steps[1], {"gaussian_blur": "Gaussian blur"}) == \
        "Gaussian blur (ksize=7)"


def test_output_settings_reach_the_client_and_the_runs_line() -> None:
    plain = build_request(operation="invert", params={}, pipeline=[], output_format="jpeg",
                          quality=85, expires_in=None)
    assert set(plain.client_kwargs()) == {"operation", "params", "format", "quality",
                                          "expires_in"}  # defaults: nothing extra sent
    output = OutputSettings(progressive=True, subsampling="4:4:4", icc="keep",
                            metadata="keep-no-location")
    request = build_request(operation="invert", params={}, pipeline=[], output_format="jpeg",
                            quality=85, expires_in=None, output=output)
    assert request.client_kwargs() == {
        "operation": "invert", "params": {}, "format": "jpeg", "quality": 85,
        "expires_in": None, "progressive": True, "subsampling": "4:4:4", "icc": "keep",
        "metadata": "keep-no-location"}
    assert describe_request(request) == ("invert · jpeg, quality 85, progressive, chroma 4:4:4, "
                                         "ICC profile kept, metadata kept but location")
    # Other options make other results: what was made before is stale.
    assert not request.same_output(plain)
    lossless = build_request(operation="invert", params={}, pipeline=[], output_format="webp",
                             quality=85, expires_in=None, output=OutputSettings(lossless=True,
                                                                                progressive=True))
    assert lossless.quality is None
    assert describe_request(lossless) == "invert · webp, lossless"  # progressive: JPEG only
    with pytest.raises(ValueError, match="metadata must be one of strip"):
        OutputSettings(metadata="all")


def test_request_needs_an_operation_and_a_known_format() -> None:
    with pytest.raises(ValueError, match="choose an operation"):
        build_request(operation=None, params={}, pipeline=[], output_format="png", quality=90,
                      expires_in=None)
    with pytest.raises(ValueError, match="output format must be one of original, png"):
        build_request(operation="invert", params={}, pipeline=[], output_format="gif",
                      quality=90, expires_in=None)
    original = build_request(operation="invert", params={}, pipeline=[],
                             output_format="original", quality=90, expires_in=None)
    assert original.format is None


def test_result_filenames() -> None:
    assert result_filename(Path("/a/cat.photo.jpg"), "invert", "jpeg") == "cat.photo.invert.jpg"
    assert result_filename(Path("x.png"), "grayscale-sepia", "webp") == "x.grayscale-sepia.webp"


# --------------------------------------------------------------------------- batch


def result(url: str = "http://x/r") -> ProcessResult:
    return ProcessResult(key="", url=url, expires_at=NOW + timedelta(hours=1),
                         instance_id="w1", width=10, height=10, format="png", bytes=100,
                         cached=False, tiles=1, timings_ms={}, elapsed_s=0.25)


def batch_of(*names: str) -> Batch:
    batch = Batch()
    outcome = batch.add(Path(f"/imgs/{n}") for n in names)
    assert not outcome.skipped
    return batch


def test_add_skips_duplicates_and_non_images() -> None:
    batch = batch_of("a.png")
    outcome = batch.add([Path("/imgs/a.png"), Path("/imgs/notes.txt"), Path("/imgs/b.JPG")])
    assert [j.name for j in outcome.added] == ["b.JPG"]
    assert [(Path(p).name, why.split(" (")[0]) for p, why in outcome.skipped] == [
        ("a.png", "already in the list"), ("notes.txt", "not an image file")]
    assert len(batch) == 2


def test_phase_fraction_maps_each_phase_into_its_span() -> None:
    assert phase_fraction("uploading", 0) == 0
    assert phase_fraction("uploading", 1) == pytest.approx(0.45)
    assert phase_fraction("processing", 0) == pytest.approx(0.45)
    assert phase_fraction("downloading", 0.5) == pytest.approx(0.925)
    assert phase_fraction("done", 0) == 1
    assert phase_fraction("uploading", 7) == pytest.approx(0.45)  # clamped
    assert phase_fraction("uploading", math.nan) == 0
    assert phase_fraction("mystery", 0.5) == 0


def test_a_run_from_start_to_finish() -> None:
    batch = batch_of("a.png", "b.png", "c.png")
    started = batch.start()
    assert [j.status for j in started] == [JobStatus.QUEUED] * 3
    a, b, c = started
    assert batch.running
    batch.progress(a.id, a.ticket, "uploading", 1.0)
    batch.progress(b.id, b.ticket, "downloading", 0.0)
    overall = batch.overall()
    assert overall.fraction == pytest.approx((0.45 + 0.85 + 0) / 3)
    assert (overall.active, overall.queued, overall.total) == (2, 1, 3)
    batch.finish(a.id, a.ticket, result())
    batch.fail(b.id, b.ticket, "400 bad parameter: ksize must be odd")
    cancelled = batch.cancel_waiting()
    assert [j.id for j in cancelled] == [c.id]
    overall = batch.overall()
    # done and failed are behind us; a cancelled image was not processed, so the bar
    # does not claim it (a full bar after Cancel read as "all done")
    assert overall.fraction == pytest.approx(2 / 3)
    assert overall.text == "1 of 3 done · 1 failed · 1 cancelled"
    assert not batch.running
    assert status_text(batch.get(b.id)) == "400 bad parameter: ksize must be odd"
    assert status_text(batch.get(a.id)) == "10×10 png · 250 ms"


def test_progress_never_runs_backwards_even_on_retry() -> None:
    batch = batch_of("a.png")
    (job,) = batch.start()
    batch.progress(job.id, job.ticket, "processing", 0)
    batch.progress(job.id, job.ticket, "retrying", 0, "503; attempt 2 in 0.3 s")
    assert batch.get(job.id).status == JobStatus.RETRYING
    assert batch.get(job.id).progress == pytest.approx(0.45)
    batch.progress(job.id, job.ticket, "uploading", 0.1)
    assert batch.get(job.id).progress == pytest.approx(0.45)
    assert batch.get(job.id).status == JobStatus.UPLOADING


def test_events_of_an_earlier_run_are_ignored_after_retry() -> None:
    batch = batch_of("a.png")
    (first,) = batch.start()
    batch.fail(first.id, first.ticket, "boom")
    (second,) = batch.start([first.id])
    assert second.ticket == first.ticket + 1 and second.message == ""
    assert batch.progress(first.id, first.ticket, "uploading", 1.0) is None
    assert batch.finish(first.id, first.ticket, result()) is None
    assert batch.get(first.id).status == JobStatus.QUEUED
    assert batch.finish(second.id, second.ticket, result()) is not None


def test_finished_images_ignore_late_progress_and_done_phase() -> None:
    batch = batch_of("a.png")
    (job,) = batch.start()
    batch.finish(job.id, job.ticket, result())
    assert batch.progress(job.id, job.ticket, "uploading", 0.5) is None
    (again,) = batch.start()
    assert batch.progress(again.id, again.ticket, "done", 1.0) is None  # finish() decides


def test_start_skips_images_already_running_and_remove_refuses_active_ones() -> None:
    batch = batch_of("a.png", "b.png")
    a, b = batch.start()
    batch.progress(a.id, a.ticket, "uploading", 0.2)
    assert batch.start() == []
    assert not batch.remove(a.id)
    assert batch.remove(b.id)  # only waiting: removing it is fine
    assert len(batch) == 1
    assert batch.overall().total == 1


def test_counts_are_kept_incrementally_and_match_a_scan() -> None:
    batch = batch_of(*(f"i{n:03d}.jpg" for n in range(200)))
    jobs = batch.start()
    for job in jobs[:50]:
        batch.progress(job.id, job.ticket, "uploading", 0.5)
    for job in jobs[:30]:
        batch.finish(job.id, job.ticket, result())
    for job in jobs[30:40]:
        batch.fail(job.id, job.ticket, "boom")
    batch.remove(jobs[199].id)
    overall = batch.overall()
    scan = [batch.get(j.id) for j in jobs[:199]]
    assert overall.total == 199
    assert overall.done == sum(j.status == JobStatus.DONE for j in scan) == 30
    assert overall.failed == 10 and overall.active == 10 and overall.queued == 149
    assert overall.fraction == pytest.approx((40 + 10 * 0.225) / 199, abs=1e-3)
    assert batch.running


def test_cancel_run_keeps_finished_results_and_earlier_results_of_re_runs() -> None:
    batch = batch_of("a.png", "b.png", "c.png", "d.png")
    a, b, c, d = batch.start()
    batch.finish(a.id, a.ticket, result("http://x/a"))
    batch.progress(b.id, b.ticket, "processing", 0.0)
    stopped = batch.cancel_run()
    assert {j.id for j in stopped} == {b.id, c.id, d.id}
    assert not batch.running
    overall = batch.overall()
    assert overall.text == "1 of 4 done · 3 cancelled"
    assert overall.fraction == pytest.approx(0.25)  # the bar shows done / total
    # a new run of everything, cancelled at once: a keeps its earlier result
    batch.start()
    batch.cancel_run()
    again = batch.get(a.id)
    assert again.status == JobStatus.DONE and again.result.url == "http://x/a"
    assert batch.get(b.id).status == JobStatus.CANCELLED


def test_adding_ten_thousand_files_is_linear() -> None:
    import time

    batch = Batch()
    started = time.perf_counter()
    for chunk in range(10):
        batch.add(Path(f"/imgs/{chunk}-{n}.jpg") for n in range(1000))
    assert len(batch) == 10_000
    assert time.perf_counter() - started < 2.0  # O(n) in all; O(n^2) took minutes
    assert batch.add([Path("/imgs/3-7.jpg")]).skipped


def test_order_and_filter_of_the_list() -> None:
    batch = batch_of("b.png", "C.png", "a.png", "d.png")
    b, c, a, d = batch.start()
    batch.finish(a.id, a.ticket, result())
    batch.fail(d.id, d.ticket, "boom")
    jobs = batch.jobs
    assert order_ids(jobs) == [b.id, c.id, a.id, d.id]
    assert order_ids(jobs, "name") == [a.id, b.id, c.id, d.id]  # case does not matter
    assert order_ids(jobs, "state") == [d.id, b.id, c.id, a.id]  # failed first, done last
    assert order_ids(jobs, "name", "failed") == [d.id]
    assert order_ids(jobs, "added", "done") == [a.id]
    assert order_ids(jobs, "name", "pending") == [b.id, c.id]
    assert not order_depends_on_state("name", "all")
    assert order_depends_on_state("added", "done")
    with pytest.raises(ValueError):
        order_ids(jobs, "size")


# --------------------------------------------------------------------------- fleet


def test_fleet_rows_totals_and_events_from_the_client_types() -> None:
    state = api.FleetState(
        name="local", provider="local", desired=3, min=1, max=5,
        instances=(
            api.FleetInstance("w2", "running", "unhealthy", "127.0.0.1:2", 0,
                              NOW - timedelta(seconds=42)),
            api.FleetInstance("w1", "running", "healthy", "127.0.0.1:1", 2,
                              NOW - timedelta(hours=1, minutes=3)),
            api.FleetInstance("w3", "pending", "initial", None, 0, None),
        ),
        events=(
            api.FleetEvent(NOW - timedelta(minutes=5), "launched", "w1", "0 of 3"),
            api.FleetEvent(NOW - timedelta(minutes=1), "replaced", "w2", "failed checks"),
        ),
    )
    rows = fleet_rows(state.instances, NOW)
    assert [(r.id, r.health, r.address, r.inflight, r.uptime) for r in rows] == [
        ("w1", "healthy", "127.0.0.1:1", 2, "1h 03m"),
        ("w2", "unhealthy", "127.0.0.1:2", 0, "42s"),
        ("w3", "initial", "—", 0, "—"),
    ]
    totals = fleet_totals(state)
    assert (totals.healthy, totals.desired, totals.minimum, totals.maximum) == (1, 3, 1, 5)
    assert totals.text == "1 healthy / 3 desired · min 1 · max 5"
    lines = event_lines(state.events)
    assert "replaced" in lines[0] and "launched" in lines[1]


def test_fleet_rows_from_the_json_shape_as_the_client_validates_it() -> None:
    rows = fleet_rows([api.FleetInstance.model_validate({
        "id": "i-1", "state": "running", "health": "draining", "address": "10.0.0.1:8080",
        "inflight": 1, "launched_at": "2026-11-23T11:00:00Z"})], NOW)
    assert rows[0].uptime == "1h 00m"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59, "59s"), (61, "1m 01s"), (3600, "1h 00m"), (90000, "1d 01h"), (-5, "0s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_parse_desired_within_min_and_max() -> None:
    assert parse_desired(" 3 ", 1, 5) == 3
    with pytest.raises(ValueError, match="from 1 to 5, got 9"):
        parse_desired("9", 1, 5)
    with pytest.raises(ValueError, match="whole number from 1 to 5, got 'x'"):
        parse_desired("x", 1, 5)


# --------------------------------------------------------------------------- formatting


def test_expiry_is_shown_as_time_left_or_expired() -> None:
    assert format_expiry(NOW + timedelta(minutes=59, seconds=30), NOW).startswith(
        "link expires in 59m 30s (")
    assert format_expiry(NOW - timedelta(seconds=1), NOW).startswith("link expired at ")


def test_pasted_and_dropped_paths() -> None:
    text = ("/photos/a.png\n"
            "  'quoted name.jpg'  \n"
            "\n# a comment\n"
            "file:///photos/with%20space.png\n"
            "{/tk drop/one.png} /tk/two.png\n")
    assert parse_path_list(text) == ["/photos/a.png", "quoted name.jpg",
                                     "/photos/with space.png", "/tk drop/one.png",
                                     "/tk/two.png"]
    assert parse_path_list("file:///a.png file:///b.png") == ["/a.png", "/b.png"]


def test_expand_paths_lists_folder_images_and_reports_missing(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    found, missing = expand_paths([tmp_path, tmp_path / "gone.png"])
    assert [p.name for p in found] == ["a.jpg", "b.png"]
    assert missing == [(str(tmp_path / "gone.png"), "no such file or folder")]


def test_errors_are_described_for_people() -> None:
    endpoint = "http://lb"
    assert "missing or wrong token (401)" in describe_error(
        api.ServerError(401, "unauthorized", "bad token"), endpoint)
    assert describe_error(api.ServerError(413, "too_large", "image has 120 MP, max 100"),
                          endpoint) == "Too large for the server (413): image has 120 MP, max 100"
    assert describe_error(api.ServerError(400, "bad_parameter", "ksize must be odd")) == \
        "ksize must be odd (400)"
    assert describe_error(api.ConnectError("refused"), endpoint).startswith(
        "Cannot reach http://lb: refused")
    full = OSError(errno.ENOSPC, "No space left on device", "/media/out.png")
    assert describe_os_error(full, "save") == (
        "Disk full: could not save /media/out.png. Free some space and try again.")
    assert "permission denied" in describe_error(
        PermissionError(errno.EACCES, "Permission denied", "/root/x"))


# --------------------------------------------------------------------------- preview


def test_preview_images() -> None:
    img = open_image(IMAGES / "astronaut.png")
    assert thumbnail(img).size == (56, 56)
    data, fmt = downscaled_bytes(img, side=128)
    small = Image.open(io.BytesIO(data))
    assert max(small.size) == 128 and fmt == "png"
    photo = open_image(IMAGES / "rocket.jpg")
    assert downscaled_bytes(photo)[1] == "jpeg"
    assert fit_within(Image.new("L", (400, 100)), 200, 200).size == (200, 50)


def test_compose_split_shows_before_left_and_after_right() -> None:
    before = Image.new("RGB", (100, 50), "red")
    after = Image.new("RGB", (100, 50), "blue")
    out = compose_split(before, after, 0.3, (200, 100))
    assert out.size == (200, 100)
    assert out.getpixel((10, 50)) == (255, 0, 0)
    assert out.getpixel((190, 50)) == (0, 0, 255)
    assert out.getpixel((60, 50)) == (255, 255, 255)  # the divider at 30%


def test_open_image_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(PreviewError, match=r"bad\.png: not a readable image"):
        open_image(bad)
    with pytest.raises(PreviewError, match=r"gone\.png: file not found"):
        open_image(tmp_path / "gone.png")


# --------------------------------------------------------------------------- worker


def drain_until(worker: AsyncWorker, predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        worker.drain()
        assert time.monotonic() < deadline, "timed out draining the worker queue"
        time.sleep(0.005)


def test_worker_runs_coroutines_and_posts_outcomes_to_the_calling_thread() -> None:
    import asyncio

    before = threading.active_count()
    worker = AsyncWorker()
    worker.start()
    seen: list[Any] = []
    ui_thread = threading.get_ident()

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return x * 2

    async def fail() -> None:
        raise ValueError("bad input")

    worker.submit(double(21), lambda v: seen.append((v, threading.get_ident() == ui_thread)))
    worker.submit(fail(), on_error=lambda exc: seen.append(str(exc)))
    drain_until(worker, lambda: len(seen) == 2)
    assert (42, True) in seen and "bad input" in seen

    cleaned: list[bool] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def cleanup() -> None:
        cleaned.append(True)

    pending = worker.submit(forever(), lambda _v: seen.append("never"))
    worker.stop(cleanup=cleanup)
    assert pending.cancelled() or pending.done()
    assert cleaned == [True]
    assert worker.drain() == 0 and "never" not in seen
    assert threading.active_count() == before
    with pytest.raises(RuntimeError, match="stopping"):
        worker.submit(double(1))


def test_a_step_round_trips_through_both_payload_forms() -> None:
    step = RequestStep("canny", {"threshold1": 50, "threshold2": 150})
    assert step.to_payload() == {"op": "canny", "threshold1": 50, "threshold2": 150}
    assert RequestStep.from_payload(step.to_payload()) == step
    journaled = {"op": "canny", "params": dict(step.params)}  # the app journal's form
    assert RequestStep.from_payload(journaled) == step
    assert RequestStep.from_payload({"op": "invert"}) == RequestStep("invert", {})
