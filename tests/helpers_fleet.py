"""Shared helpers for the fleet tests: free ports, pids, bare server processes."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import free_port
from waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "testdata" / "images"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


class ServerProcess:
    """One real ``python -m server`` on a free loopback port (killed on close)."""

    def __init__(self, storage: Path, instance_id: str, extra_args: list[str] | None = None):
        import subprocess
        import sys

        self.instance_id = instance_id
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(storage.parent / f"{instance_id}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--storage", str(storage), "--instance-id", instance_id, *(extra_args or [])],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"http://{self.address}/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait_healthy(self, timeout: float = 60) -> ServerProcess:
        wait_until(lambda: self.process.poll() is None and self.healthy(), timeout,
                   what=f"server {self.instance_id} to answer /health")
        return self

    def close(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.log.close()


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found
