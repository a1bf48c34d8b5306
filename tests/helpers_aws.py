"""Helpers for the AWS-side tests: polling, free ports, a real sshd on loopback, moto in
server mode."""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import free_port
from waiting import wait_until

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def require_sshd() -> None:
    """In CI a missing sshd fails the test run; on a developer machine it skips."""
    missing = [str(p) for p in (SSHD,) if not p.exists()] + (
        [] if shutil.which("ssh-keygen") else ["ssh-keygen"])
    if missing:
        message = (f"openssh-server is needed for this test ({', '.join(missing)} missing); "
                   "install it with scripts/install_system_deps.sh")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def keygen(path: Path, comment: str = "") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True)
    return path


def console_output_with(host_key_lines: list[str]) -> str:
    """Console text as cloud-init prints it on EC2, with the given public key lines."""
    return "\n".join([
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64 (debian-kernel@lists.debian.org)",
        "[    3.120000] cloud-init[512]: Cloud-init v. 22.4.2 running 'init' at ...",
        "<14>Nov 23 07:00:10 cloud-init: #############################################",
        "-----BEGIN SSH HOST KEY FINGERPRINTS-----",
        "256 SHA256:abcdefghijklmnopqrstuvwxyz root@ip-10-0-0-1 (ED25519)",
        "-----END SSH HOST KEY FINGERPRINTS-----",
        "-----BEGIN SSH HOST KEY KEYS-----",
        *host_key_lines,
        "-----END SSH HOST KEY KEYS-----",
        "[   12.345678] cloud-init[640]: Cloud-init v. 22.4.2 finished",
        "",
    ])


@dataclass
class Sshd:
    """A real OpenSSH server on 127.0.0.1, started from a private config in ``root``.

    Runs as the current user. As root, sshd insists on its privilege-separation
    directory /run/sshd (what the Debian unit's RuntimeDirectory creates), so it is
    created if missing; as any other user sshd runs unprivileged and needs nothing.
    """

    root: Path
    port: int
    host_key: Path
    client_key: Path
    user: str
    config: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host_key_line(self) -> str:
        return self.host_key.with_suffix(".pub").read_text().strip()

    @property
    def log(self) -> str:
        path = self.root / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @classmethod
    def prepare(cls, root: Path, set_env: Mapping[str, str] | None = None) -> Sshd:
        """Keys, config and a free port, without starting sshd yet. ``set_env``: the
        environment of every session (sshd's SetEnv), e.g. the credentials an instance
        role would provide."""
        require_sshd()
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        host_key = keygen(root / "ssh_host_ed25519_key", "root@test-instance")
        client_key = keygen(root / "client_key", "imagefleet-test")
        (root / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        port = free_port()
        sftp = SFTP_SERVER if SFTP_SERVER.exists() else "internal-sftp"
        config = root / "sshd_config"
        config.write_text("\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {host_key}",
            f"PidFile {root / 'sshd.pid'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"Subsystem sftp {sftp}",
            "LogLevel VERBOSE",
            *([" ".join(["SetEnv", *(f"{k}={v}" for k, v in set_env.items())])]
              if set_env else []),
            "",
        ]))
        return cls(root, port, host_key, client_key, getpass.getuser(), config)

    @classmethod
    def start(cls, root: Path, timeout: float = 20.0,
              set_env: Mapping[str, str] | None = None) -> Sshd:
        return cls.prepare(root, set_env).launch(timeout)

    def launch(self, timeout: float = 20.0) -> Sshd:
        with (self.root / "sshd.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"sshd exited with {process.returncode}:\n{self.log}")
            return port_open(self.port)

        wait_until(ready, timeout, what="sshd to listen")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on a free loopback port, for other processes (a server
    reading its token from SSM); yields its URL. Use with the ``fake_aws`` fixture."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


class ClientProxy:
    """Wraps a boto3 client at the provider's boundary: passes every call through,
    counts calls, and lets a test override single operations (to inject behaviour moto
    does not have, such as target health states or ClientToken idempotency)."""

    def __init__(self, client: object) -> None:
        self._client = client
        self.calls: list[str] = []
        self.overrides: dict[str, Callable[..., object]] = {}

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._client, name)
        if name == "get_paginator":
            def get_paginator(operation: str) -> object:
                self.calls.append(f"paginate:{operation}")
                return attr(operation)
            return get_paginator
        if not callable(attr) or name.startswith("_") or name in ("exceptions", "meta"):
            return attr

        def call(*args: object, **kwargs: object) -> object:
            self.calls.append(name)
            override = self.overrides.get(name)
            if override is not None:
                return override(attr, *args, **kwargs)
            return attr(*args, **kwargs)
        return call


