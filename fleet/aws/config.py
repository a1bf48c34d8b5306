"""The AWS fleet config file: one JSON document written by ``scripts/bootstrap_aws.py up``
and read by ``python -m fleet run --config FILE``.

It holds the ids of everything ``up`` created (so the manager never has to search for
them) plus the fleet's tunables (size, grace period, bootstrap timeout, lease TTL). The
file is validated as a whole when loaded: every problem names the field and what is
allowed, so a hand edit gone wrong fails at start-up rather than mid-reconcile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.atomic import write_atomic

FLEET_TAG_KEY = "imagefleet:fleet"
ROLE_TAG_KEY = "imagefleet:role"
CONFIG_VERSION = 1
APP_PORT = 8080

# Short enough that every derived name fits AWS limits: target group and load balancer
# names are capped at 32 characters ("imgf-" + 20 + "-alb" = 29).
_FLEET_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,18}[a-z0-9])?$")
_BOOTSTRAP_MODES = ("ssh", "user-data")
# SSM parameter names: a path of letters, digits and _.-/ (what AWS allows, minus spaces).
_PARAMETER = re.compile(r"^/[A-Za-z0-9_.\-/]{1,1010}$")


class ConfigError(ValueError):
    """The config file is missing, unreadable or has an invalid field."""


def validate_fleet_name(name: str) -> str:
    if not isinstance(name, str) or not _FLEET_NAME.match(name):
        raise ConfigError(
            f"invalid fleet name {name!r}: use 1-20 lowercase letters, digits or hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def resource_prefix(name: str) -> str:
    """Prefix for the names of AWS resources that need a name (ALB, target group, IAM)."""
    return f"imgf-{validate_fleet_name(name)}"


@dataclass(frozen=True)
class AwsFleetConfig:
    # Identity and where to reach AWS.
    name: str
    region: str
    # What ``up`` created.
    vpc_id: str
    subnets: tuple[str, ...]
    bucket: str
    alb_security_group: str
    worker_security_group: str
    key_name: str
    key_file: str
    role_name: str
    instance_profile_name: str
    instance_profile_arn: str
    target_group_arn: str
    load_balancer_arn: str
    load_balancer_dns: str
    listener_arn: str  # the one forwarding to the target group (HTTPS unless insecure_http)
    # What to launch.
    ami: str
    instance_types: tuple[str, ...]
    ssh_user: str = "admin"
    app_port: int = APP_PORT
    results_prefix: str = "results"
    result_days: int = 7
    endpoint_url: str | None = None
    profile: str | None = None
    # How clients reach the fleet: the URL, the API token's SSM parameter (the value is
    # never in this file), the ACM certificate, and for a self-signed one its PEM, which
    # clients pin.
    api_url: str | None = None
    token_parameter: str | None = None
    certificate_arn: str | None = None
    ca_pem: str | None = None
    insecure_http: bool = False
    # How the manager runs the fleet.
    desired: int = 2
    min: int = 1
    max: int = 4
    bootstrap: str = "ssh"
    bootstrap_timeout_s: float = 420.0
    grace_period_s: float = 480.0
    observe_interval_s: float = 2.0
    # Poll each worker's /health on its private address for its load and completed work
    # (fleet/aws/load_probe.py): needs a manager that reaches the workers (inside the VPC).
    # Without it scaling on load is off and progress is the ALB's verdict only.
    poll_worker_load: bool = False
    lease_key: str = "fleet/lease.json"
    lease_ttl_s: float = 30.0
    admin_host: str = "127.0.0.1"
    admin_port: int = 8001
    # The manager in the cloud (fleet/aws/manager_host.py). The admin token's SSM SecureString
    # (only its name here; the manager reads the value with its instance role); required
    # with IMAGEFLEET_ADMIN_TOKEN as the alternative when admin_host is not loopback.
    admin_token_parameter: str | None = None
    # Serve the admin API over HTTPS with a self-signed certificate made in memory at
    # start (fleet/tls.py): the ALB's hop to the manager is encrypted too.
    admin_tls: bool = False
    # The manager makes the workers' SSH key pair itself (in state_dir) and imports the
    # public half under key_name, so the private key never leaves the manager's machine.
    manage_ssh_key: bool = False
    # Where the manager keeps its state (the SSH key), mode 0700; systemd's StateDirectory.
    state_dir: str | None = None
    # The manager instance's security group: the only source the workers accept SSH from.
    manager_security_group: str | None = None
    version: int = CONFIG_VERSION
    extra_tags: dict[str, str] = field(default_factory=dict)

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/{self.results_prefix}"

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["subnets"] = list(self.subnets)
        data["instance_types"] = list(self.instance_types)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


_REQUIRED_STRINGS = (
    "name", "region", "vpc_id", "bucket", "alb_security_group", "worker_security_group",
    "key_name", "key_file", "role_name", "instance_profile_name", "instance_profile_arn",
    "target_group_arn", "load_balancer_arn", "load_balancer_dns", "listener_arn", "ami",
)


def _problems(data: dict[str, Any]) -> list[str]:
    fields = {f.name for f in dataclasses.fields(AwsFleetConfig)}
    problems = [f"unknown field {k!r}" for k in sorted(set(data) - fields)]
    for key in _REQUIRED_STRINGS:
        value = data.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{key!r} must be a non-empty string (got {value!r})")
    for key in ("subnets", "instance_types"):
        value = data.get(key)
        if (
            not isinstance(value, list | tuple)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            problems.append(f"{key!r} must be a non-empty list of strings (got {value!r})")
    if "name" in data:
        try:
            validate_fleet_name(data["name"])
        except ConfigError as exc:
            problems.append(str(exc))
    ints = {"desired": (0, 1000), "min": (0, 1000), "max": (1, 1000),
            "app_port": (1, 65535), "admin_port": (0, 65535), "result_days": (1, 3650)}
    for key, (lo, hi) in ints.items():
        if key in data and (
            not isinstance(data[key], int) or isinstance(data[key], bool)
            or not lo <= data[key] <= hi
        ):
            problems.append(f"{key!r} must be an integer in {lo}..{hi} (got {data[key]!r})")
    floats = {"bootstrap_timeout_s": (10, 3600), "grace_period_s": (0, 7200),
              "observe_interval_s": (0.1, 300), "lease_ttl_s": (1, 3600)}
    for key, (lo, hi) in floats.items():
        if key in data and (
            not isinstance(data[key], int | float) or isinstance(data[key], bool)
            or not lo <= data[key] <= hi
        ):
            problems.append(f"{key!r} must be a number in {lo}..{hi} (got {data[key]!r})")
    for key in ("api_url", "token_parameter", "certificate_arn", "ca_pem",
                "admin_token_parameter", "state_dir", "manager_security_group"):
        if data.get(key) is not None and (not isinstance(data[key], str) or not data[key]):
            problems.append(f"{key!r} must be a non-empty string or null (got {data[key]!r})")
    for key in ("poll_worker_load", "insecure_http", "admin_tls", "manage_ssh_key"):
        if key in data and not isinstance(data[key], bool):
            problems.append(f"{key!r} must be true or false (got {data[key]!r})")
    parameter = data.get("admin_token_parameter")
    if isinstance(parameter, str) and parameter and not _PARAMETER.match(parameter):
        problems.append("'admin_token_parameter' must be an SSM parameter path like "
                        f"/imagefleet/NAME/admin-token (got {parameter!r})")
    state_dir = data.get("state_dir")
    if isinstance(state_dir, str) and state_dir and not state_dir.startswith("/"):
        problems.append(f"'state_dir' must be an absolute path (got {state_dir!r})")
    if data.get("manage_ssh_key") is True and not data.get("state_dir"):
        problems.append("'manage_ssh_key' needs 'state_dir': the folder where the manager "
                        "keeps the key it makes")
    if data.get("api_url") and not str(data["api_url"]).startswith(("http://", "https://")):
        problems.append(f"'api_url' must start with https:// or http:// (got {data['api_url']!r})")
    if "bootstrap" in data and data["bootstrap"] not in _BOOTSTRAP_MODES:
        problems.append(
            f"'bootstrap' must be one of {_BOOTSTRAP_MODES} (got {data['bootstrap']!r})")
    if not problems:
        lo, want, hi = data.get("min", 1), data.get("desired", 2), data.get("max", 4)
        if not lo <= want <= hi:
            problems.append(f"need min <= desired <= max (got {lo}, {want}, {hi})")
        if data.get("grace_period_s", 480.0) < data.get("bootstrap_timeout_s", 420.0):
            problems.append("'grace_period_s' must be at least 'bootstrap_timeout_s', so a "
                            "bootstrapping instance is never replaced for being 'initial'")
    if data.get("version", CONFIG_VERSION) != CONFIG_VERSION:
        problems.append(f"'version' must be {CONFIG_VERSION} (got {data.get('version')!r})")
    return problems


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> AwsFleetConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    problems = _problems(data)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    values = dict(data)
    values["subnets"] = tuple(values["subnets"])
    values["instance_types"] = tuple(values["instance_types"])
    values["extra_tags"] = dict(values.get("extra_tags") or {})
    return AwsFleetConfig(**values)


def load_config(path: str | os.PathLike[str]) -> AwsFleetConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read fleet config {path}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    return config_from_dict(data, source=str(path))


def write_private_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` atomically (temp file + rename) with ``mode`` from the first byte."""
    write_atomic(path, text, mode)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder only its owner can enter (created 0700, tightened if wider):
    the manager's ``state_dir``."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def save_config(config: AwsFleetConfig, path: str | os.PathLike[str]) -> None:
    # Not secret, but 0600 anyway: it names the key file and the account's resources.
    write_private_file(Path(path), config.to_json())
