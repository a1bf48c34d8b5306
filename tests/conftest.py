"""Shared fixtures: the test photographs, real server processes, and the in-process app.

Server processes are real: `python -m server` under waitress on a free loopback port,
with a temporary storage folder, ready once `/health` answers 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import requests
from waiting import wait_until

from fleet.local.provider import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGES_DIR = REPO_ROOT.parent / "shared" / "testdata" / "images"
ENV_PREFIX = "IMAGEFLEET_"
STARTUP_TIMEOUT = 60.0  # importing OpenCV on a busy 2-core box can take a while
STOP_TIMEOUT = 45.0


@pytest.fixture(scope="session", autouse=True)
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every batch the tests run (the command line journals each one) goes to a journal
    of the session's own, never to the user's data folder; processes started by the
    tests inherit it. Tests that look at a journal set their own folder."""
    base = tmp_path_factory.mktemp("data-home")
    # Apps the tests start take any free port for their local fleet, never the stable one
    # (several may run at once); the stable port's own test sets it.
    os.environ.setdefault("IMAGEFLEET_LOCAL_PORT", "0")
    old = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(base)
    yield base
    if old is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = old


@pytest.fixture(scope="session")
def x_display() -> Iterator[str]:
    """One Xvfb for every GUI test module of the session, as ``DISPLAY``.

    Tk keeps a display's connection open until the process exits: had each module its
    own Xvfb, the next module's event loop would meet the stopped one's dead connection
    and Xlib would end the process ("XIO: fatal IO error").
    """
    from helpers_gui import xvfb_display

    with xvfb_display() as name:
        old = os.environ.get("DISPLAY")
        os.environ["DISPLAY"] = name
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("DISPLAY", None)
            else:
                os.environ["DISPLAY"] = old


@pytest.fixture(scope="session")
def images_dir() -> Path:
    """The shared test photographs (astronaut.png, camera.png, rocket.jpg, ...)."""
    assert IMAGES_DIR.is_dir(), f"test photographs missing: {IMAGES_DIR}"
    return IMAGES_DIR


@pytest.fixture(scope="session")
def camera_png(images_dir: Path) -> bytes:
    """The 512x512 grayscale test photograph, as PNG bytes."""
    return (images_dir / "camera.png").read_bytes()


@dataclass
class ServerProcess:
    """A running `python -m server`; its stderr (the logs) goes to `log_path`."""

    url: str
    port: int
    proc: subprocess.Popen
    storage_dir: Path
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        return requests.get(self.url + path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 60)
        return requests.post(self.url + path, **kwargs)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait for the drain, kill if it overruns; returns the exit code."""
        self.terminate()
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(10)
        self._log_file.close()
        return code


ServerFactory = Callable[..., ServerProcess]


class ServerLauncher:
    """Starts server processes under one temporary folder and stops them all at the end."""

    def __init__(self, base: Path):
        self.base = base
        self.started: list[ServerProcess] = []

    def __call__(self, *args: str, env: Mapping[str, str] | None = None,
                 storage_dir: Path | None = None,
                 startup_timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        """Start `python -m server ARGS`. `--port` (a free one) and `--storage` (a fresh
        folder, or `storage_dir`) are added unless `env` sets IMAGEFLEET_PORT or
        IMAGEFLEET_STORAGE; other IMAGEFLEET_* variables of this process are dropped."""
        env = dict(env or {})
        for attempt in range(3):
            try:
                return self._start(args, env, storage_dir, startup_timeout)
            except PortTaken:
                if attempt == 2 or "IMAGEFLEET_PORT" in env:
                    raise
        raise AssertionError("unreachable")

    def _start(self, args: tuple[str, ...], env: dict[str, str], storage_dir: Path | None,
               startup_timeout: float) -> ServerProcess:
        index = len(self.started)
        command = [sys.executable, "-m", "server", *args]
        if "IMAGEFLEET_PORT" in env:
            port = int(env["IMAGEFLEET_PORT"])
        else:
            port = free_port()
            command += ["--port", str(port)]
        if "IMAGEFLEET_STORAGE" in env:
            storage = Path(env["IMAGEFLEET_STORAGE"])
        else:
            storage = storage_dir or self.base / f"storage-{index}"
            command += ["--storage", str(storage)]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        full_env.update(env)
        full_env["PYTHONUNBUFFERED"] = "1"
        log_path = self.base / f"server-{index}-{port}.log"
        log_file = log_path.open("wb")
        # stderr carries the logs (one JSON access line per request); stdout is separate.
        with (self.base / f"server-{index}-{port}.out").open("wb") as out_file:
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=out_file, stderr=log_file)
        server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, storage, log_path,
                               log_file)
        self.started.append(server)

        def ready() -> bool:
            if proc.poll() is not None:
                raise ServerExited(proc.returncode)
            return requests.get(server.url + "/health", timeout=2).status_code == 200

        try:
            wait_until(ready, timeout=startup_timeout, interval=0.1,
                       what=f"{' '.join(command[2:])} to answer /health")
        except ServerExited as exc:
            text = server.log()
            server.stop()
            if "in use" in text:
                raise PortTaken(port) from exc
            raise AssertionError(f"server exited with {exc.code} before it was ready:\n"
                                 f"{text[-3000:]}") from exc
        except AssertionError as exc:
            raise AssertionError(f"server never became healthy:\n{server.log()[-3000:]}") from exc
        return server

    def stop_all(self) -> None:
        for server in self.started:
            if not server._log_file.closed:
                server.stop()


class ServerExited(Exception):
    def __init__(self, code: int | None):
        super().__init__(f"exit code {code}")
        self.code = code


class PortTaken(Exception):
    """The free port we picked was taken by someone else before the server bound it."""


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: `server_process("--token", "...")` starts a server and returns a
    ServerProcess (.url, .proc, .storage_dir, .log()); every server it started is
    SIGTERMed and waited for at teardown."""
    launcher = ServerLauncher(tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like `server_process`, for servers shared by the tests of one module."""
    launcher = ServerLauncher(tmp_path_factory.mktemp("servers"))
    yield launcher
    launcher.stop_all()


@pytest.fixture
def make_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory for in-process apps: `make_app(storage=..., **ServerConfig fields)`.
    Storage defaults to a FolderStorage in a fresh temporary folder."""
    from server import ServerConfig, create_app
    from server.storage import FolderStorage

    # Tests that look at the generated link secret must not pick one up from outside.
    monkeypatch.delenv("IMAGEFLEET_LINK_SECRET", raising=False)

    def make(storage=None, **config: Any):
        if storage is None:
            storage = FolderStorage(tmp_path / "storage")
        config.setdefault("instance_id", "test-instance")
        config.setdefault("storage", str(tmp_path / "storage"))
        app = create_app(ServerConfig(**config), storage=storage)
        # Exceptions become 500 JSON answers, as in production, instead of propagating.
        app.testing = False
        return app

    return make


@pytest.fixture
def app(make_app):
    """An in-process app on a FolderStorage in a temporary folder."""
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto's stand-in credentials and none of the developer's own AWS set-up, so no test
    can reach a real account. Region us-east-1 unless a test sets another."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    # moto loads thousands of sample AMIs per backend unless told not to (seconds each).
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
