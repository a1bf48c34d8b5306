"""The desktop app resumes a batch after it was killed: the app runs as a real process
under Xvfb (tests/app_driver.py presses its buttons), is killed with SIGKILL by PID in
the middle of a batch, and started again; it offers to resume, sends only the images
not done, and every result is right. The server's access log counts the requests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests
from helpers_gui import app_environ
from test_resume_cli import journal_counts, make_images, process_requests
from waiting import wait_until

TESTS = Path(__file__).resolve().parent
COUNT = 40
STEPS = '[{"op": "gaussian_blur", "ksize": 31}]'


def expected_result(server: Any, source: Path) -> bytes:
    answer = requests.post(f"{server.url}/process?response=image", timeout=60,
                           files={"image": source.read_bytes()}, data={"steps": STEPS})
    answer.raise_for_status()
    return answer.content


def driver(mode: str, endpoint: str, status: Path, env: dict[str, str],
           paths: list[Path] = ()) -> subprocess.Popen:  # type: ignore[assignment]
    log = (status.parent / f"{mode}.log").open("wb")
    return subprocess.Popen([sys.executable, str(TESTS / "app_driver.py"), mode, endpoint,
                             str(status), *map(str, paths)], cwd=TESTS.parent, env=env,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def test_the_app_killed_mid_batch_resumes_with_only_the_rest(
        x_display: str, server_process: Any, tmp_path: Path) -> None:
    server = server_process()
    inputs = make_images(tmp_path / "in", COUNT)
    env = app_environ(tmp_path / "home")
    env["DISPLAY"] = x_display
    data = tmp_path / "home" / "data" / "ImageFleet"
    status = tmp_path / "status.json"

    first = driver("start", server.url, status, env, inputs)
    try:
        wait_until(lambda: journal_counts(data).get("done", 0) >= 6 or first.poll() is not None,
                   timeout=180, interval=0.02, what="six images journaled as done")
        assert first.poll() is None, (tmp_path / "start.log").read_text()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(30)
    wait_until(lambda: server.get("/health").json()["inflight"] == 0, timeout=60)
    done_before = journal_counts(data).get("done", 0)
    assert 6 <= done_before < COUNT
    sent_before = process_requests(server)

    second = driver("resume", server.url, status, env)
    try:
        second.wait(240)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(30)
    log = (tmp_path / "resume.log").read_text(errors="replace")
    assert second.returncode == 0, log
    facts = json.loads(status.read_text())
    assert facts["states"] == ["done"] * COUNT, facts
    assert sorted(facts["names"]) == sorted(p.name for p in inputs)
    assert not facts["failures"], facts["failures"]
    sent_after = process_requests(server) - sent_before
    assert sent_after == COUNT - done_before, server.log()[-6000:]  # done not sent again

    # one batch in the journal, finished, every image with a link to the right result
    with sqlite3.connect(data / "journal.sqlite3") as conn:
        batches = conn.execute("SELECT state FROM batches").fetchall()
        rows = conn.execute("SELECT i.path, o.url FROM inputs i JOIN outputs o "
                            "ON o.batch_id = i.batch_id AND o.idx = i.idx "
                            "WHERE o.state = 'done' ORDER BY i.idx").fetchall()
    assert batches == [("finished",)]
    assert [Path(path).name for path, _url in rows] == [p.name for p in inputs]
    for path, url in rows:
        assert requests.get(url, timeout=30).content == expected_result(server, Path(path)), path
