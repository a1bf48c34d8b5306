"""`python -m scripts.process --resume`: a batch killed with SIGKILL in the middle and
resumed sends only the rest, and ends with every output correct. The command runs as a
real subprocess against a real `python -m server`; the server's own access log counts
the requests it saw."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
COUNT = 36
OP = ["--op", "gaussian_blur", "--param", "ksize=31", "--format", "png"]


def env_with_data(data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFLEET_")}
    env["IMAGEFLEET_DATA_DIR"] = str(data)
    return env


def make_images(folder: Path, count: int, size: tuple[int, int] = (640, 480)) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(14)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"photo{i:02}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def process_requests(server: Any) -> int:
    """POST /process requests the server answered, from its JSON access log."""
    count = 0
    for line in server.log().splitlines():
        try:
            entry = json.loads(line[line.index("{"):])
        except ValueError:
            continue
        if entry.get("method") == "POST" and entry.get("path") == "/process":
            count += 1
    return count


def journal_counts(data: Path) -> dict[str, int]:
    path = data / "journal.sqlite3"
    if not path.exists():
        return {}
    with sqlite3.connect(path, timeout=10) as conn:
        return dict(conn.execute("SELECT state, COUNT(*) FROM outputs GROUP BY state"))


def expected_result(server: Any, source: Path) -> bytes:
    answer = requests.post(f"{server.url}/process?response=image", timeout=60,
                           files={"image": source.read_bytes()},
                           data={"operation": "gaussian_blur", "params": '{"ksize": 31}',
                                 "format": "png"})
    answer.raise_for_status()
    return answer.content


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scripts.process", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def test_a_killed_batch_resumes_sending_only_the_rest(server_process: Any,
                                                      tmp_path: Path) -> None:
    server = server_process()
    data, out = tmp_path / "data", tmp_path / "out"
    inputs = make_images(tmp_path / "in", COUNT)
    env = env_with_data(data)
    args = ["--endpoint", server.url, *OP, "--concurrency", "2", "--out", str(out),
            str(tmp_path / "in")]
    proc = subprocess.Popen([sys.executable, "-m", "scripts.process", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: journal_counts(data).get("done", 0) >= 6 or proc.poll() is not None,
                   timeout=120, interval=0.02, what="six images journaled as done")
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # the requests of the killed run are over once the server has none in flight
    wait_until(lambda: server.get("/health").json()["inflight"] == 0, timeout=60)
    done_before = journal_counts(data).get("done", 0)
    sent_before = process_requests(server)
    assert 6 <= done_before < COUNT
    # at most the images in flight (and finished in the last moment) were not journaled
    assert done_before <= sent_before <= done_before + 2 + 2

    resumed = run_cli([*args, "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr
    sent_after = process_requests(server) - sent_before
    assert sent_after == COUNT - done_before, resumed.stderr  # only the rest was sent
    assert f"done before, sending {COUNT - done_before}" in resumed.stderr
    assert f"{COUNT} ok, 0 failed" in resumed.stderr

    lines = [line.split("\t") for line in resumed.stdout.splitlines()]
    assert sorted(Path(fields[0]).name for fields in lines) == [p.name for p in inputs]
    assert all(fields[1].startswith(f"{server.url}/results/") for fields in lines)
    # every output is there once, under its own name, and is the right result
    expected_names = sorted(f"{p.stem}.gaussian_blur.png" for p in inputs)
    assert sorted(p.name for p in out.iterdir()) == expected_names
    for source in inputs:
        assert (out / f"{source.stem}.gaussian_blur.png").read_bytes() == \
            expected_result(server, source), source.name
    assert journal_counts(data) == {"done": COUNT}

    again = run_cli([*args, "--resume"], env)  # the batch is finished: a new one starts
    assert "nothing to resume" in again.stderr


def test_resume_by_id_takes_the_batch_from_the_journal_and_resends_changed_inputs(
        server_process: Any, tmp_path: Path) -> None:
    server = server_process()
    data = tmp_path / "data"
    inputs = make_images(tmp_path / "in", 4, size=(64, 48))
    env = env_with_data(data)
    first = run_cli(["--endpoint", server.url, *OP, *map(str, inputs[:3])], env)
    assert first.returncode == 0, first.stderr
    batch_id = first.stderr.split("batch ", 1)[1].split()[0]
    # mark the last image as not done, as a killed run leaves it, and edit another one
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        conn.execute("UPDATE outputs SET state = 'pending' WHERE idx = 2")
        conn.execute("UPDATE batches SET state = 'running'")
    Image.fromarray(np.zeros((10, 10, 3), dtype=np.uint8)).save(inputs[0])
    sent_before = process_requests(server)

    resumed = run_cli(["--endpoint", server.url, "--resume", batch_id], env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{inputs[0]}: its size changed since the batch ran; sending it again" in \
        resumed.stderr
    assert process_requests(server) - sent_before == 2  # the changed one and the pending one
    assert len(resumed.stdout.splitlines()) == 3

    finished = run_cli(["--endpoint", server.url, "--resume", batch_id], env)
    assert finished.returncode == 2
    assert f"batch {batch_id} is finished: 3 done, 0 failed; nothing to resume" in \
        finished.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--resume", "20260101-000000-abcd"], "no batch 20260101-000000-abcd in the journal"),
     (["--resume", "20260101-000000-abcd", "--op", "grayscale"],
      "give no --op, --steps, --recipe, --param or FILES_OR_FOLDERS with it"),
     (["--resume=nonsense"], "'nonsense' is not a batch id")],
)
def test_resume_by_id_mistakes_exit_2(tmp_path: Path, extra: list[str], message: str) -> None:
    done = run_cli(["--endpoint", "http://127.0.0.1:9", *extra], env_with_data(tmp_path))
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
