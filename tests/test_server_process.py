"""`python -m server` as a process: configuration from flags and environment, the
token, SIGTERM drain, /health under load, and the per-request log line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import requests
from conftest import REPO_ROOT, free_port
from waiting import wait_until

from server.__main__ import build_parser, config_from_args, log_level_from_args

TOKEN = "process-test-token-1234"
# Two bilateral passes on 12 MP: ~2 s on two cores, long enough to SIGTERM mid-way.
SLOW_STEPS = json.dumps([{"op": "bilateral", "diameter": 15}] * 2)
# ~0.6 s each on two cores; eight of them keep both processing slots busy for seconds.
HEAVY_PARAMS = json.dumps({"ksize": 21})


@pytest.fixture(scope="module")
def photo_12mp(images_dir: Path) -> bytes:
    """A 4000x3000 JPEG upscaled from a test photograph (about 1 MB)."""
    small = cv2.imread(str(images_dir / "astronaut.png"))
    big = cv2.resize(small, (4000, 3000), interpolation=cv2.INTER_CUBIC)
    ok, buffer = cv2.imencode(".jpg", big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buffer.tobytes()


def assert_json_error(response: requests.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]["message"]


# --- Configuration: flags and IMAGEFLEET_<FLAG> -------------------------------------------

SAMPLES = {  # flag -> (environment value, parsed value in the config)
    "host": ("127.0.0.2", "127.0.0.2"),
    "port": ("9123", 9123),
    "storage": ("/srv/imagefleet-storage", "/srv/imagefleet-storage"),
    "s3-endpoint-url": ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    "token": ("a-long-enough-token", "a-long-enough-token"),
    "peers": ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
    "tile-mp": ("12.5", 12.5),
    "tile-size": ("1024", 1024),
    "threads": ("24", 24),
    "queue-limit": ("3", 3),
    "public-url": ("https://images.example.com", "https://images.example.com"),
    "instance-id": ("worker-from-env", "worker-from-env"),
    "link-ttl": ("3600", 3600),
    "max-bytes": ("123456", 123456),
    "max-pixels": ("4000000", 4_000_000),
    "process-slots": ("3", 3),
    "drain-timeout": ("2.5", 2.5),
}


def server_flags() -> list[str]:
    """The documented flags (not --help, --log-level, --config (the file's path, tested
    below), or the internal ones whose help is suppressed, such as the socket a worker
    inherits)."""
    return [option[2:] for action in build_parser()._actions
            for option in action.option_strings if option.startswith("--")
            and option not in ("--help", "--log-level", "--config")
            and action.help != argparse.SUPPRESS]


def env_name(flag: str) -> str:
    return "IMAGEFLEET_" + flag.upper().replace("-", "_")


def sample_for(flag: str, action_type) -> tuple[str, Any]:
    if flag in SAMPLES:
        return SAMPLES[flag]
    # A flag added after this test was written: any valid-looking value of its type.
    if action_type is int:
        return "5", 5
    if action_type is float:
        return "5.5", 5.5
    return f"value-of-{flag}", f"value-of-{flag}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("IMAGEFLEET_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize("flag", server_flags())
def test_every_flag_reads_its_environment_variable(clean_env, flag: str) -> None:
    action = next(a for a in build_parser()._actions if f"--{flag}" in a.option_strings)
    raw, expected = sample_for(flag, action.type)
    clean_env.setenv(env_name(flag), raw)

    config = config_from_args(build_parser().parse_args([]))

    assert getattr(config, flag.replace("-", "_")) == expected


def test_log_level_reads_its_environment_variable(clean_env) -> None:
    clean_env.setenv("IMAGEFLEET_LOG_LEVEL", "DEBUG")
    assert build_parser().parse_args([]).log_level == "DEBUG"


def test_flags_win_over_environment(clean_env) -> None:
    clean_env.setenv("IMAGEFLEET_INSTANCE_ID", "from-env")
    clean_env.setenv("IMAGEFLEET_PORT", "9001")
    args = build_parser().parse_args(["--instance-id", "from-flag", "--port", "9002"])
    config = config_from_args(args)
    assert (config.instance_id, config.port) == ("from-flag", 9002)


# One precedence for every option: flag > IMAGEFLEET_<FLAG> > config file > default.
PRECEDENCE = [  # (flag, environment, file) -> which one the config holds
    (["--port", "9001"], {"IMAGEFLEET_PORT": "9002"}, {"port": 9003}, 9001),
    ([], {"IMAGEFLEET_PORT": "9002"}, {"port": 9003}, 9002),
    ([], {}, {"port": 9003}, 9003),
    ([], {}, {}, 8080),
    (["--port", "9001"], {}, {"port": 9003}, 9001),
    (["--port", "9001"], {"IMAGEFLEET_PORT": "9002"}, {}, 9001),
]


@pytest.mark.parametrize(("flags", "env", "file", "port"), PRECEDENCE)
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_flag_beats_environment_beats_file_beats_default(
        clean_env, tmp_path: Path, flags: list[str], env: dict[str, str],
        file: dict[str, int], port: int, suffix: str) -> None:
    config_file = tmp_path / f"server{suffix}"
    config_file.write_text(json.dumps(file) if suffix == ".json"
                           else "".join(f"{k} = {v}\n" for k, v in file.items()))
    for name, value in env.items():
        clean_env.setenv(name, value)
    config = config_from_args(build_parser().parse_args(["--config", str(config_file),
                                                         *flags]))
    assert config.port == port


@pytest.mark.parametrize(("flags", "env", "file", "level"), [
    (["--log-level", "ERROR"], {"IMAGEFLEET_LOG_LEVEL": "DEBUG"}, {"log-level": "WARNING"},
     "ERROR"),
    ([], {"IMAGEFLEET_LOG_LEVEL": "DEBUG"}, {"log-level": "WARNING"}, "DEBUG"),
    ([], {}, {"log-level": "WARNING"}, "WARNING"),
    ([], {}, {}, "INFO"),
])
def test_log_level_follows_the_same_precedence(clean_env, tmp_path: Path, flags: list[str],
                                               env: dict[str, str], file: dict[str, str],
                                               level: str) -> None:
    (tmp_path / "server.json").write_text(json.dumps(file))
    for name, value in env.items():
        clean_env.setenv(name, value)
    args = build_parser().parse_args(["--config", str(tmp_path / "server.json"), *flags])
    assert log_level_from_args(args) == level


def test_config_file_comes_from_the_environment_too(clean_env, tmp_path: Path) -> None:
    (tmp_path / "server.json").write_text(json.dumps({"max-bytes": 4096,
                                                      "instance_id": "from-file"}))
    clean_env.setenv("IMAGEFLEET_CONFIG", str(tmp_path / "server.json"))
    config = config_from_args(build_parser().parse_args([]))
    assert (config.max_bytes, config.instance_id) == (4096, "from-file")


@pytest.mark.parametrize(("env", "file", "says"), [
    ({"IMAGEFLEET_PORT": "eighty"}, {}, "IMAGEFLEET_PORT: Input should be a valid integer"),
    ({}, {"port": "eighty"}, "port in "),
    ({}, {"port": 70000}, "port 70000 is not 0..65535"),
    ({"IMAGEFLEET_TILE_SIZE": "64"}, {}, "tile_size 64 is not 128..16384"),
    ({}, {"prot": 1}, "unknown options prot; known: "),
    ({"IMAGEFLEET_LOG_LEVEL": "LOUD"}, {}, "log_level must be one of DEBUG, INFO"),
])
def test_bad_values_are_refused_naming_the_field(clean_env, tmp_path: Path,
                                                 env: dict[str, str], file: dict[str, Any],
                                                 says: str) -> None:
    (tmp_path / "server.json").write_text(json.dumps(file))
    for name, value in env.items():
        clean_env.setenv(name, value)
    args = build_parser().parse_args(["--config", str(tmp_path / "server.json")])
    with pytest.raises(ValueError) as caught:
        config_from_args(args)
        log_level_from_args(args)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_environment_configures_a_real_server(server_process, tmp_path: Path,
                                              camera_png: bytes) -> None:
    storage = tmp_path / "from-env-storage"
    port = free_port()
    server = server_process(env={
        "IMAGEFLEET_STORAGE": str(storage),
        "IMAGEFLEET_INSTANCE_ID": "env-worker-7",
        "IMAGEFLEET_PORT": str(port),
        "IMAGEFLEET_TOKEN": TOKEN,
        "IMAGEFLEET_MAX_PIXELS": "300000",
    })
    assert server.url == f"http://127.0.0.1:{port}"
    health = server.get("/health").json()
    assert health["instance_id"] == "env-worker-7" and health["status"] == "ok"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert_json_error(server.post("/process", files={"image": ("c.png", camera_png)},
                                  data={"operation": "invert"}), 401, "unauthorized")
    response = server.post("/process", files={"image": ("c.png", camera_png)},
                           data={"operation": "invert"}, headers=auth)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["instance_id"] == "env-worker-7"
    assert answer["url"].startswith(server.url + "/results/")
    assert (storage / "results" / answer["key"]).is_file()
    assert any((storage / "originals").iterdir())

    too_big = cv2.imencode(".png", np.zeros((600, 600), np.uint8))[1].tobytes()
    message = assert_json_error(server.post("/process", files={"image": ("b.png", too_big)},
                                            data={"operation": "invert"}, headers=auth),
                                413, "too_many_pixels")
    assert "at most 0.3 MP" in message


@pytest.mark.parametrize(("env", "args", "says"), [
    ({"IMAGEFLEET_LINK_TTL": "604801"}, [], "7 days"),
    ({}, ["--link-ttl", "604801"], "7 days"),
    ({"IMAGEFLEET_TOKEN": "short"}, [], "at least 8 characters"),
    # The variable is named, with what it must be.
    ({"IMAGEFLEET_PORT": "eighty"}, [], "IMAGEFLEET_PORT: Input should be a valid integer"),
    ({}, ["--port", "eighty"], "invalid int value"),
    ({"IMAGEFLEET_STORAGE": "ftp://somewhere/x"}, [], "s3://bucket"),
])
def test_invalid_configuration_exits_2_with_a_reason(tmp_path: Path, env: dict[str, str],
                                                      args: list[str], says: str) -> None:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    full_env.update({"IMAGEFLEET_STORAGE": str(tmp_path / "s"), **env})
    port = [] if "IMAGEFLEET_PORT" in env else ["--port", "0"]
    # A server that wrongly starts is killed by the timeout and fails the test.
    result = subprocess.run([sys.executable, "-m", "server", *port, *args],
                            cwd=REPO_ROOT, env=full_env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr


# --- Token ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(module_server_process):
    return module_server_process("--token", TOKEN)


@pytest.mark.parametrize("header", [None, "Bearer wrong-token-1234", f"Basic {TOKEN}",
                                    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ",
                                    TOKEN])
def test_token_is_required_for_operations_and_process(token_server, camera_png: bytes,
                                                      header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    message = assert_json_error(token_server.get("/operations", headers=headers),
                                401, "unauthorized")
    assert "Bearer" in message
    # Refused before anything else is looked at: even a bad request gets 401.
    assert_json_error(token_server.post("/process", files={"image": ("c.png", camera_png)},
                                        data={"operation": "invert"}, headers=headers),
                      401, "unauthorized")
    assert_json_error(token_server.post("/process", data={"x": "y"}, headers=headers),
                      401, "unauthorized")
    assert not (token_server.storage_dir / "originals").exists() or not any(
        (token_server.storage_dir / "originals").iterdir()), "an unauthorised upload was stored"


def test_right_token_works_and_health_and_links_stay_open(token_server,
                                                          camera_png: bytes) -> None:
    health = token_server.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    auth = {"Authorization": f"Bearer {TOKEN}"}
    operations = token_server.get("/operations", headers=auth)
    assert operations.status_code == 200
    assert len(operations.json()["operations"]) >= 24
    lower = token_server.get("/operations", headers={"Authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200, "the auth scheme is case-insensitive (RFC 7235)"

    response = token_server.post("/process", files={"image": ("c.png", camera_png)},
                                 data={"operation": "invert"}, headers=auth)
    assert response.status_code == 200, response.text
    # A result link is meant to be shared: the signature is its credential, not the token.
    download = requests.get(response.json()["url"], timeout=10)
    assert download.status_code == 200 and download.content[:8] == b"\x89PNG\r\n\x1a\n"


# --- SIGTERM drain --------------------------------------------------------------------------


class Request(threading.Thread):
    """One HTTP request in a thread; `response` or `error` once it is done."""

    def __init__(self, method: str, url: str, **kwargs: Any):
        super().__init__(daemon=True)
        self.method, self.url, self.kwargs = method, url, kwargs
        self.response: requests.Response | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.response = requests.request(self.method, self.url, timeout=120, **self.kwargs)
        except requests.RequestException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("answer_with", ["json", "image"])
def test_sigterm_drains_in_flight_requests_then_exits_0(server_process, photo_12mp: bytes,
                                                        camera_png: bytes,
                                                        answer_with: str) -> None:
    server = server_process()
    # The image answer is a ~20 MB PNG: it must reach the client whole before the exit.
    query = "?response=image" if answer_with == "image" else ""
    slow = Request("POST", server.url + "/process" + query,
                   files={"image": ("big.jpg", photo_12mp)},
                   data={"steps": SLOW_STEPS, "format": "png"})
    wait_until(lambda: server.get("/health").json()["inflight"] >= 1, timeout=30,
               what="the slow request to be in flight")

    server.terminate()  # SIGTERM

    wait_until(lambda: server.get("/health").status_code == 503, timeout=10,
               what="/health to turn 503")
    health = server.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "draining" and health.json()["inflight"] >= 1
    refused = server.post("/process", files={"image": ("c.png", camera_png)},
                          data={"operation": "invert"})
    assert_json_error(refused, 503, "draining")
    assert slow.is_alive(), "the slow request ended before the drain could be observed"

    slow.join(120)
    assert slow.error is None, f"in-flight request failed during drain: {slow.error!r}"
    assert slow.response.status_code == 200, slow.response.text[:300]
    if answer_with == "json":
        key = slow.response.json()["key"]
    else:
        key = slow.response.headers["X-Result-Key"]
        result = cv2.imdecode(np.frombuffer(slow.response.content, np.uint8), cv2.IMREAD_COLOR)
        assert result is not None and result.shape == (3000, 4000, 3)
    stored = server.storage_dir / "results" / key
    assert stored.is_file()
    if answer_with == "image":
        assert slow.response.content == stored.read_bytes()
    assert server.proc.wait(30) == 0, server.log()[-2000:]


def test_sigterm_on_an_idle_server_exits_0_promptly(server_process) -> None:
    server = server_process()
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10


# --- /health under load ---------------------------------------------------------------------


def test_health_stays_responsive_while_saturated(server_process, photo_12mp: bytes) -> None:
    server = server_process()
    workers = [Request("POST", server.url + "/process?response=image",
                       files={"image": (f"big-{i}.jpg", photo_12mp)},
                       data={"operation": "median_blur", "params": HEAVY_PARAMS})
               for i in range(8)]
    samples: list[tuple[float, int]] = []  # (latency seconds, inflight reported)
    done = threading.Event()
    while not done.is_set():
        started = time.perf_counter()
        health = server.get("/health", timeout=5)
        latency = time.perf_counter() - started
        assert health.status_code == 200
        samples.append((latency, health.json()["inflight"]))
        if not any(worker.is_alive() for worker in workers):
            done.set()
        done.wait(0.05)  # the interval between health checks, as a load balancer has

    # Admission (slots + queue, 6 on 2 cores) sheds what is beyond it, at once.
    statuses = []
    for worker in workers:
        worker.join(120)
        assert worker.error is None
        statuses.append(worker.response.status_code)
        if worker.response.status_code == 503:
            assert worker.response.json()["error"]["code"] == "overloaded"
            assert worker.response.headers["Retry-After"] == "1"
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 6, statuses
    saturated = [latency for latency, inflight in samples if inflight >= 4]
    assert len(saturated) >= 5, f"never saturated: {samples}"
    worst = max(saturated)
    assert worst < 1.0, f"/health took {worst:.2f}s while saturated; samples: {samples}"


# --- One structured log line per request ------------------------------------------------------


def access_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        # Access lines are bare JSON objects (no logging prefix), one per line.
        if line.startswith("{"):
            entry = json.loads(line)
            if "request_id" in entry:
                lines.append(entry)
    return lines


def test_one_structured_log_line_per_request(server_process, camera_png: bytes) -> None:
    server = server_process()
    sent = {
        "log-ok": server.post("/process", files={"image": ("c.png", camera_png)},
                              data={"operation": "invert"},
                              headers={"X-Request-Id": "log-ok"}),
        "log-bad-param": server.post("/process", files={"image": ("c.png", camera_png)},
                                     data={"operation": "median_blur",
                                           "params": '{"ksize": 4}'},
                                     headers={"X-Request-Id": "log-bad-param"}),
        "log-bad-image": server.post("/process", files={"image": ("c.png", b"not an image")},
                                     data={"operation": "grayscale"},
                                     headers={"X-Request-Id": "log-bad-image"}),
        "log-operations": server.get("/operations", headers={"X-Request-Id": "log-operations"}),
    }
    assert [r.status_code for r in sent.values()] == [200, 400, 415, 200]
    assert all(r.headers["X-Request-Id"] == rid for rid, r in sent.items())
    generated = server.post("/process", files={"image": ("c.png", camera_png)},
                            data={"operation": "flip"}).headers["X-Request-Id"]
    assert generated

    def logged() -> dict[str, list[dict[str, Any]]]:
        by_id: dict[str, list[dict[str, Any]]] = {}
        for entry in access_lines(server.log()):
            by_id.setdefault(entry["request_id"], []).append(entry)
        return by_id if {*sent, generated} <= set(by_id) else {}

    by_id = wait_until(logged, timeout=10, what="the access log lines")
    assert all(len(entries) == 1 for entries in by_id.values()), by_id
    for rid, response in sent.items():
        entry = by_id[rid][0]
        assert entry["status"] == response.status_code
        assert isinstance(entry["ms"], int | float) and entry["ms"] >= 0
    ok = by_id["log-ok"][0]
    assert ok["operation"] == "invert" and ok["bytes"] == len(camera_png)
    assert ok["path"] == "/process" and ok["method"] == "POST"
    assert by_id["log-bad-image"][0]["operation"] == "grayscale"
    assert by_id[generated][0]["operation"] == "flip"
    out = server.log_path.with_suffix(".out")
    assert "request_id" not in out.read_text(), "access lines belong on stderr"


def test_links_use_the_public_url_not_the_host_header(server_process, camera_png) -> None:
    server = server_process("--public-url", "https://images.example.com")
    answer = server.post("/process", files={"image": ("c.png", camera_png)},
                         data={"operation": "invert"}, headers={"Host": "evil.example"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["url"].startswith("https://images.example.com/results/")