def client_error(code: str, message: str = "injected", operation: str = "RunInstances"):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# ------------------------------------------------------------------ repair timeline

@dataclass(frozen=True)
class HealthSettings:
    """Target group health check plus how often the manager observes."""

    interval_s: float
    timeout_s: float
    healthy_threshold: int
    unhealthy_threshold: int
    observe_s: float
    # How long after its last healthy observation a failing instance is kept
    # (FleetSpec.no_progress_timeout_s); 0 for an Auto Scaling group, which replaces at once.
    no_progress_s: float = 0.0


@dataclass(frozen=True)
class BootAssumptions:
    """How long the outside world takes (assumptions, stated in the README)."""

    pending_s: float = 10.0  # RunInstances -> EC2 "running" (Nitro, EBS-backed)
    keys_on_console_s: float = 25.0  # launch -> sshd up, host keys on the console
    ssh_upload_s: float = 2.0  # connect + SFTP upload of the bundle (~100 kB)
    remote_setup_s: float = 30.0  # apt python3-venv + pip (server wheels) + start + /health
    registration_s: float = 5.0  # RegisterTargets -> the ALB's first health check


@dataclass
class _SimInstance:
    id: str
    launched_at: float
    bootstrapped_at: float | None = None
    bootstrap_started: float | None = None
    registered: bool = False
    health: str = "unused"
    next_check: float = 0.0
    passes: int = 0
    fails: int = 0
    failed_at: float | None = None
    gone: bool = False
    results: list[tuple[float, bool]] | None = None
    last_healthy: float | None = None  # last observe that saw it healthy


@dataclass(frozen=True)
class RepairTimes:
    detect_s: float  # failure -> the manager decides to replace (terminate + launch)
    healthy_s: float  # failure -> the replacement is healthy in the target group


