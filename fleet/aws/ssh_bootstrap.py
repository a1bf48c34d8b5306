"""Bootstrap a fresh instance over SSH, trusting only the host keys it printed at boot.

The chain of trust: cloud-init writes the instance's SSH host public keys to the serial
console between ``-----BEGIN SSH HOST KEY KEYS-----`` and ``-----END SSH HOST KEY
KEYS-----``; EC2's ``GetConsoleOutput`` returns that text over the authenticated AWS
API. :func:`parse_console_host_keys` turns it into the only keys paramiko will accept
(``RejectPolicy``: an unknown or different key is refused, never added). Then:

1. connect, retrying connection and banner errors with backoff until a deadline
   (sshd is not up yet while the instance boots);
2. upload a bundle (the project's wheel, the server's requirements,
   ``scripts/remote_setup.sh`` and the ``setup_common.sh`` it sources) over SFTP;
3. run ``remote_setup.sh``, reading stdout and stderr to the end before asking for the
   exit status (paramiko blocks forever if a full stderr window stalls the remote side
   while we wait on stdout), and check the exit code.

Exceptions (all :class:`BootstrapError`):

- :class:`HostKeyParseError` — the console output has a malformed key block;
- :class:`HostKeysNotFound` — no complete key block yet (the instance is still booting);
- :class:`HostKeyMismatch` — the server presented a key that is not the published one;
  nothing is sent to it;
- :class:`BootstrapFailed` — the setup command exited non-zero (``exit_code``,
  ``stderr_tail``);
- :class:`BootstrapTimeout` — the deadline passed (connecting or running).

:func:`render_user_data` is the alternative without SSH: a cloud-init user-data script
that fetches the same bundle from S3 and runs the same ``remote_setup.sh``.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import io
import logging
import re
import select
import shlex
import struct
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from fleet.aws.wheel import project_wheel
from server.backoff import doubling_delays

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BEGIN_MARKER = "-----BEGIN SSH HOST KEY KEYS-----"
END_MARKER = "-----END SSH HOST KEY KEYS-----"
HOST_KEY_TYPES = frozenset({
    "ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "ssh-rsa",
})
# What the server imports; versions come from requirements.txt (one source of truth).
# What ``python -m server`` imports, lazily too (tests/test_imports.py walks it): an EC2
# worker installs these lines of requirements.txt and nothing else.
SERVER_PACKAGES = ("numpy", "opencv-python-headless", "pillow", "pillow-heif", "simplejpeg",
                   "flask", "waitress", "gunicorn", "boto3", "prometheus-client",
                   "pydantic", "pydantic-settings")
# What ``python -m fleet run`` imports (the manager host's venv; no GUI, no OpenCV).
# pydantic: the wire contract (server/api.py) the manager answers GET /fleet with
# pydantic-settings: the fleet spec's and the server config's validation (server/settings.py)
MANAGER_PACKAGES = ("aiohttp", "boto3", "paramiko", "cryptography", "pydantic",
                    "pydantic-settings")
OUTPUT_TAIL_BYTES = 64 * 1024


class BootstrapError(Exception):
    """Base of everything this module raises on purpose."""


class HostKeyParseError(BootstrapError, ValueError):
    """The console output's host key block is malformed."""


class HostKeysNotFound(BootstrapError):
    """The console output has no complete host key block (yet)."""


class HostKeyMismatch(BootstrapError):
    """The server's host key is not one the instance published. Nothing was executed."""

    def __init__(self, host: str, key_type: str, fingerprint: str) -> None:
        super().__init__(
            f"host key mismatch for {host}: server offered {key_type} {fingerprint}, "
            "which is not in the instance's console output; refusing to connect")
        self.host = host
        self.key_type = key_type
        self.fingerprint = fingerprint


class BootstrapFailed(BootstrapError):
    """A remote command exited non-zero."""

    def __init__(self, exit_code: int, stderr_tail: str, command: str = "") -> None:
        tail = stderr_tail.strip().splitlines()[-5:]
        super().__init__(f"bootstrap command failed with exit code {exit_code}"
                         + (f": {' | '.join(tail)}" if tail else ""))
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail
        self.command = command


class BootstrapTimeout(BootstrapError):
    """The deadline passed before the bootstrap finished."""


# ------------------------------------------------------------------------ host keys

