"""Tests for `python -m scripts.process`: pure helpers, then the command end to end
against the real processing server (`python -m server` under waitress) on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import free_port
from waiting import wait_until

from gui.client import Job, JobOutcome, OperationSpec, ParamSpec, ProcessResult, ProgressEvent
from gui.journal import Journal
from scripts.process import (
    ProgressDisplay,
    Tally,
    UsageError,
    _journal_outcome,
    coerce_params,
    coerce_value,
    expand_inputs,
    extension_for,
    main,
    output_stems,
    parse_param_pairs,
    parse_steps,
    pipeline_label,
)

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "testdata" / "images"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command as a user would; stdout and stderr are pipes (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "scripts.process", *args],
        cwd=REPO, env=env or clean_env(), capture_output=True, text=True, timeout=120,
        check=False,
    )


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """main() in-process; argparse's own usage errors exit via SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def read_image(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    image = cv2.imread(str(path), flags)
    assert image is not None, f"{path} does not decode"
    return image


def gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., 0]


# --------------------------------------------------------------------------- pure helpers

BLUR = OperationSpec("gaussian_blur", "Blur", "", (
    ParamSpec("ksize", "int", 15, 1, 151),
    ParamSpec("sigma", "float", 0.0, 0.0, 100.0),
    ParamSpec("l2", "bool", False),
    ParamSpec("mode", "choice", "fit", choices=("fit", "fill")),
), True)


def test_output_stems_keep_the_first_and_number_the_rest() -> None:
    inputs = [Path("a/photo.png"), Path("b/photo.jpg"), Path("c/Photo.webp"), Path("photo-2.png"),
              Path("other.png")]
    assert output_stems(inputs) == ["photo", "photo-3", "Photo-4", "photo-2", "other"]


def test_a_done_output_is_journaled_with_its_results_facts(tmp_path: Path) -> None:
    source = tmp_path / "a.png"
    source.write_bytes(b"image")
    result = ProcessResult(key="k", url="http://x/k", expires_at=datetime.now(UTC),
                           instance_id="w1", width=320, height=200, format="jpeg",
                           bytes=4321, cached=False, tiles=1, timings_ms={})
    journal = Journal(tmp_path / "journal.sqlite3")
    try:
        batch = journal.begin({"kind": "process"}, [source], endpoint="e", source="cli")
        _journal_outcome(journal, batch, 0, "", JobOutcome(0, Job(source), result, None),
                         f"{source}\thttp://x/k\tw1", with_out=False)
        journal.flush()
        out = journal.inputs(batch)[0].outputs[0]
        assert (out.format, out.width, out.height, out.bytes) == ("jpeg", 320, 200, 4321)
    finally:
        journal.close()

def test_pipeline_label_and_extension() -> None:
    assert pipeline_label("grayscale", None) == "grayscale"
    assert pipeline_label(None, [{"op": "grayscale"}, {"op": "invert"}]) == "grayscale+invert"
    assert (extension_for("jpeg"), extension_for("png"), extension_for("webp")) == (
        "jpg", "png", "webp")


def test_params_are_typed_by_the_operation_schema() -> None:
    raw = parse_param_pairs(["ksize=5", "sigma=1.5", "l2=yes", "mode=fill"])
    assert coerce_params(BLUR, raw) == {"ksize": 5, "sigma": 1.5, "l2": True, "mode": "fill"}
    assert coerce_params(BLUR, {"ksize": 7, "l2": False}) == {"ksize": 7, "l2": False}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ksize", "5.5", r"expected ksize \(int 1\.\.151, default 15\)"),
        ("ksize", "200", r"int 1\.\.151"),
        ("ksize", True, "int"),
        ("sigma", "nan", r"float 0\.\.100"),
        ("sigma", "-1", r"float 0\.\.100"),
        ("l2", "maybe", r"l2 \(bool, default False\)"),
        ("mode", "stretch", r"one of fit\|fill"),
    ],
)
def test_bad_param_values_name_what_is_allowed(name: str, value: object, message: str) -> None:
    spec = BLUR.param(name)
    assert spec is not None
    with pytest.raises(UsageError, match=message):
        coerce_value(spec, value)


