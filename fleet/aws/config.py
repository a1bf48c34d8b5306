"""The AWS fleet config file: one JSON document written by ``scripts/bootstrap_aws.py up``
and read by ``python -m fleet run --config FILE``.

It holds the ids of everything ``up`` created (so the manager never has to search for
them) plus the fleet's tunables (size, grace period, bootstrap timeout, lease TTL). The
file is validated as a whole when loaded: every problem names the field and what is
allowed, so a hand edit gone wrong fails at start-up rather than mid-reconcile.

``AwsFleetConfig`` is a frozen pydantic dataclass with strict field types (JSON's ``1``
is not ``true``); pydantic's errors become ``ConfigError`` with one line per field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from annotated_types import Ge, Le, MinLen
from pydantic import (
    AfterValidator,
    BeforeValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass

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


def _fleet_name(name: str) -> str:
    try:
        return validate_fleet_name(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _parameter_path(value: str | None) -> str | None:
    if value is not None and not _PARAMETER.match(value):
        raise ValueError("'admin_token_parameter' must be an SSM parameter path like "
                         f"/imagefleet/NAME/admin-token (got {value!r})")
    return value


def _absolute(value: str | None) -> str | None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"'state_dir' must be an absolute path (got {value!r})")
    return value


def _http_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(f"'api_url' must start with https:// or http:// (got {value!r})")
    return value


# Field types: strict (a JSON string is not a number, 1 is not true); the ranges are what a
# hand edit may set.
Text = Annotated[StrictStr, MinLen(1)]
Texts = Annotated[tuple[Text, ...], MinLen(1)]
OptionalText = Text | None


def _int(lo: int, hi: int) -> Any:
    return Annotated[StrictInt, Ge(lo), Le(hi)]


def _number(lo: float, hi: float) -> Any:
    return Annotated[StrictFloat, Ge(lo), Le(hi)]


def resource_prefix(name: str) -> str:
    """Prefix for the names of AWS resources that need a name (ALB, target group, IAM)."""
    return f"imgf-{validate_fleet_name(name)}"


@dataclass(frozen=True, config={"extra": "forbid"})
class AwsFleetConfig:
    # Identity and where to reach AWS.
    name: Annotated[Text, AfterValidator(_fleet_name)]
    region: Text
    # What ``up`` created.
    vpc_id: Text
    subnets: Texts
    bucket: Text
    alb_security_group: Text
    worker_security_group: Text
    key_name: Text
    key_file: Text
    role_name: Text
    instance_profile_name: Text
    instance_profile_arn: Text
    target_group_arn: Text
    load_balancer_arn: Text
    load_balancer_dns: Text
    listener_arn: Text  # the one forwarding to the target group (HTTPS unless insecure_http)
    # What to launch.
    ami: Text
    instance_types: Texts
    ssh_user: str = "admin"
    app_port: _int(1, 65535) = APP_PORT
    results_prefix: str = "results"
    result_days: _int(1, 3650) = 7
    endpoint_url: str | None = None
    profile: str | None = None
    # How clients reach the fleet: the URL, the API token's SSM parameter (the value is
    # never in this file), the ACM certificate, and for a self-signed one its PEM, which
    # clients pin.
    api_url: Annotated[OptionalText, AfterValidator(_http_url)] = None
    token_parameter: OptionalText = None
    certificate_arn: OptionalText = None
    ca_pem: OptionalText = None
    insecure_http: StrictBool = False
    # How the manager runs the fleet.
    desired: _int(0, 1000) = 2
    min: _int(0, 1000) = 1
    max: _int(1, 1000) = 4
    bootstrap: Literal["ssh", "user-data"] = "ssh"
    bootstrap_timeout_s: _number(10, 3600) = 420.0
    grace_period_s: _number(0, 7200) = 480.0
    observe_interval_s: _number(0.1, 300) = 2.0
    # Poll each worker's /health on its private address for its load and completed work
    # (fleet/aws/load_probe.py): needs a manager that reaches the workers (inside the VPC).
    # Without it scaling on load is off and progress is the ALB's verdict only.
    poll_worker_load: StrictBool = False
    # Publish the rolling window to CloudWatch (fleet/aws/cloudwatch.py: namespace
    # ImageFleet, dimension Fleet=name) for AWS alarms. Off unless set: the manager in the
    # cloud sets it; a development manager on a laptop would publish a second, rival
    # series under the same dimension (and bill it).
    cloudwatch_metrics: StrictBool = False
    lease_key: str = "fleet/lease.json"
    lease_ttl_s: _number(1, 3600) = 30.0
    admin_host: str = "127.0.0.1"
    admin_port: _int(0, 65535) = 8001
    # The manager in the cloud (fleet/aws/manager_host.py). The admin token's SSM SecureString
    # (only its name here; the manager reads the value with its instance role); required
    # with IMAGEFLEET_ADMIN_TOKEN as the alternative when admin_host is not loopback.
    admin_token_parameter: Annotated[OptionalText, AfterValidator(_parameter_path)] = None
    # Serve the admin API over HTTPS with a self-signed certificate made in memory at
    # start (fleet/tls.py): the ALB's hop to the manager is encrypted too.
    admin_tls: StrictBool = False
    # The manager makes the workers' SSH key pair itself (in state_dir) and imports the
    # public half under key_name, so the private key never leaves the manager's machine.
    manage_ssh_key: StrictBool = False
    # Where the manager keeps its state (the SSH key), mode 0700; systemd's StateDirectory.
    state_dir: Annotated[OptionalText, AfterValidator(_absolute)] = None
    # The manager instance's security group: the only source the workers accept SSH from.
    manager_security_group: OptionalText = None
    version: StrictInt = CONFIG_VERSION
    extra_tags: Annotated[dict[str, str], BeforeValidator(lambda v: v or {})] = field(
        default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> AwsFleetConfig:
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def storage_url(self) -> str:
        return f"s3://{self.bucket}/{self.results_prefix}"

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["subnets"] = list(self.subnets)
        data["instance_types"] = list(self.instance_types)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def config_problems(config: AwsFleetConfig) -> list[str]:
    """What is wrong across fields (each field's own type and range already checked)."""
    problems = []
    if config.manage_ssh_key and not config.state_dir:
        problems.append("'manage_ssh_key' needs 'state_dir': the folder where the manager "
                        "keeps the key it makes")
    if not config.min <= config.desired <= config.max:
        problems.append(f"need min <= desired <= max (got {config.min}, {config.desired}, "
                        f"{config.max})")
    if config.grace_period_s < config.bootstrap_timeout_s:
        problems.append("'grace_period_s' must be at least 'bootstrap_timeout_s', so a "
                        "bootstrapping instance is never replaced for being 'initial'")
    if config.version != CONFIG_VERSION:
        problems.append(f"'version' must be {CONFIG_VERSION} (got {config.version!r})")
    return problems


def _field_kinds() -> dict[str, Callable[[str, Any], str]]:
    """For each field, what it must be: the message of any pydantic error about it."""
    def text(key: str, got: Any) -> str:
        return f"{key!r} must be a non-empty string (got {got!r})"

    def texts(key: str, got: Any) -> str:
        return f"{key!r} must be a non-empty list of strings (got {got!r})"

    def optional(key: str, got: Any) -> str:
        return f"{key!r} must be a non-empty string or null (got {got!r})"

    def boolean(key: str, got: Any) -> str:
        return f"{key!r} must be true or false (got {got!r})"

    def ranged(kind: str, lo: float, hi: float) -> Callable[[str, Any], str]:
        return lambda key, got: f"{key!r} must be {kind} in {lo}..{hi} (got {got!r})"

    kinds: dict[str, Callable[[str, Any], str]] = {
        "subnets": texts, "instance_types": texts,
        "bootstrap": lambda key, got: f"'bootstrap' must be one of {_BOOTSTRAP_MODES} "
                                      f"(got {got!r})",
        "version": lambda key, got: f"'version' must be {CONFIG_VERSION} (got {got!r})",
    }
    for key, (lo, hi) in {"desired": (0, 1000), "min": (0, 1000), "max": (1, 1000),
                          "app_port": (1, 65535), "admin_port": (0, 65535),
                          "result_days": (1, 3650)}.items():
        kinds[key] = ranged("an integer", lo, hi)
    for key, (lo, hi) in {"bootstrap_timeout_s": (10, 3600), "grace_period_s": (0, 7200),
                          "observe_interval_s": (0.1, 300), "lease_ttl_s": (1, 3600)}.items():
        kinds[key] = ranged("a number", lo, hi)
    for key in ("api_url", "token_parameter", "certificate_arn", "ca_pem",
                "admin_token_parameter", "state_dir", "manager_security_group"):
        kinds[key] = optional
    for key in ("poll_worker_load", "insecure_http", "admin_tls", "manage_ssh_key",
                "cloudwatch_metrics"):
        kinds[key] = boolean
    for f in dataclasses.fields(AwsFleetConfig):
        kinds.setdefault(f.name, text)
    return kinds


def config_error_lines(exc: ValidationError, data: dict[str, Any]) -> list[str]:
    """One line per field: the validators' own messages, else what the field must be."""
    kinds = _field_kinds()
    problems: list[str] = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "value_error":
            message = error["msg"].removeprefix("Value error, ")
        elif error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            message = f"unknown field {key!r}"
        elif key in kinds:
            message = kinds[key](key, data.get(key))
        else:
            message = f"{key}: {error['msg']}"
        if message not in problems:  # a tuple's bad items are one problem with the field
            problems.append(message)
    return problems


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> AwsFleetConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    try:
        return AwsFleetConfig(**data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(config_error_lines(exc, data))) from None


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