@dataclass(frozen=True)
class HostKey:
    key_type: str
    key_b64: str

    def to_pkey(self) -> paramiko.PKey:
        return paramiko.PKey.from_type_string(self.key_type, base64.b64decode(self.key_b64))

    @property
    def fingerprint(self) -> str:
        return self.to_pkey().fingerprint


def parse_host_key_line(line: str) -> HostKey:
    """Parse ``TYPE BASE64 [COMMENT]`` and check the blob really is a key of that type."""
    parts = line.split()
    if len(parts) < 2:
        raise HostKeyParseError(f"expected 'TYPE BASE64 [COMMENT]', got {line!r}")
    key_type, key_b64 = parts[0], parts[1]
    if key_type not in HOST_KEY_TYPES:
        raise HostKeyParseError(f"unsupported host key type {key_type!r}; allowed: "
                                f"{', '.join(sorted(HOST_KEY_TYPES))}")
    try:
        blob = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HostKeyParseError(f"{key_type} key is not valid base64: {key_b64[:24]}...") \
            from exc
    # The SSH wire format starts with the key type as a length-prefixed string.
    if len(blob) < 4:
        raise HostKeyParseError(f"{key_type} key blob is too short")
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4:4 + length] != key_type.encode():
        raise HostKeyParseError(f"{key_type} key blob names a different type "
                                f"({blob[4:4 + min(length, 40)]!r})")
    key = HostKey(key_type, key_b64)
    try:
        key.to_pkey()
    except Exception as exc:  # paramiko raises several types for bad key material
        raise HostKeyParseError(f"{key_type} key could not be loaded: {exc}") from exc
    return key


def parse_console_host_keys(console_output: str) -> tuple[HostKey, ...]:
    """The host keys from the last complete BEGIN/END block of ``console_output``.

    Console lines may carry a prefix (``ec2: `` on some images, kernel timestamps); the
    text before the BEGIN marker is taken as that prefix and stripped from each line.
    """
    lines = console_output.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    blocks: list[list[str]] = []
    current: list[str] | None = None
    prefix = ""
    for line in lines:
        if BEGIN_MARKER in line:
            prefix = line[:line.index(BEGIN_MARKER)]
            current = []
        elif END_MARKER in line and current is not None:
            blocks.append(current)
            current = None
        elif current is not None:
            body = line[len(prefix):] if prefix and line.startswith(prefix) else line
            if body.strip():
                current.append(body.strip())
    if not blocks:
        raise HostKeysNotFound("no complete '-----BEGIN SSH HOST KEY KEYS-----' block in the "
                               "console output yet")
    block = blocks[-1]  # after a reboot the latest keys are the ones sshd uses
    if not block:
        raise HostKeyParseError("the SSH host key block in the console output is empty")
    return tuple(parse_host_key_line(line) for line in block)


# ----------------------------------------------------------------------- connecting