def test_unknown_param_lists_the_valid_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown parameter 'size' for gaussian_blur; valid "
                                         r"parameters: ksize \(int 1\.\.151, default 15\); sigma"):
        coerce_params(BLUR, {"size": "3"})


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["ksize"], "NAME=VALUE"), (["=3"], "NAME=VALUE"), (["k=1", "k=2"], "given twice")],
)
def test_param_pair_syntax(pairs: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_param_pairs(pairs)


@pytest.mark.parametrize(
    ("text", "message"),
    [("[", "not valid JSON"), ("[]", "non-empty JSON list"), ('{"op": "x"}', "JSON list"),
     ('[{"ksize": 3}]', r"--steps\[0\] must be an object with an \"op\"")],
)
def test_steps_shape_is_checked(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_steps(text)


def test_expand_inputs_sorts_filters_recurses_and_dedupes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["b.png", "a.JPG", "notes.txt", "sub/c.webp", ".hidden/d.png", ".e.png"]:
        (tmp_path / name).write_bytes(b"x")
    flat = expand_inputs([str(tmp_path)])
    assert [p.name for p in flat] == ["a.JPG", "b.png"]
    deep = expand_inputs([str(tmp_path), str(tmp_path / "b.png")], recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in deep] == ["a.JPG", "b.png", "sub/c.webp"]
    explicit = expand_inputs([str(tmp_path / "notes.txt")])
    assert [p.name for p in explicit] == ["notes.txt"]  # named files are taken as given
    with pytest.raises(UsageError, match=r"no such file or folder: .*missing"):
        expand_inputs([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no images found .*--recursive"):
        expand_inputs([str(tmp_path / "empty")])


def test_progress_on_a_terminal_is_one_redrawn_line() -> None:
    stream = io.StringIO()
    tally = Tally(total=2)
    display = ProgressDisplay(stream, tally, is_tty=True)
    display.event(ProgressEvent(0, "a.png", "uploading", 0.5))
    display.event(ProgressEvent(0, "a.png", "done", 1.0))
    tally.ok += 1
    display.clear()
    text = stream.getvalue()
    assert "\n" not in text
    assert text.count("\r\x1b[K") >= 3
    assert "[0/2]" in text and "a.png uploading 50%" in text
    assert text.endswith("\r\x1b[K")  # cleared before the summary


def test_a_busy_server_is_shown_as_waiting_not_as_errors() -> None:
    """Back-pressure retries: counted for the summary, one plain line per second at most
    (a shedding fleet turns dozens of requests away at once), "server busy" on a terminal."""
    stream = io.StringIO()
    tally = Tally(total=40)
    display = ProgressDisplay(stream, tally, is_tty=False)
    for i in range(30):
        display.event(ProgressEvent(i, f"img{i}.jpg", "retrying", attempt=1, busy=True,
                                    message="server busy, retrying in 1.3 s"))
    display.event(ProgressEvent(31, "x.jpg", "retrying", attempt=1,
                                message="502 bad_gateway: upstream; attempt 2 in 0.20 s"))
    lines = stream.getvalue().splitlines()
    assert lines == ["server busy (1 request asked to wait); img0.jpg: server busy, retrying "
                     "in 1.3 s",
                     "retrying x.jpg: 502 bad_gateway: upstream; attempt 2 in 0.20 s"]
    assert tally.busy == 30
    tally.ok = 40
    assert tally.summary().endswith("; server busy 30 times")
    assert "server busy" not in Tally(total=1, ok=1).summary()

    terminal = io.StringIO()
    display = ProgressDisplay(terminal, Tally(total=1), is_tty=True)
    display.event(ProgressEvent(0, "a.jpg", "retrying", busy=True,
                                message="server busy, retrying in 1.3 s"))
    assert "a.jpg: server busy, retrying in 1.3 s" in terminal.getvalue()


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["--endpoint", "http://h", "--op", "x", "--steps", "[]", "f.png"], "not allowed with"),
        (["--endpoint", "http://h", "--steps", '[{"op": "x"}]', "--param", "k=1", "f.png"],
         "--param goes with --op"),
        (["--endpoint", "http://h", "--op", "x", "--format", "gif", "f.png"],
         "'gif' is not one of png, jpeg, webp, avif"),
        (["--endpoint", "http://h", "--op", "x", "--format", "png", "--progressive", "f.png"],
         "--progressive applies to jpeg output, not --format png"),
        (["--endpoint", "http://h", "--op", "x", "--format", "jpeg", "--lossless", "f.png"],
         "--lossless applies to webp output, not --format jpeg"),
        (["--endpoint", "http://h", "--op", "x", "--format", "webp", "--subsampling", "4:4:4",
          "f.png"], "--subsampling applies to jpeg and avif output, not --format webp"),
        (["--endpoint", "http://h", "--op", "x", "--subsampling", "4:1:1", "f.png"],
         "invalid choice: '4:1:1'"),
        (["--endpoint", "http://h", "--op", "x", "--metadata", "all", "f.png"],
         "invalid choice: 'all'"),
        (["--endpoint", "http://h", "--op", "x", "--quality", "0", "f.png"],
         "0 is not within 1..100"),
        (["--endpoint", "http://h", "--op", "x", "--concurrency", "0", "f.png"],
         "not within 1..256"),
        (["--endpoint", "http://h", "--op", "x", "--patience", "-1", "f.png"],
         "'-1' must be a number of seconds >= 0"),
        (["--op", "x", "f.png"], "--endpoint is required"),
        (["--endpoint", "http://h", "--op", "x", "definitely-missing.png"],
         "no such file or folder: definitely-missing.png"),
        (["--endpoint", "http://h", "--op", "x", "--param", "ksize", str(IMAGES)],
         "--param needs NAME=VALUE"),
        (["--endpoint", "localhost:8000", "--op", "x", str(IMAGES)],
         "--endpoint: endpoint must be an http:// or https:// URL with a host"),
    ],
)
def test_usage_errors_exit_2_with_a_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("IMAGEFLEET_ENDPOINT", raising=False)
    code, out, err = run_main(argv, capsys)
    assert code == 2
    assert out == ""
    assert message in err, err


def test_endpoint_and_token_come_from_the_environment(tmp_path: Path) -> None:
    # Nothing listens on this port: the run must get as far as connecting to it.
    port = free_port()
    done = cli("--op", "grayscale", "--attempts", "1", str(IMAGES / "camera.png"),
               env=clean_env(IMAGEFLEET_ENDPOINT=f"http://127.0.0.1:{port}",
                             IMAGEFLEET_TOKEN="t"))
    assert done.returncode == 1
    assert f"cannot get the operations from http://127.0.0.1:{port}" in done.stderr
    assert "Connection refused" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def endpoint(module_server_process: Any) -> str:
    """A real `python -m server` under waitress (tests/conftest.py), shared by the module."""
    return module_server_process().url


def processed(endpoint: str) -> int:
    return requests.get(f"{endpoint}/health", timeout=5).json()["processed"]


def test_a_folder_is_processed_and_saved_with_designed_names(
    endpoint: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "grayscale", "--format", "png",
               "--concurrency", "3", "--out", str(out), str(IMAGES))
    assert done.returncode == 0, done.stderr
    sources = sorted(IMAGES.iterdir())
    lines = done.stdout.splitlines()
    assert len(lines) == len(sources)
    rows = {Path(fields[0]).name: fields for fields in (line.split("\t") for line in lines)}
    assert set(rows) == {p.name for p in sources}
    for source in sources:
        _, url, instance, saved = rows[source.name]
        assert url.startswith(f"{endpoint}/results/") and "signature=" in url
        assert instance
        assert Path(saved) == out / f"{source.stem}.grayscale.png"
    expected = cv2.cvtColor(read_image(IMAGES / "astronaut.png", cv2.IMREAD_COLOR),
                            cv2.COLOR_BGR2GRAY)
    np.testing.assert_array_equal(gray(read_image(out / "astronaut.grayscale.png")), expected)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{p.stem}.grayscale.png" for p in sources)  # no temporary files left
    assert f"[{len(sources)}/{len(sources)}] ok" in done.stderr  # plain progress lines
    assert f"{len(sources)} ok, 0 failed in" in done.stderr
    assert "images/s" in done.stderr


def test_steps_name_the_pipeline_and_typed_params_reach_the_server(
    endpoint: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    steps = json.dumps([{"op": "grayscale"}, {"op": "invert"}])
    done = cli("--endpoint", endpoint, "--steps", steps, "--out", str(out),
               str(IMAGES / "camera.png"))
    assert done.returncode == 0, done.stderr
    result = gray(read_image(out / "camera.grayscale+invert.png"))
    np.testing.assert_array_equal(result, 255 - read_image(IMAGES / "camera.png",
                                                           cv2.IMREAD_GRAYSCALE))
    blurred = cli("--endpoint", endpoint, "--op", "gaussian_blur", "--param", "ksize=5",
                  "--format", "jpeg", "--quality", "90", "--out", str(out),
                  str(IMAGES / "camera.png"))
    assert blurred.returncode == 0, blurred.stderr
    assert (out / "camera.gaussian_blur.jpg").exists()


def test_encoder_colour_and_metadata_flags_reach_the_server(
    endpoint: str, tmp_path: Path
) -> None:
    from PIL import ExifTags, Image, JpegImagePlugin

    exif = Image.Exif()
    exif[ExifTags.Base.Copyright] = "(c) CLI test"
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N",
                                  ExifTags.GPS.GPSLatitude: (1.0, 2.0, 3.0)}
    rocket = IMAGES / "rocket.jpg"  # tagged Adobe RGB (1998)
    with Image.open(rocket) as img:
        profile = img.info["icc_profile"]
        img.save(tmp_path / "rocket.jpg", quality=90, exif=exif, icc_profile=profile)
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "invert", "--format", "avif", "--icc", "keep",
               "--metadata", "keep-no-location", "--out", str(out), str(tmp_path / "rocket.jpg"))
    assert done.returncode == 0, done.stderr
    with Image.open(out / "rocket.invert.avif") as result:
        assert result.format == "AVIF" and result.info["icc_profile"] == profile
        kept = result.getexif()
        assert kept[ExifTags.Base.Copyright] == "(c) CLI test"
        assert not kept.get_ifd(ExifTags.IFD.GPSInfo)
    done = cli("--endpoint", endpoint, "--op", "invert", "--format", "jpeg", "--progressive",
               "--subsampling", "4:4:4", "--out", str(out), str(tmp_path / "rocket.jpg"))
    assert done.returncode == 0, done.stderr
    with Image.open(out / "rocket.invert.jpg") as result:
        assert result.info.get("progressive") == 1
        assert JpegImagePlugin.get_sampling(result) == 0
        assert "icc_profile" not in result.info and not result.getexif()