def simulate_repair(settings: HealthSettings, boot: BootAssumptions, fail_at: float, *,
                    hang: bool = True, dt: float = 0.05, horizon: float = 900.0
                    ) -> RepairTimes:
    """Drive the pure ``decide`` with a fake clock against a model of EC2 and the ALB.

    Two instances serve; at ``fail_at`` one of them hangs (health checks time out) or, with
    ``hang=False``, its instance dies (EC2 reports it stopped at the next observe).
    """
    from fleet.model import Bootstrap as BootstrapAction
    from fleet.model import FleetSpec, Health, Instance, InstanceState, Observed
    from fleet.model import Launch as LaunchAction
    from fleet.model import Register as RegisterAction
    from fleet.model import Terminate as TerminateAction
    from fleet.reconcile import decide

    spec = FleetSpec(name="sim", desired=2, min=2, max=2,
                     health_check_interval_s=settings.interval_s,
                     health_check_timeout_s=settings.timeout_s,
                     healthy_threshold=settings.healthy_threshold,
                     unhealthy_threshold=settings.unhealthy_threshold,
                     grace_period_s=480.0, drain_timeout_s=45.0,
                     tick_interval_s=settings.observe_s,
                     no_progress_timeout_s=settings.no_progress_s)
    fleet = {
        iid: _SimInstance(iid, launched_at=-1000.0, bootstrapped_at=-900.0, registered=True,
                          health="healthy", next_check=phase, results=[])
        for iid, phase in (("i-a", 0.7), ("i-b", 2.9))
    }
    memory = Observed(()).memory
    seq = 0
    detect = healthy = None
    t, next_tick = 0.0, 0.0
    while t < horizon and healthy is None:
        for inst in fleet.values():
            if inst.gone or not inst.registered:
                continue
            if inst.results is None:
                inst.results = []
            while t >= inst.next_check:
                start = inst.next_check
                up = (inst.bootstrapped_at is not None and inst.bootstrapped_at <= start
                      and (inst.failed_at is None or start < inst.failed_at))
                inst.results.append((start + (settings.timeout_s if not up and hang else 0.01),
                                     up))
                inst.next_check += settings.interval_s
            for result in [r for r in inst.results if r[0] <= t]:
                inst.results.remove(result)
                if result[1]:
                    inst.passes, inst.fails = inst.passes + 1, 0
                    if inst.passes >= settings.healthy_threshold:
                        if inst.health != "healthy" and inst.id not in ("i-a", "i-b"):
                            healthy = t if healthy is None else healthy
                        inst.health = "healthy"
                else:
                    inst.fails, inst.passes = inst.fails + 1, 0
                    if inst.fails >= settings.unhealthy_threshold:
                        inst.health = "unhealthy"
        if t >= fail_at and fleet["i-a"].failed_at is None:
            fleet["i-a"].failed_at = fail_at
        if t >= next_tick:
            next_tick += settings.observe_s
            observed = []
            for inst in fleet.values():
                if inst.gone:
                    continue
                if not hang and inst.failed_at is not None:
                    state = InstanceState.STOPPED
                elif t < inst.launched_at + boot.pending_s:
                    state = InstanceState.PENDING
                elif inst.bootstrap_started is not None and (
                        inst.bootstrapped_at is None or t < inst.bootstrapped_at):
                    state = InstanceState.BOOTSTRAPPING
                else:
                    state = InstanceState.RUNNING
                if inst.registered and inst.health == "healthy":
                    inst.last_healthy = t  # what the AWS provider reports as progress
                observed.append(Instance(
                    id=inst.id, state=state,
                    health=Health(inst.health) if inst.registered else Health.UNUSED,
                    address="10.0.0.1:8080", launched_at=inst.launched_at, inflight=None,
                    registered=inst.registered, last_progress_at=inst.last_healthy,
                    bootstrapped=inst.bootstrapped_at is not None and t >= inst.bootstrapped_at))
            plan = decide(spec, Observed(tuple(observed), memory), t)
            memory = plan.memory
            for action in plan.actions:
                if isinstance(action, LaunchAction):
                    seq += 1
                    fleet[f"i-new{seq}"] = _SimInstance(f"i-new{seq}", launched_at=t)
                elif isinstance(action, BootstrapAction):
                    inst = fleet[action.instance_id]
                    if inst.bootstrap_started is None:
                        inst.bootstrap_started = t
                        keys_at = inst.launched_at + boot.keys_on_console_s
                        inst.bootstrapped_at = (max(t, keys_at) + boot.ssh_upload_s
                                                + boot.remote_setup_s)
                elif isinstance(action, RegisterAction):
                    inst = fleet[action.instance_id]
                    inst.registered, inst.health = True, "initial"
                    inst.next_check = t + boot.registration_s
                elif isinstance(action, TerminateAction):
                    fleet[action.instance_id].gone = True
                    if action.instance_id == "i-a" and detect is None:
                        detect = t
        t = round(t + dt, 6)
    if detect is None or healthy is None:
        raise AssertionError(f"no repair within {horizon}s (detect={detect})")
    return RepairTimes(detect - fail_at, healthy - fail_at)