class _RefuseUnknownHostKey(paramiko.RejectPolicy):
    """RejectPolicy that raises our typed error instead of a bare SSHException."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        raise HostKeyMismatch(hostname, key.get_name(), key.fingerprint)


@dataclass(frozen=True)
class SshTarget:
    host: str
    username: str
    key_file: Path
    host_keys: tuple[HostKey, ...]
    port: int = 22


def _known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


# Errors that mean "sshd is not ready yet": retried until the deadline.
_RETRYABLE = (OSError, EOFError, paramiko.SSHException)


def connect(target: SshTarget, *, deadline: float, clock: Callable[[], float] = time.monotonic,
            sleep: Callable[[float], None] = time.sleep,
            auth_attempts: int = 3) -> paramiko.SSHClient:
    """Connect, accepting only ``target.host_keys``; retry transient errors until
    ``deadline`` (a ``clock()`` value) with exponential backoff."""
    if not target.host_keys:
        raise HostKeyParseError("no host keys given; refusing to connect without them")
    pkey = paramiko.PKey.from_path(str(target.key_file))
    delays = doubling_delays(0.25, 5.0)
    attempt = 0
    auth_failures = 0
    while True:
        attempt += 1
        remaining = deadline - clock()
        if remaining <= 0:
            raise BootstrapTimeout(f"could not connect to {target.host}:{target.port} "
                                   f"before the deadline ({attempt - 1} attempts)")
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_RefuseUnknownHostKey())
        name = _known_hosts_name(target.host, target.port)
        for key in target.host_keys:
            client.get_host_keys().add(name, key.key_type, key.to_pkey())
        per_try = max(1.0, min(15.0, remaining))
        try:
            client.connect(
                target.host, port=target.port, username=target.username, pkey=pkey,
                timeout=per_try, banner_timeout=per_try, auth_timeout=per_try,
                look_for_keys=False, allow_agent=False,
            )
            log.info("connected to %s:%s after %d attempt(s)", target.host, target.port,
                     attempt)
            return client
        except HostKeyMismatch:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatch(target.host, exc.key.get_name(),
                                  exc.key.fingerprint) from exc
        except paramiko.AuthenticationException:
            client.close()
            # cloud-init may not have installed the authorized key yet; a few tries only,
            # so a wrong key fails fast.
            auth_failures += 1
            if auth_failures >= auth_attempts:
                raise
        except _RETRYABLE as exc:
            client.close()
            log.debug("ssh %s:%s not ready (%s: %s)", target.host, target.port,
                      type(exc).__name__, exc)
        wait = min(next(delays), max(0.0, deadline - clock()))
        if wait > 0:
            sleep(wait)


# ------------------------------------------------------------------------- commands

@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str


class _Tail:
    """Keeps the last ``limit`` bytes: everything is read, only the end is kept."""

    def __init__(self, limit: int = OUTPUT_TAIL_BYTES) -> None:
        self.limit = limit
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > self.limit:
            del self.data[:len(self.data) - self.limit]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def run_command(client: paramiko.SSHClient, command: str, *, deadline: float,
                clock: Callable[[], float] = time.monotonic) -> CommandResult:
    """Run ``command``, draining stdout and stderr as data arrives, then the exit status.

    Reading both streams in one loop (woken by the channel's file descriptor) keeps
    either window from filling up and stalling the remote process — the deadlock
    paramiko's docs warn about when stdout is read to the end before stderr.
    """
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise BootstrapError("ssh connection is closed")
    channel = transport.open_session()
    try:
        channel.exec_command(command)
        channel.setblocking(False)
        out, err = _Tail(), _Tail()
        while True:
            drained = False
            while channel.recv_ready():
                out.add(channel.recv(32768))
                drained = True
            while channel.recv_stderr_ready():
                err.add(channel.recv_stderr(32768))
                drained = True
            if (channel.exit_status_ready() and not channel.recv_ready()
                    and not channel.recv_stderr_ready()):
                break
            if channel.closed and not drained:
                break
            remaining = deadline - clock()
            if remaining <= 0:
                raise BootstrapTimeout(f"command did not finish before the deadline: "
                                       f"{command[:80]}")
            select.select([channel], [], [], min(remaining, 1.0))
        channel.setblocking(True)
        exit_code = channel.recv_exit_status()
    finally:
        channel.close()
    return CommandResult(exit_code, out.text(), err.text())


def check_command(client: paramiko.SSHClient, command: str, *, deadline: float,
                  clock: Callable[[], float] = time.monotonic) -> CommandResult:
    result = run_command(client, command, deadline=deadline, clock=clock)
    if result.exit_code != 0:
        raise BootstrapFailed(result.exit_code, result.stderr[-4000:], command)
    return result


# --------------------------------------------------------------------------- bundle

def _requirement_name(line: str) -> str:
    return re.split(r"[\s\[<>=!~;]", line.strip(), maxsplit=1)[0].lower()


def requirements_for(packages: Iterable[str], root: Path = PROJECT_ROOT) -> str:
    """The lines of requirements.txt naming ``packages`` (one source of versions)."""
    wanted = set(packages)
    lines = [line.strip()
             for line in (root / "requirements.txt").read_text(encoding="utf-8").splitlines()
             if _requirement_name(line) in wanted]
    missing = wanted - {_requirement_name(x) for x in lines}
    if missing:
        raise BootstrapError(f"requirements.txt lacks packages: {sorted(missing)}")
    return "\n".join(lines) + "\n"


def server_requirements(root: Path = PROJECT_ROOT) -> str:
    """The lines of requirements.txt the server needs (so workers skip GUI/test deps)."""
    own = root / "server" / "requirements.txt"
    if own.exists():
        return own.read_text(encoding="utf-8")
    return requirements_for(SERVER_PACKAGES, root)


def _tarball(files: Iterable[tuple[str, bytes, int]]) -> bytes:
    """A reproducible tar.gz (fixed mtime, sorted by the caller) of (name, data, mode).
    The gzip header's own mtime is fixed too: ``tarfile``'s ``w:gz`` writes the current
    time there, so two builds a second apart differed."""
    buffer = io.BytesIO()
    with (gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
          tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar):
        for name, data, mode in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _script(root: Path, name: str) -> tuple[str, bytes, int]:
    return (f"scripts/{name}", (root / "scripts" / name).read_bytes(), 0o755)


def _wheel_entry(root: Path) -> tuple[str, bytes, int]:
    name, data = project_wheel(root)
    return (name, data, 0o644)


def build_bundle(root: Path = PROJECT_ROOT) -> bytes:
    """A reproducible tar.gz of the project's wheel (``remote_setup.sh`` installs it), the
    server's requirements, ``remote_setup.sh`` and the ``setup_common.sh`` it sources.

    On a manager host ``root`` is its installed code, which keeps the wheel it was set up
    with: that wheel goes into the workers' bundles as is (no sources or setuptools
    there); elsewhere the wheel is built from the sources under ``root``."""
    return _tarball(sorted([
        _wheel_entry(root),
        ("requirements.txt", server_requirements(root).encode(), 0o644),
        _script(root, "remote_setup.sh"), _script(root, "setup_common.sh")]))


def build_manager_bundle(root: Path = PROJECT_ROOT) -> bytes:
    """The manager host's bundle: the project's wheel (``fleet/`` and ``server/``, and the
    ``remote_setup.sh`` it bootstraps workers with), the manager's requirements
    (``manager-requirements.txt``), ``requirements.txt`` (workers' requirements come from
    it) and ``scripts/manager_setup.sh`` with the ``setup_common.sh`` it sources.
    ``manager_setup.sh`` keeps the wheel with the installed code, because the manager
    builds the workers' bundles (:func:`build_bundle`) from it."""
    return _tarball(sorted([
        _wheel_entry(root),
        ("manager-requirements.txt", requirements_for(MANAGER_PACKAGES, root).encode(), 0o644),
        ("requirements.txt", (root / "requirements.txt").read_bytes(), 0o644),
        _script(root, "manager_setup.sh"),
        _script(root, "setup_common.sh"),
    ]))