def test_inputs_sharing_a_stem_get_distinct_names(endpoint: str, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(IMAGES / "astronaut.png", tmp_path / "a" / "x.png")
    shutil.copy(IMAGES / "camera.png", tmp_path / "b" / "x.png")
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "invert", "--out", str(out),
               str(tmp_path / "a"), str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    first = read_image(out / "x.invert.png")
    second = read_image(out / "x-2.invert.png")
    np.testing.assert_array_equal(first, 255 - read_image(tmp_path / "a" / "x.png"))
    np.testing.assert_array_equal(second, 255 - read_image(tmp_path / "b" / "x.png"))

    # again into the same folder: unique by default, then skip, then overwrite when asked
    again = cli("--endpoint", endpoint, "--op", "invert", "--out", str(out),
                str(tmp_path / "a"), str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "x-2.invert.png", "x-3.invert.png", "x-4.invert.png", "x.invert.png"]
    assert "2 renamed, 0 skipped, 0 overwritten" in again.stderr
    np.testing.assert_array_equal(read_image(out / "x.invert.png"), first)  # untouched
    skipped = cli("--endpoint", endpoint, "--op", "invert", "--out", str(out),
                  "--on-conflict", "skip", str(tmp_path / "a"))
    assert skipped.returncode == 0, skipped.stderr
    assert f"skipped: {out / 'x.invert.png'} exists" in skipped.stdout
    assert "0 renamed, 1 skipped, 0 overwritten" in skipped.stderr
    (out / "x.invert.png").write_bytes(b"stale")
    replaced = cli("--endpoint", endpoint, "--op", "invert", "--out", str(out),
                   "--on-conflict", "overwrite", str(tmp_path / "a"))
    assert replaced.returncode == 0, replaced.stderr
    np.testing.assert_array_equal(read_image(out / "x.invert.png"), first)
    assert len(list(out.iterdir())) == 4


def test_a_failed_image_is_reported_and_the_others_still_finish(
    endpoint: str, tmp_path: Path
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    out = tmp_path / "out"
    done = cli("--endpoint", endpoint, "--op", "invert", "--out", str(out), str(bad),
               str(IMAGES / "camera.png"), str(IMAGES / "rocket.jpg"))
    assert done.returncode == 1
    rows = {Path(line.split("\t")[0]).name: line.split("\t") for line in done.stdout.splitlines()}
    assert rows["broken.png"][1] == "FAILED"
    assert "415" in rows["broken.png"][2] and "not a decodable image" in rows["broken.png"][2]
    assert rows["camera.png"][1].startswith(endpoint)
    assert sorted(p.name for p in out.iterdir()) == ["camera.invert.png", "rocket.invert.jpg"]
    assert "2 ok, 1 failed" in done.stderr
    assert "failed " + str(bad) in done.stderr


def test_progress_on_a_terminal_redraws_one_line(endpoint: str, tmp_path: Path) -> None:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.process", "--endpoint", endpoint, "--op", "equalize",
         str(IMAGES)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=follower, text=True,
    )
    os.close(follower)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the command closed the terminal
        while chunk := os.read(leader, 4096):
            chunks.append(chunk)
    os.close(leader)
    out, _ = proc.communicate(timeout=60)
    terminal = b"".join(chunks).decode()
    assert proc.returncode == 0, terminal
    count = len(list(IMAGES.iterdir()))
    assert len(out.splitlines()) == count
    progress, _, summary = terminal.rpartition("\r\x1b[K")
    assert f"[{count}/{count}] {count} ok, 0 failed" in progress
    assert "\n" not in progress  # one line, redrawn in place
    assert summary.startswith(f"{count} ok, 0 failed in")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--op", "blur"], "unknown operation 'blur'; valid operations: invert, grayscale"),
        (["--op", "gaussian_blur", "--param", "size=3"],
         "unknown parameter 'size' for gaussian_blur; valid parameters: ksize (int 1..151"),
        (["--op", "gaussian_blur", "--param", "ksize=500"], "expected ksize (int 1..151"),
        (["--steps", '[{"op": "grayscale"}, {"op": "threshold", "type": "nope"}]'],
         "expected type (one of binary|binary_inv"),
    ],
)
def test_mistakes_found_from_the_server_schema_exit_2_before_uploading(
    endpoint: str, args: list[str], message: str
) -> None:
    before = processed(endpoint)
    done = cli("--endpoint", endpoint, *args, str(IMAGES / "camera.png"))
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stdout == ""
    assert processed(endpoint) == before


