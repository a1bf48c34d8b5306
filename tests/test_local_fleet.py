"""Whole local fleets on loopback: real gateway, real ``python -m server`` workers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from helpers_fleet import IMAGES, REPO, free_port, pid_alive, pids_mentioning
from waiting import wait_until

from fleet.local.provider import STATE_FILE
from fleet.local.runtime import LocalFleet, LocalFleetRuntime, local_spec

pytestmark = pytest.mark.slow

# Faster than the defaults so the suite stays short; the logic is the same.
QUICK = {"health_check_interval_s": 0.5, "health_check_timeout_s": 0.5,
         "tick_interval_s": 0.25, "grace_period_s": 60}
PNG = (IMAGES / "astronaut.png").read_bytes()
STARTUP = 90.0


def post_image(endpoint: str, operation: str = "grayscale",
               timeout: float = 60) -> requests.Response:
    return requests.post(endpoint + "/process", files={"image": ("a.png", PNG, "image/png")},
                         data={"operation": operation}, timeout=timeout)


def healthy_ids(fleet: LocalFleet) -> set[str]:
    return {i["id"] for i in fleet.snapshot()["instances"]
            if i["health"] == "healthy" and i["state"] == "running"}


def events(fleet: LocalFleet, kind: str) -> list[dict]:
    return [e for e in fleet.snapshot()["events"] if e["kind"] == kind]


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    return tmp_path / "storage"


def test_kill_9_worker_is_replaced_and_the_replacement_serves(storage: Path) -> None:
    with LocalFleet(workers=2, storage_dir=storage, spec_overrides=QUICK).start(STARTUP) \
            as fleet:
        wait_until(lambda: len(healthy_ids(fleet)) == 2, STARTUP, what="2 healthy workers")
        pids = fleet.worker_pids()
        victim, survivor = sorted(pids)
        os.kill(pids[victim], signal.SIGKILL)

        wait_until(lambda: events(fleet, "instance_died"), 10, what="death noticed")
        assert events(fleet, "instance_died")[0]["instance_id"] == victim
        replacement = wait_until(lambda: healthy_ids(fleet) - {survivor, victim}, STARTUP,
                                 what="a healthy replacement")
        assert victim not in fleet.worker_pids()
        assert not pid_alive(pids[victim])
        results = []
        for _ in range(4):  # least outstanding, ties rotate: both workers get some
            response = post_image(fleet.endpoint)
            assert response.status_code == 200, response.text
            results.append(response.json())
        served = {r["instance_id"] for r in results}
        assert served <= {survivor, *replacement} and served & replacement
        for result in results:
            assert requests.get(result["url"], timeout=10).status_code == 200


def test_sigstopped_worker_is_marked_unhealthy_replaced_and_cleaned_up(storage: Path) -> None:
    with LocalFleet(workers=2, storage_dir=storage, spec_overrides=QUICK).start(STARTUP) \
            as fleet:
        wait_until(lambda: len(healthy_ids(fleet)) == 2, STARTUP, what="2 healthy workers")
        pids = fleet.worker_pids()
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGSTOP)
        try:
            wait_until(lambda: any(e["instance_id"] == victim
                                   for e in events(fleet, "instance_unhealthy")), 15,
                       what="hung worker marked unhealthy")
            wait_until(lambda: not pid_alive(pids[victim]), 15,
                       what="stopped worker process cleaned up")
            wait_until(lambda: len(healthy_ids(fleet) - {victim}) == 2, STARTUP,
                       what="fleet back to 2 healthy workers")
            assert victim not in fleet.worker_pids()
            assert post_image(fleet.endpoint).status_code == 200
        finally:
            if pid_alive(pids[victim]):  # test failed half-way: do not leave it stopped
                os.kill(pids[victim], signal.SIGKILL)


def crashing_command(launch) -> list[str]:
    return [sys.executable, "-c", "raise SystemExit(3)"]


def test_worker_command_that_crashes_at_start_up_backs_off(storage: Path) -> None:
    spec = local_spec(1, **{**QUICK, "launch_backoff_base_s": 0.5})

    async def scenario() -> tuple[list[dict], int]:
        runtime = await LocalFleetRuntime.start(spec, storage_dir=storage,
                                                command=crashing_command)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            while len([e for e in runtime.manager.events if e.kind == "launch_failed"]) < 4:
                assert loop.time() < started + 30, [e.message for e in runtime.manager.events]
                await asyncio.sleep(0.05)
            elapsed = loop.time() - started
            launches = sum(e.kind == "launched" for e in runtime.manager.events)
            # Backoff waits 0.5 + 1 + 2 s between the first four launches; without it the
            # fourth failure would come within about 1 s (a launch per 0.25 s tick).
            assert elapsed >= 3.0, f"4 launch failures within {elapsed:.1f}s: no backoff"
            assert launches <= 5, launches
            return [e.to_json() for e in runtime.manager.events], launches
        finally:
            await runtime.aclose()

    log, launches = asyncio.run(scenario())
    failures = [e["message"] for e in log if e["kind"] == "launch_failed"]
    assert all("exit code 3" in m for m in failures), failures
    delays = [float(m.rsplit("next launch in ", 1)[1].rstrip("s")) for m in failures]
    assert delays == sorted(delays) and delays[-1] >= 3 * delays[0], delays
    assert launches >= 4


def test_local_fleet_start_fails_clearly_when_no_worker_comes_up(storage: Path) -> None:
    fleet = LocalFleet(workers=1, storage_dir=storage, command=crashing_command,
                       spec_overrides=QUICK)
    with pytest.raises(TimeoutError, match=r"no healthy worker within 3s.*exit code 3"):
        fleet.start(timeout=3)
    assert not any(t.name == "imagefleet-local" for t in threading.enumerate())


def test_scales_out_under_load_and_in_when_idle_without_failed_requests(storage: Path) -> None:
    spec = {**QUICK, "target_inflight": 2.0, "scale_out_window_s": 1.0,
            "scale_in_window_s": 2.0, "scale_cooldown_s": 1.0, "drain_timeout_s": 20}
    statuses: list[int] = []
    lock = threading.Lock()
    stop_heavy, stop_all = threading.Event(), threading.Event()

    def client(stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                code = post_image(fleet.endpoint, "gaussian_blur").status_code
            except requests.RequestException as exc:
                code = repr(exc)
            with lock:
                statuses.append(code)

    with LocalFleet(workers=1, min_workers=1, max_workers=2, storage_dir=storage,
                    spec_overrides=spec).start(STARTUP) as fleet, \
            ThreadPoolExecutor(max_workers=6) as pool:
        assert fleet.snapshot()["desired"] == 1
        # 5 + 1 clients: exactly what one worker admits on 2 cores (2 slots + 4 queued);
        # a 7th would be shed with 503 overloaded, which is the admission tests' subject.
        heavy = [pool.submit(client, stop_heavy) for _ in range(5)]
        light = pool.submit(client, stop_all)
        wait_until(lambda: fleet.snapshot()["desired"] == 2, 30, what="scale out to 2")
        wait_until(lambda: len(healthy_ids(fleet)) == 2, STARTUP, what="2 healthy workers")
        stop_heavy.set()
        for future in heavy:
            future.result(60)
        with lock:
            mark = len(statuses)
        # One light client keeps requests flowing through the scale-in.
        wait_until(lambda: fleet.snapshot()["desired"] == 1, 30, what="scale in to 1")
        wait_until(lambda: len(fleet.worker_pids()) == 1, 30, what="drained worker stopped")
        wait_until(lambda: len(statuses) > mark + 5, 30, what="requests after the scale-in")
        stop_all.set()
        light.result(60)
        kinds = [e["kind"] for e in fleet.snapshot()["events"]]
        assert "scale_out" in kinds and "scale_in" in kinds and "scale_in_drain" in kinds
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {failed[:5]}"
    assert len(statuses[mark:]) > 5


def test_admin_terminate_replaces_first_and_drops_no_request(storage: Path) -> None:
    statuses: list[int | str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                statuses.append(post_image(fleet.endpoint, "invert").status_code)
            except requests.RequestException as exc:
                statuses.append(repr(exc))

    with LocalFleet(workers=1, storage_dir=storage, spec_overrides=QUICK).start(STARTUP) \
            as fleet, ThreadPoolExecutor(max_workers=2) as pool:
        (old,) = healthy_ids(fleet)
        old_pid = fleet.worker_pids()[old]
        clients = [pool.submit(client) for _ in range(2)]
        terminate = f"{fleet.endpoint}/fleet/instances/{old}/terminate"
        # Without the token the fleet made at start, nothing is terminated.
        assert requests.post(terminate, json={}, timeout=10).status_code == 401
        answer = requests.post(terminate, json={}, timeout=10,
                               headers={"Authorization": f"Bearer {fleet.admin_token}"})
        assert answer.status_code == 202 and answer.json()["status"] == "replacing"
        new = wait_until(lambda: healthy_ids(fleet) - {old}, STARTUP, what="replacement")
        wait_until(lambda: old not in fleet.worker_pids(), 30, what="old worker stopped")
        mark = len(statuses)
        wait_until(lambda: len(statuses) > mark + 3, 30, what="requests on the replacement")
        stop.set()
        for future in clients:
            future.result(60)
        kinds = [(e["kind"], e["instance_id"]) for e in fleet.snapshot()["events"]]
    assert not pid_alive(old_pid)
    # The replacement was launched before the old worker was deregistered.
    launched = kinds.index(("launched", next(iter(new))))
    assert launched < kinds.index(("deregistered", old))
    failed = [s for s in statuses if s != 200]
    assert not failed, f"{len(failed)} of {len(statuses)} requests failed: {failed[:5]}"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_python_m_fleet_local_leaves_no_process_behind(storage: Path, sig) -> None:
    port = free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-m", "fleet", "local", "--workers", "2", "--port", str(port),
         "--storage", str(storage)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def two_healthy() -> bool:
            state = requests.get(f"http://127.0.0.1:{port}/fleet", timeout=2).json()
            return sum(i["health"] == "healthy" for i in state["instances"]) == 2

        wait_until(two_healthy, STARTUP, what="python -m fleet local with 2 healthy workers")
        state = json.loads((storage / ".fleet" / STATE_FILE).read_text())
        pids = [w["pid"] for w in state["workers"].values()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        second = run_cli("local", "--port", str(free_port()), "--storage", str(storage))
        assert second.returncode == 2
        assert "another fleet is running" in second.stderr
        fleet.send_signal(sig)
        out, _ = fleet.communicate(timeout=60)
        assert fleet.returncode == 0, out.decode(errors="replace")[-2000:]
        assert b"stopped; no worker left running" in out
        assert not [p for p in pids if pid_alive(p)]
        assert not pids_mentioning(str(storage))
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/fleet", timeout=2)
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait(10)


def test_a_parent_learns_readiness_from_a_file_and_stops_the_fleet_by_closing_stdin(
        storage: Path, tmp_path: Path) -> None:
    """How the desktop app runs ``python -m fleet local`` as its child: a free port, a
    readiness file once a worker is healthy, and end of stdin (the parent closed its pipe,
    or died) as the signal to stop."""
    ready_file = tmp_path / "ready.json"
    fleet = subprocess.Popen(
        [sys.executable, "-m", "fleet", "local", "--workers", "1", "--port", "0",
         "--storage", str(storage), "--ready-file", str(ready_file), "--stop-on-stdin-eof"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(ready_file.exists, STARTUP, what="the readiness file")
        assert stat.S_IMODE(ready_file.stat().st_mode) == 0o600
        ready = json.loads(ready_file.read_text())
        assert ready["pid"] == fleet.pid
        state = requests.get(ready["endpoint"] + "/fleet", timeout=5).json()
        assert [i["health"] for i in state["instances"]] == ["healthy"]  # ready means that
        token = Path(ready["admin_token_file"]).read_text().strip()
        assert requests.post(ready["endpoint"] + "/fleet/scale", json={"desired": 1},
                             headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code == 200
        pids = [w["pid"] for w in json.loads(
            (storage / ".fleet" / STATE_FILE).read_text())["workers"].values()]
        out, _ = fleet.communicate(input=b"", timeout=60)  # no input: stdin is closed
        assert fleet.returncode == 0, out.decode(errors="replace")[-2000:]
        assert b"standard input closed" in out
        assert not ready_file.exists()
        assert not [p for p in pids if pid_alive(p)]
    finally:
        if fleet.poll() is None:
            fleet.kill()
            fleet.wait(10)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_rejects_bad_ranges_and_busy_ports_clearly(storage: Path) -> None:
    bad = run_cli("local", "--workers", "2", "--min", "3", "--storage", str(storage))
    assert bad.returncode == 2
    assert "need 0 <= min <= workers <= max, got min=3 workers=2 max=2" in bad.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli("local", "--port", str(port), "--storage", str(storage))
    assert taken.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    assert "Unclosed" not in taken.stderr
    assert not (storage / ".fleet" / STATE_FILE).exists()  # no worker was started


def test_restart_cleans_up_workers_a_killed_fleet_left(storage: Path) -> None:
    port = free_port()
    command = [sys.executable, "-m", "fleet", "local", "--workers", "1", "--port", str(port),
               "--storage", str(storage)]
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        state_file = storage / ".fleet" / STATE_FILE
        wait_until(lambda: state_file.exists() and json.loads(state_file.read_text())["workers"],
                   STARTUP, what="a worker recorded in the run folder")
        orphan = next(iter(json.loads(state_file.read_text())["workers"].values()))["pid"]
        first.kill()  # SIGKILL: no chance to clean up
        first.wait(10)
        assert pid_alive(orphan)
    finally:
        if first.poll() is None:
            first.kill()
    with LocalFleet(workers=1, storage_dir=storage, spec_overrides=QUICK).start(STARTUP) \
            as fleet:
        wait_until(lambda: not pid_alive(orphan), 10, what="orphaned worker killed")
        notes = events(fleet, "cleanup")
        assert notes and str(orphan) in notes[0]["message"]
        assert post_image(fleet.endpoint).status_code == 200


def test_local_fleet_with_token_and_stop_leaves_no_thread_or_process(storage: Path) -> None:
    token = "fleet-test-token-123"
    auth = {"Authorization": f"Bearer {token}"}
    fleet = LocalFleet(workers=1, storage_dir=storage, token=token, spec_overrides=QUICK)
    with fleet:
        assert fleet.endpoint.startswith("http://127.0.0.1:")
        pids = list(fleet.worker_pids().values())
        assert post_image(fleet.endpoint).status_code == 401
        response = requests.post(fleet.endpoint + "/process", headers=auth, timeout=60,
                                 files={"image": ("a.png", PNG, "image/png")},
                                 data={"operation": "invert"})
        assert response.status_code == 200, response.text
        # The given token is the admin token too; reading /fleet stays open on loopback.
        assert fleet.admin_token == token
        scale = fleet.endpoint + "/fleet/scale"
        assert requests.post(scale, json={"desired": 1}, timeout=10).status_code == 401
        assert requests.post(scale, json={"desired": 1}, headers=auth,
                             timeout=10).status_code == 200
        assert requests.get(fleet.endpoint + "/fleet", timeout=10).status_code == 200
        argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes()
        assert token.encode() not in argv  # passed in the environment, not visible in ps
    assert not any(t.name == "imagefleet-local" for t in threading.enumerate())
    assert not [p for p in pids if pid_alive(p)]
    with pytest.raises(RuntimeError, match="not running"):
        _ = fleet.endpoint


def test_program_exiting_without_stop_leaves_no_worker(storage: Path) -> None:
    """An embedding program that forgets stop(): the atexit hook stops the fleet in order
    (manager first, so nothing is relaunched while the workers are being killed)."""
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from fleet.local.runtime import LocalFleet\n"
        "fleet = LocalFleet(workers=2, storage_dir=Path(sys.argv[1])).start(90)\n"
        "print(json.dumps(fleet.worker_pids()), flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(storage)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    pids = list(json.loads(done.stdout.strip().splitlines()[-1]).values())
    assert len(pids) == 2
    assert not [p for p in pids if pid_alive(p)]
    assert not pids_mentioning(str(storage)), "a worker (maybe a relaunched one) survived"
    assert not (storage / ".fleet" / STATE_FILE).exists()