# ------------------------------------------------------------------------ bootstrap

@dataclass(frozen=True)
class BootstrapResult:
    host: str
    exit_code: int
    duration_s: float
    connect_s: float
    remote_dir: str
    stdout_tail: str
    stderr_tail: str
    host_key_fingerprint: str
    steps: tuple[str, ...] = field(default=())


def setup_command(remote_dir: str, setup_args: Sequence[str], *, sudo: bool) -> str:
    quoted = " ".join(shlex.quote(a) for a in setup_args)
    run = f"{'sudo -n ' if sudo else ''}bash scripts/remote_setup.sh --source . {quoted}"
    return f"set -e; cd {shlex.quote(remote_dir)}; tar -xzf bundle.tar.gz; {run}"


def bootstrap_over_ssh(target: SshTarget, *, setup_args: Sequence[str], timeout_s: float,
                       sudo: bool = True, bundle: bytes | None = None,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> BootstrapResult:
    """Connect (host key checked), upload the bundle, run ``remote_setup.sh SETUP_ARGS``.

    ``timeout_s`` bounds the whole thing, connection retries included.
    """
    started = clock()
    deadline = started + timeout_s
    bundle = build_bundle() if bundle is None else bundle
    client = connect(target, deadline=deadline, clock=clock, sleep=sleep)
    try:
        connected = clock()
        fingerprint = client.get_transport().get_remote_server_key().fingerprint
        remote_dir = check_command(client, "mktemp -d /tmp/imagefleet-bootstrap.XXXXXX",
                                   deadline=deadline, clock=clock).stdout.strip()
        if not remote_dir.startswith("/tmp/imagefleet-bootstrap."):
            raise BootstrapError(f"unexpected remote temp dir {remote_dir!r}")
        with client.open_sftp() as sftp:
            sftp.get_channel().settimeout(max(1.0, deadline - clock()))
            sftp.putfo(io.BytesIO(bundle), f"{remote_dir}/bundle.tar.gz",
                       file_size=len(bundle), confirm=True)
        try:
            result = check_command(client, setup_command(remote_dir, setup_args, sudo=sudo),
                                   deadline=deadline, clock=clock)
        finally:
            _remove_remote_dir(client, remote_dir)
    except TimeoutError as exc:
        raise BootstrapTimeout(f"bootstrap of {target.host} timed out: {exc}") from exc
    finally:
        client.close()
    return BootstrapResult(
        host=target.host, exit_code=result.exit_code, duration_s=clock() - started,
        connect_s=connected - started, remote_dir=remote_dir,
        stdout_tail=result.stdout[-4000:], stderr_tail=result.stderr[-4000:],
        host_key_fingerprint=fingerprint,
        steps=("connect", "upload", "setup"),
    )


def _remove_remote_dir(client: paramiko.SSHClient, remote_dir: str) -> None:
    """Best effort: the set-up copied what it needs out of the bundle directory."""
    try:
        run_command(client, f"rm -rf {shlex.quote(remote_dir)}",
                    deadline=time.monotonic() + 15)
    except (BootstrapError, paramiko.SSHException, OSError) as exc:
        log.warning("could not remove %s on the instance: %s", remote_dir, exc)


def remote_setup_args(*, storage: str, region: str, port: int = 8080,
                      instance_id: str | None = None, token_parameter: str | None = None,
                      extra: Iterable[str] = ()) -> list[str]:
    """Arguments for ``remote_setup.sh`` in its systemd (production) mode.
    ``token_parameter``: the SSM parameter's name; the worker reads the value itself."""
    args = ["--storage", storage, "--region", region, "--port", str(port),
            "--host", "0.0.0.0"]  # workers listen for the ALB; the security group limits it
    if instance_id:
        args += ["--instance-id", instance_id]
    if token_parameter:
        args += ["--token-ssm-parameter", token_parameter]
    return [*args, *extra]


# ------------------------------------------------------------------------ user data

def render_user_data(*, bundle_url: str, storage: str, region: str, port: int = 8080,
                     token_parameter: str | None = None) -> str:
    """A cloud-init user-data script doing the same set-up without SSH.

    ``bundle_url`` is an ``s3://`` location of :func:`build_bundle`'s output (upload it
    once per release); the instance role may read the fleet bucket, so the AWS CLI
    fetches it. Use with ``bootstrap: "user-data"`` in the fleet config, or bake the
    result into an AMI so instances need neither SSH nor a package download at boot.
    """
    if not bundle_url.startswith("s3://"):
        raise ValueError(f"bundle_url must be an s3:// URL (got {bundle_url!r})")
    setup = " ".join(shlex.quote(a) for a in remote_setup_args(
        storage=storage, region=region, port=port, token_parameter=token_parameter))
    return "\n".join([
        "#!/bin/bash",
        "# ImageFleet worker set-up (cloud-init user data); same steps as the SSH bootstrap.",
        "set -euo pipefail",
        "exec > >(tee -a /var/log/imagefleet-setup.log) 2>&1",
        "workdir=$(mktemp -d /tmp/imagefleet-bootstrap.XXXXXX)",
        'cd "$workdir"',
        "command -v aws >/dev/null || { apt-get update -q && apt-get install -y -q awscli; }",
        f"aws --region {shlex.quote(region)} s3 cp {shlex.quote(bundle_url)} bundle.tar.gz",
        "tar -xzf bundle.tar.gz",
        f"bash scripts/remote_setup.sh --source . {setup}",
        "",
    ])


def wait_for_host_keys(fetch_console: Callable[[], str], *, deadline: float,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> tuple[HostKey, ...]:
    """Poll ``fetch_console`` (e.g. EC2 GetConsoleOutput) until the key block appears."""
    delays = doubling_delays(1.0, 10.0)
    while True:
        try:
            return parse_console_host_keys(fetch_console())
        except HostKeysNotFound:
            remaining = deadline - clock()
            if remaining <= 0:
                raise BootstrapTimeout("the instance did not publish its SSH host keys on "
                                       "the console before the deadline") from None
        sleep(min(next(delays), remaining))
