"""SSH bootstrap against a real OpenSSH server on loopback.

The test starts ``/usr/sbin/sshd`` with its own config, a freshly generated host key
and an authorized client key. The host key reaches the bootstrap the way it does on EC2:
inside a cloud-init console-output text block (here written by the test, on EC2 returned
by GetConsoleOutput). ``remote_setup.sh --no-systemd`` then starts a real
``python -m server`` that must answer /health on a loopback port. With
``--token-ssm-parameter`` that server reads its API token from SSM (moto in server mode;
sshd's SetEnv gives the session the credentials an instance role would).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest
from helpers_aws import Sshd, console_output_with, free_port, keygen, moto_server, wait_until
from helpers_fleet import pid_alive

from fleet.aws import ssh_bootstrap as bootstrap
from fleet.aws import wheel as wheel_module
from fleet.aws.ssh_bootstrap import (
    BootstrapFailed,
    BootstrapTimeout,
    HostKeyMismatch,
    HostKeyParseError,
    HostKeysNotFound,
    SshTarget,
)

pytestmark = pytest.mark.sshd
VENV = Path(sys.prefix)  # the venv running the tests already has the server's packages


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd.start(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def target(sshd: Sshd) -> SshTarget:
    keys = bootstrap.parse_console_host_keys(console_output_with([sshd.host_key_line]))
    return SshTarget(host="127.0.0.1", port=sshd.port, username=sshd.user,
                     key_file=sshd.client_key, host_keys=keys)


@pytest.fixture
def cleanup() -> Iterator[list[Path]]:
    """Paths to remove and pid files whose processes to stop after the test."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        pid_file = path / "server.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip())
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            wait_until(lambda p=pid: not pid_alive(p), 30, what=f"server {pid} to exit")
        shutil.rmtree(path, ignore_errors=True)


def _accepted_logins(sshd: Sshd) -> int:
    return sshd.log.count("Accepted publickey")


# ------------------------------------------------------------------- parsing keys

def test_parses_keys_from_console_output_with_prefixes(sshd: Sshd) -> None:
    line = sshd.host_key_line
    text = console_output_with([f"ec2: {line}"]).replace(
        "-----BEGIN SSH HOST KEY KEYS-----", "ec2: -----BEGIN SSH HOST KEY KEYS-----")
    keys = bootstrap.parse_console_host_keys(text.replace("\n", "\r\n"))
    assert [(k.key_type, k.key_b64) for k in keys] == [tuple(line.split()[:2])]
    assert keys[0].fingerprint.startswith("SHA256:")


def test_last_block_wins_after_reboot(sshd: Sshd, tmp_path: Path) -> None:
    other = keygen(tmp_path / "old_key").with_suffix(".pub").read_text().strip()
    text = console_output_with([other]) + console_output_with([sshd.host_key_line])
    assert bootstrap.parse_console_host_keys(text)[0].key_b64 == sshd.host_key_line.split()[1]


@pytest.mark.parametrize(("lines", "message"), [
    (["ssh-ed25519 not-base64!!"], "not valid base64"),
    (["ssh-dss AAAAB3NzaC1kc3MAAACBAP"], "unsupported host key type"),
    (["ssh-ed25519"], "expected 'TYPE BASE64"),
    (["ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa").decode()],
     "names a different type"),
    (["ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00").decode()],
     "could not be loaded"),
    ([], "empty"),
])
def test_malformed_key_block_is_a_clear_error(lines: list[str], message: str) -> None:
    with pytest.raises(HostKeyParseError, match=message):
        bootstrap.parse_console_host_keys(console_output_with(lines))


def test_missing_or_unfinished_block_means_not_yet() -> None:
    with pytest.raises(HostKeysNotFound):
        bootstrap.parse_console_host_keys("Booting...\ncloud-init running\n")
    with pytest.raises(HostKeysNotFound):
        bootstrap.parse_console_host_keys("-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAA")


def test_wait_for_host_keys_polls_until_published(sshd: Sshd) -> None:
    outputs = iter(["", "booting", console_output_with([sshd.host_key_line])])
    slept: list[float] = []
    keys = bootstrap.wait_for_host_keys(lambda: next(outputs), deadline=time.monotonic() + 60,
                                        sleep=slept.append)
    assert len(keys) == 1 and slept == [1.0, 2.0]  # backoff, no fixed interval


