"""`python -m server --workers N`: real supervisor and worker processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
import requests
from conftest import REPO_ROOT
from helpers_fleet import pid_alive
from test_server_process import Request
from waiting import wait_until

from server.supervisor import (
    PARENT_DEATH_SIGNAL,
    STABLE_SECONDS,
    listening_socket,
    restart_delay,
    worker_argv,
)

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
    assert server.pid not in pids, "the supervisor must not serve"
    ids = {fresh_health(server)["instance_id"] for _ in range(6)}
    assert len(ids) == 1, "all workers report the supervisor's instance id"
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
    assert "exited with -9" in server.log() and "restarting" in server.log()


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


def test_killing_the_supervisor_outright_takes_the_workers_down(server_process) -> None:
    server = server_process("--workers", "2")
    pids = worker_pids(server)
    server.proc.kill()
    server.proc.wait(10)
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=30,
               what="workers to follow the supervisor (parent-death signal)")
    log = server.log()
    assert log.count("drained (idle); exiting") == 2, log[-2000:]
    assert "Traceback" not in log and "second signal" not in log, log[-2000:]


@dataclass
class BareWorker:
    """One worker process as the supervisor starts it (inherited socket, parent pid),
    started by the test instead, so the test plays the supervisor's part."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def bare_worker(tmp_path: Path):
    started: list[BareWorker] = []

    def start(parent_pid: int, wait_ready: bool = True) -> BareWorker:
        sock = listening_socket("127.0.0.1", 0)
        log_path = tmp_path / f"worker-{len(started)}.log"
        with sock, log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "server", "--storage", str(tmp_path / "storage"),
                 "--listen-fd", str(sock.fileno()), "--parent-pid", str(parent_pid)],
                cwd=REPO_ROOT, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log_file)
            worker = BareWorker(f"http://127.0.0.1:{sock.getsockname()[1]}", proc, log_path)
        started.append(worker)
        if wait_ready:
            wait_until(lambda: requests.get(worker.url + "/health", timeout=5).ok,
                       timeout=60, what="the worker to answer /health")
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(10)


def test_a_worker_drains_once_however_often_the_parent_death_signal_comes(
        bare_worker, photo_jpeg: bytes) -> None:
    # Linux sends the parent-death signal once per exiting thread of a killed
    # multi-threaded supervisor; here the test sends it by hand, mid-drain, instead.
    worker = bare_worker(parent_pid=os.getpid())
    slow = Request("POST", worker.url + "/process?response=image",
                   files={"image": ("big.jpg", photo_jpeg)}, data={"steps": SLOW_STEPS})
    wait_until(lambda: requests.get(worker.url + "/health", timeout=5).json()["inflight"],
               timeout=30, what="the slow request to be in flight")
    worker.proc.send_signal(PARENT_DEATH_SIGNAL)
    wait_until(lambda: "parent death: draining" in worker.log(), timeout=30,
               what="the drain to start")
    for _ in range(3):
        worker.proc.send_signal(PARENT_DEATH_SIGNAL)
    assert worker.proc.wait(120) == 0
    slow.join(120)
    assert slow.error is None, f"in-flight request failed during the drain: {slow.error!r}"
    assert slow.response.status_code == 200 and slow.response.content[:2] == b"\xff\xd8"
    log = worker.log()
    assert log.count("drained (idle); exiting") == 1, log[-2000:]
    assert "second signal" not in log and "Traceback" not in log, log[-2000:]


def test_a_worker_whose_supervisor_died_before_it_started_exits_at_once(bare_worker) -> None:
    # The supervisor died before the worker asked for the parent-death signal, so no
    # signal will ever come: the worker must notice by itself. pid 1 is never its parent.
    worker = bare_worker(parent_pid=1, wait_ready=False)
    assert worker.proc.wait(60) == 0
    log = worker.log()
    assert "supervisor (pid 1) is gone; draining" in log, log[-2000:]
    assert "drained (idle); exiting" in log, log[-2000:]


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


def test_worker_arguments_carry_everything_but_the_worker_count() -> None:
    argv = ["--port", "8080", "--workers", "4", "--storage", "s3://b/p", "--instance-id=x",
            "--workers=3", "--token", "abcdefgh"]
    assert worker_argv(argv, 7, "host-1", 42) == [
        "--port", "8080", "--storage", "s3://b/p", "--token", "abcdefgh",
        "--workers", "1", "--listen-fd", "7", "--parent-pid", "42", "--instance-id", "host-1"]
    assert worker_argv([*argv, "--parent-pid=9", "--listen-fd", "3"], 7, "h", 42)[-6:] == [
        "--listen-fd", "7", "--parent-pid", "42", "--instance-id", "h"]


def test_crash_looping_workers_back_off() -> None:
    assert restart_delay(STABLE_SECONDS + 1, 8.0) == 0.0
    delays = [1.0]
    for _ in range(6):
        delays.append(restart_delay(0.1, delays[-1]))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
