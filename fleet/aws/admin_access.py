"""Who may use the AWS manager's admin API, and over what: the token and the TLS
context of ``python -m fleet run``.

On loopback (a laptop in development) the admin API behaves as it always has: a token
only if ``IMAGEFLEET_ADMIN_TOKEN`` is set, ``GET /fleet`` readable on loopback. Off
loopback (the manager in the cloud, behind the load balancer's ``/fleet`` rule) the
manager refuses to start without a token, and every admin route requires it. The token
comes from ``IMAGEFLEET_ADMIN_TOKEN`` or the SSM SecureString ``admin_token_parameter``,
read with the instance role at start (a failure fails the start: the API never runs
open because SSM was unreachable) and re-read every minute, so a rotation needs no
restart (:mod:`server.tokens`, the workers' token code).

With ``admin_tls`` the API serves HTTPS with a self-signed certificate made at start
(:mod:`fleet.tls`). Its private key lives only in this process: Python's ``ssl`` loads
keys from files only, so it goes through an anonymous in-memory file (``memfd``), never
the disk. The public certificate is written to ``state_dir/admin-cert.pem`` for local
checks that want to pin it (the set-up script's readiness check).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.aws.config import (
    AwsFleetConfig,
    ConfigError,
    ensure_private_dir,
    write_private_file,
)
from server.tokens import (
    RefreshingTokens,
    StaticTokens,
    TokenGate,
    TokenSourceError,
    parse_token_list,
)

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "IMAGEFLEET_ADMIN_TOKEN"
TOKEN_REFRESH_S = 60.0
ADMIN_CERT_FILE = "admin-cert.pem"


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AdminAccessPlan:
    """What the admin API needs, decided from the config and the environment alone."""

    token_from_env: str | None
    token_parameter: str | None
    loopback_reads_open: bool
    tls: bool


def plan_admin_access(config: AwsFleetConfig, environ: Mapping[str, str]) -> AdminAccessPlan:
    """Pure: raises :class:`ConfigError` for an admin API off loopback with no token."""
    env_token = environ.get(ADMIN_TOKEN_ENV) or None
    local = is_loopback_host(config.admin_host)
    if not local and env_token is None and config.admin_token_parameter is None:
        raise ConfigError(
            f"admin_host {config.admin_host!r} is not a loopback address, so the admin API "
            "needs a token: set 'admin_token_parameter' (an SSM SecureString) in the config "
            f"or {ADMIN_TOKEN_ENV} in the environment, or use admin_host 127.0.0.1")
    return AdminAccessPlan(
        token_from_env=env_token,
        # The environment wins, as for the workers' IMAGEFLEET_TOKEN: a developer can
        # override the parameter on a laptop.
        token_parameter=None if env_token else config.admin_token_parameter,
        loopback_reads_open=local,
        tls=config.admin_tls,
    )


def ssm_client(config: AwsFleetConfig) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.Session(profile_name=config.profile, region_name=config.region)
    return session.client("ssm", endpoint_url=config.endpoint_url, config=Config(
        retries={"mode": "standard", "max_attempts": 3}, connect_timeout=3, read_timeout=5))


def open_admin_gate(plan: AdminAccessPlan, config: AwsFleetConfig, *,
                    ssm: Any = None, refresh_s: float = TOKEN_REFRESH_S) -> TokenGate | None:
    """The token gate the plan asks for (None: no token). Reads SSM now; raises
    :class:`TokenSourceError` when it cannot."""
    if plan.token_from_env is not None:
        return TokenGate(StaticTokens(parse_token_list(plan.token_from_env, ADMIN_TOKEN_ENV)))
    if plan.token_parameter is None:
        return None
    name = plan.token_parameter
    client = ssm if ssm is not None else ssm_client(config)

    def read() -> str:
        try:
            return client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        except Exception as exc:  # botocore's tree: credentials, access, not found, network
            raise TokenSourceError(f"SSM parameter {name}: {exc}") from exc

    return TokenGate(RefreshingTokens(read, f"SSM parameter {name}", refresh_s))


# --------------------------------------------------------------------------------- TLS

def certificate_names(host: str) -> tuple[str, ...]:
    """Names for the admin certificate: this machine and its loopback. The load balancer
    does not verify its targets' certificates; a local check pins it on 127.0.0.1."""
    names = [socket.gethostname() or "imagefleet-manager", "localhost", "127.0.0.1"]
    if host not in ("0.0.0.0", "::", "") and host not in names:
        names.append(host)
    return tuple(dict.fromkeys(names))


@contextlib.contextmanager
def _key_file(pem: str) -> Iterator[str]:
    """A path to ``pem`` that exists only in memory (Linux memfd), or failing that a
    0600 file in a private temporary folder removed at once."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("imagefleet-admin-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="imagefleet-admin-") as folder:
        path = Path(folder) / "key.pem"
        write_private_file(path, pem)
        yield str(path)


def server_tls_context(certificate_pem: str, private_key_pem: str) -> ssl.SSLContext:
    """TLS 1.2+ server context for a certificate and key given as PEM text."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with _key_file(certificate_pem + private_key_pem) as path:
        context.load_cert_chain(path)
    return context


def admin_tls_context(config: AwsFleetConfig) -> tuple[ssl.SSLContext, str]:
    """A fresh self-signed certificate for the admin API: the context and its PEM.
    Written (the public half only) to ``state_dir`` when there is one."""
    from fleet.tls import self_signed_certificate

    made = self_signed_certificate(certificate_names(config.admin_host))
    if config.state_dir:
        folder = ensure_private_dir(config.state_dir)
        write_private_file(folder / ADMIN_CERT_FILE, made.certificate_pem, mode=0o644)
    return server_tls_context(made.certificate_pem, made.private_key_pem), \
        made.certificate_pem