# ------------------------------------------------------------------ real sshd

@pytest.mark.slow
def test_bootstrap_brings_up_a_real_server(target: SshTarget, sshd: Sshd, tmp_path: Path,
                                           cleanup: list[Path]) -> None:
    prefix = tmp_path / "instance"
    cleanup.append(prefix)
    port = free_port()
    result = bootstrap.bootstrap_over_ssh(
        target, sudo=False, timeout_s=120,
        setup_args=["--no-systemd", "--prefix", str(prefix), "--venv", str(VENV),
                    "--port", str(port), "--instance-id", "i-test123"])
    assert not Path(result.remote_dir).exists()  # the bundle directory is removed
    assert result.exit_code == 0
    assert "healthy" in result.stdout_tail
    assert result.host_key_fingerprint == target.host_keys[0].fingerprint
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        health = json.load(response)
    assert response.status == 200
    assert health["status"] == "ok" and health["instance_id"] == "i-test123"
    # The bundle carried the server code, installed from the wheel (pip --target leaves
    # its dist-info), and only the server's requirements.
    assert (prefix / "app" / "server" / "__main__.py").exists()
    assert len(list((prefix / "app").glob("imagefleet-*.dist-info"))) == 1
    assert not (prefix / "app.new").exists() and not (prefix / "app.old").exists()
    requirements = (prefix / "app" / "requirements.txt").read_text()
    assert "opencv-python-headless" in requirements and "customtkinter" not in requirements

    # Idempotent: running it again replaces the server and is healthy again.
    first_pid = (prefix / "server.pid").read_text()
    again = bootstrap.bootstrap_over_ssh(
        target, sudo=False, timeout_s=120,
        setup_args=["--no-systemd", "--prefix", str(prefix), "--venv", str(VENV),
                    "--port", str(port)])
    assert again.exit_code == 0 and "stopped previous server" in again.stdout_tail
    assert (prefix / "server.pid").read_text() != first_pid
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert response.status == 200


@pytest.mark.slow
def test_a_worker_set_up_with_the_token_parameter_refuses_requests_without_it(
        fake_aws: None, tmp_path: Path, cleanup: list[Path]) -> None:
    from fleet.aws import operator as aws_operator

    region = "eu-west-1"
    with moto_server() as moto:
        clients = aws_operator.make_clients(region, None, moto)
        names = aws_operator.fleet_names(clients, "demo")
        parameter = aws_operator.ensure_token(clients, names, rotate=False, overlap_s=0,
                                               report=lambda line: None)
        token = aws_operator.read_token_set(clients, names).current
        sshd = Sshd.start(tmp_path / "sshd", set_env={
            "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_ENDPOINT_URL_SSM": moto})
        try:
            keys = bootstrap.parse_console_host_keys(console_output_with([sshd.host_key_line]))
            target = SshTarget(host="127.0.0.1", port=sshd.port, username=sshd.user,
                               key_file=sshd.client_key, host_keys=keys)
            prefix = tmp_path / "instance"
            cleanup.append(prefix)
            port = free_port()
            setup = ["--no-systemd", "--prefix", str(prefix), "--venv", str(VENV),
                     "--port", str(port), "--region", region,
                     "--token-ssm-parameter", parameter]
            result = bootstrap.bootstrap_over_ssh(target, sudo=False, timeout_s=120,
                                                  setup_args=setup)
            assert result.exit_code == 0
            assert token not in result.stdout_tail + result.stderr_tail

            def get(path: str, token: str | None = None) -> int:
                request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
                if token:
                    request.add_header("Authorization", f"Bearer {token}")
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:
                        return response.status
                except urllib.error.HTTPError as exc:
                    return exc.code

            assert get("/health") == 200  # the load balancer's check needs no token
            assert get("/operations") == 401
            assert get("/operations", "wrong-token-123") == 401
            assert get("/operations", token) == 200
            # The token is nowhere on the instance's disk: only the parameter's name.
            for path in prefix.rglob("*"):
                if path.is_file() and path.suffix not in (".pyc",):
                    assert token.encode() not in path.read_bytes(), path
        finally:
            sshd.stop()


