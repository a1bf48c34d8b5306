"""`python -m server --workers N`: gunicorn's arbiter and real worker processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import requests
from conftest import REPO_ROOT
from helpers_fleet import pid_alive
from test_server_process import Request
from waiting import wait_until

from server.config import ServerConfig
from server.serving import gunicorn_options

SLOW_STEPS = json.dumps([{"op": "bilateral", "diameter": 15}] * 2)


@pytest.fixture(scope="module")
def photo_jpeg(images_dir: Path) -> bytes:
    image = cv2.resize(cv2.imread(str(images_dir / "astronaut.png")), (3000, 3000),
                       interpolation=cv2.INTER_CUBIC)
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def fresh_health(server) -> dict:
    # A new connection each time, so the kernel may hand it to either worker.
    answer = server.get("/health", headers={"Connection": "close"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def worker_pids(server) -> set[int]:
    seen: set[int] = set()
    wait_until(lambda: (seen.add(fresh_health(server)["pid"]), len(seen) >= 2)[1],
               timeout=30, interval=0.01, what="both workers to answer /health")
    return seen


def test_workers_share_one_port_as_one_server(server_process, camera_png: bytes) -> None:
    server = server_process("--workers", "2")
    pids = worker_pids(server)
    assert server.pid not in pids, "the arbiter must not serve"
    ids = {fresh_health(server)["instance_id"] for _ in range(6)}
    assert len(ids) == 1, "all workers report the server's one instance id"
    for _ in range(4):
        answer = server.post("/process", files={"image": ("c.png", camera_png)},
                             data={"operation": "invert"}, headers={"Connection": "close"})
        assert answer.status_code == 200, answer.text
        assert requests.get(answer.json()["url"], timeout=10).status_code == 200
    assert "workers=2" in server.log()


def test_a_killed_worker_is_replaced_while_the_other_serves(server_process,
                                                            camera_png: bytes) -> None:
    server = server_process("--workers", "2")
    pids = worker_pids(server)
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    failures = []

    def replaced() -> bool:
        answer = server.post("/process", files={"image": ("c.png", camera_png)},
                             data={"operation": "flip"}, headers={"Connection": "close"})
        if answer.status_code != 200:
            failures.append(answer.status_code)
        return not pid_alive(victim) and fresh_health(server)["pid"] not in pids

    wait_until(replaced, timeout=30, interval=0.02, what="a replacement worker")
    assert failures == [], "the surviving worker must serve while the other restarts"
    assert "was sent SIGKILL" in server.log() and "Booting worker" in server.log()


def test_sigterm_drains_every_worker_then_exits_0(server_process, photo_jpeg: bytes) -> None:
    server = server_process("--workers", "2")
    pids = worker_pids(server)
    slow = Request("POST", server.url + "/process?response=image",
                   files={"image": ("big.jpg", photo_jpeg)}, data={"steps": SLOW_STEPS})
    wait_until(lambda: any(fresh_health(server)["inflight"] for _ in range(4)), timeout=30,
               what="the slow request to be in flight")
    assert server.stop() == 0
    slow.join(120)
    assert slow.error is None, f"in-flight request failed during the drain: {slow.error!r}"
    assert slow.response.status_code == 200 and slow.response.content[:2] == b"\xff\xd8"
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=10,
               what="every worker to exit")
    assert "Traceback" not in server.log() and "second signal" not in server.log()


def test_killing_the_arbiter_outright_takes_the_workers_down(server_process) -> None:
    server = server_process("--workers", "2")
    pids = worker_pids(server)
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=30,
               what="workers to follow the arbiter (they check their parent each second)")
    log = server.log()
    assert log.count("Parent changed, shutting down") == 2, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


def test_a_draining_worker_answers_health_503_on_an_open_connection(server_process,
                                                                    photo_jpeg: bytes) -> None:
    # gunicorn closes the listener at once on SIGTERM; a keep-alive connection the
    # gateway already holds must then see "draining", not "ok".
    server = server_process("--workers", "1", "--threads", "32")
    session = requests.Session()
    assert session.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    slow = Request("POST", server.url + "/process?response=image",
                   files={"image": ("big.jpg", photo_jpeg)}, data={"steps": SLOW_STEPS})
    wait_until(lambda: session.get(server.url + "/health", timeout=10).json()["inflight"],
               timeout=30, what="the slow request to be in flight")
    server.terminate()
    wait_until(lambda: session.get(server.url + "/health", timeout=10).status_code == 503,
               timeout=30, what="/health to say draining on the open connection")
    slow.join(120)
    assert slow.error is None and slow.response.status_code == 200
    assert server.proc.wait(60) == 0


@pytest.mark.parametrize(("args", "message"), [
    (["--workers", "0"], "workers 0 is not 1..64"),
    (["--workers", "2", "--storage", "s3://"], "names no bucket"),
])
def test_bad_worker_settings_exit_2_and_start_nothing(args, message) -> None:
    done = subprocess.run([sys.executable, "-m", "server", "--port", "0", *args],
                          check=False, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_our_flags_become_gunicorn_settings() -> None:
    config = ServerConfig(host="::1", port=8081, workers=3, threads=40, drain_timeout=12,
                          process_slots=2)
    options = gunicorn_options(config, "INFO")
    assert options["bind"] == ["[::1]:8081"]
    assert (options["workers"], options["threads"]) == (3, 40)
    assert options["graceful_timeout"] == 12
    assert options["worker_class"] == "server.serving.DrainingThreadWorker"
    assert options["accesslog"] is None
