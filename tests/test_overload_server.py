"""Busy is not dead, and one request cannot cost minutes: admission, cost budget,
deadline and cancel-on-disconnect, against real `python -m server` processes."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from waiting import wait_until

from server.admission import Admission, Control, Stopped
from server.cost import PRICES, check_cost, estimate
from server.errors import ApiError
from server.operations import default_registry
from server.pipeline import parse_pipeline

# The request: a 67-byte PNG blown up to 4 MP, then twenty 51-px ellipse passes.
COSTLY_STEPS = json.dumps([
    {"op": "resize", "width": 2000, "height": 2000, "mode": "exact"},
    {"op": "morphology", "ksize": 51, "iterations": 20, "shape": "ellipse"},
])
# About a second of CPU per step on a 1500x1500 photograph; many steps, so a stopped
# request is seen between them.
SLOW_STEP = {"op": "bilateral", "diameter": 15}


def tiny_png() -> bytes:
    return cv2.imencode(".png", np.zeros((2, 2), np.uint8))[1].tobytes()


@pytest.fixture(scope="module")
def photo(images_dir: Path) -> bytes:
    image = cv2.resize(cv2.imread(str(images_dir / "astronaut.png")), (1500, 1500))
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def health(server) -> dict:
    answer = server.get("/health", timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()


def post_steps(server, image: bytes, steps: list[dict], **kwargs) -> requests.Response:
    return server.post("/process", files={"image": ("p.jpg", image)},
                       data={"steps": json.dumps(steps), "format": "jpeg"}, **kwargs)


# --- pure parts -------------------------------------------------------------------------


def test_every_operation_has_a_price() -> None:
    missing = sorted(set(default_registry()) - set(PRICES))
    assert missing == [], f"give these operations a price in server/cost.py: {missing}"


def test_the_costly_pipeline_is_priced_far_above_the_budget() -> None:
    pipeline = parse_pipeline(default_registry(), None, None, COSTLY_STEPS)
    cost = pipeline.cost(1, 1)
    # Measured: ~1.3 s per iteration of the chain on 4 MP on one core of this machine.
    assert 15 < cost.seconds < 60
    assert cost.heaviest().name == "morphology"
    with pytest.raises(ApiError) as caught:
        check_cost(cost, 15)
    assert caught.value.status == 413 and caught.value.code == "too_costly"
    assert "15 s allowed" in caught.value.message and "morphology" in caught.value.message


@pytest.mark.parametrize("steps", [
    [{"op": "gaussian_blur"}], [{"op": "bilateral"}], [{"op": "median_blur", "ksize": 51}],
    [{"op": "resize", "width": 512}, {"op": "canny"}], [{"op": "morphology"}],
])
def test_ordinary_requests_on_a_12_mp_photo_fit_the_budget(steps) -> None:
    pipeline = parse_pipeline(default_registry(), None, None, json.dumps(steps))
    assert pipeline.cost(4000, 3000).seconds < 10


def test_a_step_is_priced_on_the_larger_of_its_input_and_output() -> None:
    small_to_big = estimate([("resize", {})], [(4000, 4000)], 10, 10)
    assert small_to_big.seconds == pytest.approx(16e6 * 5e-9)


def test_admission_bounds_slots_plus_queue_and_counts() -> None:
    admission = Admission(slots=2, queue_limit=1)
    assert [admission.try_admit() for _ in range(4)] == [True, True, True, False]
    with admission.slot():
        snap = admission.snapshot()
        assert (snap["busy"], snap["queued"], snap["shed"]) == (1, 2, 1)
    admission.leave()
    assert admission.snapshot()["completed"] == 1
    assert admission.try_admit()  # the one that left made room for one more
    with pytest.raises(ApiError) as caught:
        admission.admit_or_raise()
    assert caught.value.status == 503 and caught.value.retry_after == 1


def test_a_request_waiting_for_a_slot_gives_up_when_its_client_leaves() -> None:
    admission = Admission(slots=1, queue_limit=1)
    gone = threading.Event()
    outcome: list[BaseException] = []

    def waiter() -> None:
        try:
            with admission.slot(Control(float("inf"), 1, gone.is_set)):
                pass
        except Stopped as exc:
            outcome.append(exc)

    with admission.slot():
        thread = threading.Thread(target=waiter)
        thread.start()
        gone.set()
        thread.join(5)
    assert not thread.is_alive() and outcome and outcome[0].code == "client_disconnected"
    assert admission.snapshot()["busy"] == 0


# --- real servers -------------------------------------------------------------------------


def test_a_burst_beyond_capacity_is_shed_at_once_and_health_stays_fast(server_process,
                                                                       photo: bytes) -> None:
    server = server_process("--process-slots", "1", "--queue-limit", "1")
    answers: list[tuple[int, float, dict, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        started = time.monotonic()
        resp = post_steps(server, photo, [SLOW_STEP] * 2, timeout=120)
        with lock:
            answers.append((resp.status_code, time.monotonic() - started, resp.json(),
                            resp.headers.get("Retry-After")))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    health_ms = []
    while any(t.is_alive() for t in threads):
        started = time.monotonic()
        body = health(server)
        health_ms.append((time.monotonic() - started) * 1000)
        # Admitted work never exceeds slots + queue: 1 running and 1 waiting, or both
        # still reading their bodies before taking a slot (then both count as queued).
        load = body["load"]
        assert load["busy"] <= 1 and load["busy"] + load["queued"] <= 2, body
    for thread in threads:
        thread.join(120)
    ok = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] == 503]
    assert len(ok) + len(shed) == 12, [a[:1] + a[2:3] for a in answers]
    assert len(ok) >= 2 and len(shed) >= 6
    assert all(a[2]["error"]["code"] == "overloaded" and a[3] == "1" for a in shed)
    # Refused without waiting for the work: faster than any admitted request took.
    assert max(a[1] for a in shed) < min(a[1] for a in ok)
    assert sorted(health_ms)[len(health_ms) // 2] < 250, health_ms
    final = health(server)["load"]
    assert final["shed"] == len(shed) and final["completed"] == len(ok)


def test_the_costly_pipeline_gets_413_at_once(server_process) -> None:
    server = server_process()
    started = time.monotonic()
    resp = server.post("/process", files={"image": ("t.png", tiny_png())},
                       data={"steps": COSTLY_STEPS}, timeout=30)
    assert resp.status_code == 413, resp.text
    error = resp.json()["error"]
    assert error["code"] == "too_costly"
    assert "CPU seconds" in error["message"] and "15 s allowed" in error["message"]
    assert time.monotonic() - started < 5
    assert health(server)["load"]["busy"] == 0


def test_the_cost_budget_is_a_flag(server_process, photo: bytes) -> None:
    server = server_process("--max-cost", "0.01")
    resp = post_steps(server, photo, [SLOW_STEP])
    assert resp.status_code == 413 and "0.01 s allowed" in resp.json()["error"]["message"]


def test_a_request_over_its_deadline_is_stopped_between_steps(server_process,
                                                             photo: bytes) -> None:
    server = server_process("--request-timeout", "0.5")
    resp = post_steps(server, photo, [SLOW_STEP] * 10, timeout=60)
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "deadline_exceeded"
    assert "0.5 s" in resp.json()["error"]["message"]
    load = health(server)["load"]
    assert load["busy"] == 0 and load["stopped"] == 1


def _send(url: str, image: bytes, steps: list[dict]) -> socket.socket:
    """Send a whole request on a raw socket and return the socket, unread."""
    prepared = requests.Request("POST", url + "/process", files={"image": ("p.jpg", image)},
                                data={"steps": json.dumps(steps)}).prepare()
    host, port = url.removeprefix("http://").split(":")
    head = "".join(f"{k}: {v}\r\n" for k, v in prepared.headers.items())
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"POST /process HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode()
                 + prepared.body)
    return sock


@pytest.mark.parametrize("serving", [[], ["--workers", "2"]], ids=["waitress", "gunicorn"])
def test_a_client_that_disconnects_frees_its_slot_within_a_step(server_process, photo: bytes,
                                                                serving) -> None:
    server = server_process("--process-slots", "1", *serving)
    loads = lambda: [health(server)["load"] for _ in range(4)]  # noqa: E731 either worker
    sock = _send(server.url, photo, [SLOW_STEP] * 20)
    wait_until(lambda: any(load["busy"] for load in loads()), timeout=30,
               what="the request to start")
    sock.close()
    hung_up = time.monotonic()
    wait_until(lambda: all(load["busy"] == 0 for load in loads()), timeout=15,
               what="the slot to be free again")
    # 20 steps would take ~20 s; it stopped after the step that was running.
    assert time.monotonic() - hung_up < 10
    wait_until(lambda: '"status": 499' in server.log(), timeout=10,
               what="the access line of the stopped request")
    assert "Traceback" not in server.log()