def test_wrong_host_key_is_refused_and_nothing_runs(sshd: Sshd, tmp_path: Path) -> None:
    impostor = keygen(tmp_path / "impostor").with_suffix(".pub").read_text().strip()
    keys = bootstrap.parse_console_host_keys(console_output_with([impostor]))
    target = SshTarget(host="127.0.0.1", port=sshd.port, username=sshd.user,
                       key_file=sshd.client_key, host_keys=keys)
    logins_before = _accepted_logins(sshd)
    with pytest.raises(HostKeyMismatch) as exc:
        bootstrap.bootstrap_over_ssh(target, sudo=False, timeout_s=30,
                                     setup_args=["--no-systemd", "--prefix",
                                                 str(tmp_path / "never")])
    assert exc.value.fingerprint == keygen_fingerprint(sshd)
    assert "refusing" in str(exc.value)
    assert not (tmp_path / "never").exists()
    # Refused before authentication: sshd never accepted a login for this attempt.
    assert _accepted_logins(sshd) == logins_before


def keygen_fingerprint(sshd: Sshd) -> str:
    key_type, key_b64 = sshd.host_key_line.split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(key_b64)).fingerprint


def test_failing_setup_reports_exit_code_and_stderr(target: SshTarget, tmp_path: Path,
                                                    cleanup: list[Path]) -> None:
    with pytest.raises(BootstrapFailed) as exc:
        bootstrap.bootstrap_over_ssh(
            target, sudo=False, timeout_s=60,
            setup_args=["--no-systemd", "--prefix", str(tmp_path / "p"),
                        "--venv", str(tmp_path / "no-such-venv")])
    assert exc.value.exit_code == 1
    assert "no-such-venv has no bin/python" in exc.value.stderr_tail
    assert "exit code 1" in str(exc.value)
    with pytest.raises(BootstrapFailed) as usage:
        bootstrap.bootstrap_over_ssh(target, sudo=False, timeout_s=60,
                                     setup_args=["--no-systemd", "--port", "99999"])
    assert usage.value.exit_code == 2
    assert "--port must be 1..65535" in usage.value.stderr_tail


def test_large_interleaved_output_does_not_deadlock(target: SshTarget) -> None:
    # 4 MB on each stream, stderr first: reading only stdout until EOF would stall the
    # remote process once stderr's window is full.
    script = ("import sys; sys.stderr.write('e' * 4_000_000); sys.stderr.flush(); "
              "sys.stdout.write('o' * 4_000_000); sys.exit(3)")
    client = bootstrap.connect(target, deadline=time.monotonic() + 30)
    try:
        result = bootstrap.run_command(client, f"{sys.executable} -c \"{script}\"",
                                       deadline=time.monotonic() + 60)
    finally:
        client.close()
    assert result.exit_code == 3
    assert result.stdout == "o" * bootstrap.OUTPUT_TAIL_BYTES
    assert result.stderr == "e" * bootstrap.OUTPUT_TAIL_BYTES