# --------------------------------------------------------------------------- Ctrl-C


class StallingHandler(BaseHTTPRequestHandler):
    """Answers /operations; holds every POST /process until the test releases it."""

    server: StallingServer  # type: ignore[assignment]

    def do_GET(self) -> None:
        body = json.dumps({"operations": [{"name": "grayscale", "title": "Grayscale",
                                           "description": "", "params": [],
                                           "tileable": True}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.server.lock:
            self.server.stalled += 1
        self.server.release.wait(30)
        self.send_error(503)

    def log_message(self, *args: object) -> None:
        pass


class StallingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StallingHandler)
        self.lock = threading.Lock()
        self.stalled = 0
        self.release = threading.Event()


def test_ctrl_c_cancels_cleanly_with_status_130(tmp_path: Path) -> None:
    server = StallingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts.process", "--endpoint",
         f"http://127.0.0.1:{server.server_address[1]}", "--op", "grayscale",
         "--concurrency", "2", "--out", str(tmp_path / "out"), str(IMAGES)],
        cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until(lambda: server.stalled >= 2, timeout=30)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        server.release.set()
        server.shutdown()
        server.server_close()
    assert proc.returncode == 130
    assert "interrupted: 0 ok, 0 failed" in err
    assert "cancelled with 7 not finished" in err
    assert "Traceback" not in err
    assert out == ""
    assert server.stalled == 2  # the limit held, and nothing new started after Ctrl-C
    assert list((tmp_path / "out").iterdir()) == []