def test_connection_errors_are_retried_until_the_deadline(target: SshTarget) -> None:
    """A port that accepts and hangs up (no banner) and a closed port: both retried."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()
    accepted: list[int] = []

    def hang_up() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=hang_up, daemon=True)
    thread.start()
    try:
        bad_banner = SshTarget(host="127.0.0.1", port=listener.getsockname()[1],
                               username=target.username, key_file=target.key_file,
                               host_keys=target.host_keys)
        started = time.monotonic()
        with pytest.raises(BootstrapTimeout):
            bootstrap.connect(bad_banner, deadline=started + 2.0)
        assert len(accepted) >= 2  # it retried
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()

    closed = SshTarget(host="127.0.0.1", port=free_port(), username=target.username,
                       key_file=target.key_file, host_keys=target.host_keys)
    with pytest.raises(BootstrapTimeout):
        bootstrap.connect(closed, deadline=time.monotonic() + 1.0)


def test_connect_waits_for_sshd_to_come_up(tmp_path: Path) -> None:
    """sshd starts only after the first attempts failed (an instance still booting);
    its host key is known beforehand, as on EC2 (console output)."""
    server = Sshd.prepare(tmp_path / "late")
    keys = bootstrap.parse_console_host_keys(console_output_with([server.host_key_line]))
    target = SshTarget("127.0.0.1", server.user, server.client_key, keys, port=server.port)
    attempts: list[float] = []

    def sleep_then_boot(delay: float) -> None:
        attempts.append(delay)
        if len(attempts) == 3:
            server.launch()
        time.sleep(delay)

    try:
        client = bootstrap.connect(target, deadline=time.monotonic() + 60,
                                   sleep=sleep_then_boot)
        try:
            assert bootstrap.run_command(client, "echo ready",
                                         deadline=time.monotonic() + 10).stdout == "ready\n"
        finally:
            client.close()
    finally:
        server.stop()
    assert len(attempts) >= 3
    assert attempts[:3] == [0.25, 0.5, 1.0]  # exponential backoff, not a fixed interval


# ------------------------------------------------------------- bundle, user data

def _source_tree_state() -> set[str]:
    """Build products a wheel build could leave in the checkout."""
    root = bootstrap.PROJECT_ROOT
    return {p.relative_to(root).as_posix() for pattern in ("build", "dist", "*.egg-info",
                                                           "*/*.egg-info")
            for p in root.glob(pattern)}


def test_bundle_is_reproducible_and_holds_what_the_setup_needs() -> None:
    before = _source_tree_state()
    first, second = bootstrap.build_bundle(), bootstrap.build_bundle()
    assert first == second  # same code, same bytes (mtime 0, sorted, SOURCE_DATE_EPOCH)
    assert _source_tree_state() == before  # built from a copy: no build/ or egg-info here
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
        requirements = tar.extractfile("requirements.txt").read().decode()
        setup_mode = tar.getmember("scripts/remote_setup.sh").mode
        wheels = [n for n in names if n.endswith(".whl")]
        assert len(wheels) == 1, names  # exactly one wheel, at the top
        wheel_bytes = tar.extractfile(wheels[0]).read()
    # The project's code travels only inside the wheel.
    assert sorted(names) == sorted([*wheels, "requirements.txt", "scripts/remote_setup.sh",
                                    "scripts/setup_common.sh"])  # it sources setup_common
    assert re.fullmatch(r"imagefleet-[0-9][0-9A-Za-z.]*-py3-none-any\.whl", wheels[0])
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as wheel:
        entries = wheel.infolist()
        inside = {e.filename for e in entries}
    assert {"server/__main__.py", "server/app.py", "scripts/remote_setup.sh",
            "scripts/setup_common.sh"} <= inside  # the .sh files are package data
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in inside)
    assert not any(n.startswith(("tests/", "build/")) or ".egg-info/" in n for n in inside)
    # Reproducible zip: every entry carries the fixed SOURCE_DATE_EPOCH, not a build time.
    assert {e.date_time for e in entries} == {(1980, 1, 1, 0, 0, 0)}
    assert setup_mode & 0o111
    packages = {line.split(">")[0].split("=")[0].split("<")[0].strip()
                for line in requirements.splitlines() if line.strip()}
    assert set(bootstrap.SERVER_PACKAGES) <= packages
    assert not packages & {"customtkinter", "pytest", "moto", "ruff", "wheel", "setuptools"}


def test_a_prebuilt_wheel_in_root_goes_into_the_bundle_as_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manager host: its installed code keeps the wheel it was set up with, and has no
    sources or setuptools to build one; build_bundle(root=...) must not try."""
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle())) as tar:
        tar.extractall(tmp_path / "bundle", filter="data")
    wheel = next((tmp_path / "bundle").glob("*.whl"))
    root = tmp_path / "app"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--disable-pip-version-check", "--target", str(root),
                    str(wheel)], check=True, timeout=120, capture_output=True)
    shutil.copy(wheel, root / wheel.name)
    shutil.copy(bootstrap.PROJECT_ROOT / "requirements.txt", root / "requirements.txt")
    assert not (root / "pyproject.toml").exists()

    def no_build(_root: Path) -> tuple[str, bytes]:
        raise AssertionError("built a wheel although a prebuilt one was there")

    monkeypatch.setattr(wheel_module, "build_wheel", no_build)
    bundle = bootstrap.build_bundle(root=root)
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        assert tar.extractfile(wheel.name).read() == wheel.read_bytes()
        assert tar.extractfile("scripts/remote_setup.sh").read() == (
            bootstrap.PROJECT_ROOT / "scripts" / "remote_setup.sh").read_bytes()
    (root / "imagefleet-9.9.9-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(wheel_module.WheelBuildError, match="more than one prebuilt wheel"):
        bootstrap.build_bundle(root=root)


def test_a_failed_wheel_build_says_why(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "imagefleet"\nversion = "not a version"\n'
        '[tool.setuptools.packages.find]\ninclude = ["server*"]\n')
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    with pytest.raises(wheel_module.WheelBuildError, match="pip wheel failed"):
        wheel_module.build_wheel(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pyproject.toml", "server"]


def test_a_wheel_is_built_again_when_its_sources_change(tmp_path: Path) -> None:
    """Builds are remembered by the sources' digest: the same sources answer at once with
    the same bytes, a changed file builds a new wheel holding the change."""
    root = tmp_path / "project"
    (root / "server").mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[project]\nname = "imagefleet"\nversion = "0.1.0"\n'
        '[tool.setuptools.packages.find]\ninclude = ["server*"]\n')
    (root / "server" / "__init__.py").write_text("VERSION = 1\n")
    name, first = wheel_module.build_wheel(root)
    assert wheel_module.build_wheel(root) == (name, first)
    (root / "server" / "__init__.py").write_text("VERSION = 2\n")
    _, second = wheel_module.build_wheel(root)
    with zipfile.ZipFile(io.BytesIO(second)) as wheel:
        assert wheel.read("server/__init__.py") == b"VERSION = 2\n"
    assert second != first


def test_remote_setup_refuses_a_bundle_without_exactly_one_wheel(tmp_path: Path) -> None:
    source = tmp_path / "bundle"
    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle())) as tar:
        tar.extractall(source, filter="data")
    wheel = next(source.glob("*.whl"))
    shutil.copy(wheel, source / "imagefleet-0.0.1-py3-none-any.whl")
    command = ["bash", str(source / "scripts" / "remote_setup.sh"), "--no-systemd",
               "--source", str(source), "--prefix", str(tmp_path / "prefix"),
               "--venv", str(VENV)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "exactly one imagefleet-" in result.stderr
    assert "(found 2)" in result.stderr and not (tmp_path / "prefix" / "app").exists()


def test_user_data_runs_the_same_setup_and_is_valid_bash(tmp_path: Path) -> None:

    script = bootstrap.render_user_data(bundle_url="s3://imgf-demo-1-eu-west-1/fleet/b.tgz",
                                        storage="s3://imgf-demo-1-eu-west-1/results",
                                        region="eu-west-1")
    path = tmp_path / "user-data.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert script.startswith("#!/bin/bash\n")
    assert "s3 cp s3://imgf-demo-1-eu-west-1/fleet/b.tgz bundle.tar.gz" in script
    assert ("bash scripts/remote_setup.sh --source . --storage "
            "s3://imgf-demo-1-eu-west-1/results --region eu-west-1 --port 8080") in script
    with pytest.raises(ValueError, match="s3://"):
        bootstrap.render_user_data(bundle_url="https://example.com/b.tgz", storage="s3://b/r",
                                   region="eu-west-1")


def test_remote_setup_reports_a_server_that_dies_before_healthy(tmp_path: Path) -> None:
    """The port is taken: the server exits at once and the script says so, with the log."""
    source = tmp_path / "bundle"
    source.mkdir()

    with tarfile.open(fileobj=io.BytesIO(bootstrap.build_bundle())) as tar:
        tar.extractall(source, filter="data")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            ["bash", str(source / "scripts" / "remote_setup.sh"), "--no-systemd",
             "--source", str(source), "--prefix", str(tmp_path / "prefix"),
             "--venv", str(VENV), "--port", str(port), "--health-timeout", "60"],
            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "server exited before becoming healthy" in result.stderr
    assert result.stderr.count("\n") >= 2  # the log tail came along
    assert not pid_alive(int((tmp_path / "prefix" / "server.pid").read_text()))
