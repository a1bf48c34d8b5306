"""User settings of the desktop app: a validated, frozen value kept as JSON.

The file lives in the user's config directory (``$XDG_CONFIG_HOME/imagefleet/settings.json``,
falling back to ``~/.config/imagefleet/settings.json``). Loading never raises for a bad
file: it answers defaults plus a message the app shows, because a broken settings file
must not stop the app from starting. No Tk import here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from gui.naming import ON_CONFLICT_CHOICES as ON_CONFLICT  # Save all when a name is taken
from gui.output_rules import DEFAULT_TEMPLATE, TemplateError, parse_template
from server.atomic import write_atomic
from server.limits import MAX_LINK_SECONDS

log = logging.getLogger(__name__)

APPEARANCES = ("system", "light", "dark")
LINK_TTL_MIN_S = 60
LINK_TTL_MAX_S = MAX_LINK_SECONDS  # the server never signs links for longer
CONCURRENCY_RANGE = (1, 32)
FLEET_SIZE_RANGE = (1, 8)
DEFAULT_LOCAL_PORT = 8765  # stable, so the local fleet's links last across launches
PORT_RANGE = (0, 65535)  # 0: any free port
STORAGE_MAX_MB_RANGE = (0, 1_000_000)  # 0: no size cap
STORAGE_MAX_AGE_DAYS_RANGE = (0, 3650)  # 0: no age cap


class SettingsError(ValueError):
    """One or more settings values are invalid; ``problems`` names each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """What the user can change in the Settings view.

    ``endpoint`` empty means "start an embedded local fleet of ``fleet_size`` workers".
    ``admin_endpoint`` is where ``/fleet`` is served when that is not the endpoint (a
    manager run on a laptop); an AWS fleet serves it at the endpoint itself, through the
    load balancer. ``admin_token`` is the fleet's admin token for ``/fleet`` (kept like
    the API token: in this 0600 file); empty: the API token is sent.
    ``ca_file`` is a PEM file holding the only certificate the endpoint is trusted with
    (the self-signed one ``bootstrap_aws up`` writes); empty: the system's certificates.
    """

    endpoint: str = ""
    token: str = ""
    link_ttl_s: int = 3600
    concurrency: int = 4
    appearance: str = "system"
    fleet_size: int = 2
    admin_endpoint: str = ""
    ca_file: str = ""
    admin_token: str = ""
    on_conflict: str = "unique"  # Save all: never overwrite unless the user chose it
    name_template: str = DEFAULT_TEMPLATE  # Save all's names (a recipe's outputs have theirs)
    # The embedded fleet: its gateway's port (0: any free one), where its results go (an
    # S3 bucket, credentials from the standard AWS chain, never kept here; empty: the
    # local storage folder), and the local folder's caps (0: none).
    local_port: int = DEFAULT_LOCAL_PORT
    s3_bucket: str = ""
    s3_region: str = ""
    s3_prefix: str = ""
    storage_max_mb: int = 500
    storage_max_age_days: int = 7

    @property
    def s3_location(self) -> str | None:
        """``s3://bucket[/prefix]`` for the embedded fleet, or None (the folder)."""
        if not self.s3_bucket:
            return None
        prefix = self.s3_prefix.strip("/")
        return f"s3://{self.s3_bucket}" + (f"/{prefix}" if prefix else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    path: Path
    warning: str | None = None  # shown in the UI when the file was unusable
    problems: list[str] = field(default_factory=list)


def settings_path(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "imagefleet" / "settings.json"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the embedded fleet keeps its storage (results survive a restart)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "imagefleet"


def validate_endpoint(value: str) -> str | None:
    """Problem with an endpoint URL, or None when it is usable (empty = embedded fleet)."""
    if not value:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return f"endpoint must be an http:// or https:// URL, got {value!r}"
    return None


def _int_in_range(name: str, raw: Any, low: int, high: int, problems: list[str]) -> int | None:
    if isinstance(raw, bool):
        problems.append(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
        return None
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        problems.append(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
        return None
    if not low <= value <= high:
        problems.append(f"{name} must be from {low} to {high}, got {value}")
        return None
    return value


def parse_settings(data: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Validate raw values (from JSON or from the form) into Settings.

    Unknown keys are rejected rather than ignored so a typo never silently loses a value.
    Raises SettingsError listing every problem at once.
    """
    start = base or Settings()
    known = set(Settings.__dataclass_fields__)
    problems = [
        f"unknown setting {key!r} (known: {', '.join(sorted(known))})"
        for key in data
        if key not in known
    ]
    values: dict[str, Any] = {}
    for name in ("endpoint", "admin_endpoint"):
        if name in data:
            url = str(data[name] or "").strip().rstrip("/")
            problem = validate_endpoint(url)
            if problem:
                problems.append(problem.replace("endpoint", name, 1))
            values[name] = url
    for name in ("token", "admin_token"):
        if name in data:
            value = str(data[name] or "").strip()
            if any(c.isspace() for c in value):
                problems.append(f"{name} may not contain spaces or line breaks")
            values[name] = value
    if "ca_file" in data:
        # Only the form of the value here (no I/O on the UI thread): the client reads the
        # file when it connects and names what is wrong with it.
        ca_file = str(data["ca_file"] or "").strip()
        if "\n" in ca_file or "\x00" in ca_file:
            problems.append("ca_file must be the path of a PEM file")
        values["ca_file"] = str(Path(ca_file).expanduser()) if ca_file else ""
    for name in ("s3_bucket", "s3_region", "s3_prefix"):
        if name in data:
            value = str(data[name] or "").strip()
            if name == "s3_bucket":
                value = value.removeprefix("s3://").strip("/")
                if value and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
                    problems.append("s3_bucket must be an S3 bucket name (3-63 lower-case "
                                    f"letters, digits, dots, hyphens), got {value!r}")
            elif name == "s3_region" and value and not re.fullmatch(r"[a-z0-9-]+", value):
                problems.append(f"s3_region must be a region name such as eu-west-1, "
                                f"got {value!r}")
            elif any(c.isspace() for c in value):
                problems.append(f"{name} may not contain spaces")
            values[name] = value
    if "appearance" in data:
        appearance = str(data["appearance"]).strip().lower()
        if appearance not in APPEARANCES:
            allowed = ", ".join(APPEARANCES)
            problems.append(f"appearance must be one of {allowed}, got {appearance!r}")
        values["appearance"] = appearance
    if "on_conflict" in data:
        policy = str(data["on_conflict"]).strip().lower()
        if policy not in ON_CONFLICT:
            problems.append(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, "
                            f"got {policy!r}")
        values["on_conflict"] = policy
    if "name_template" in data:
        template = str(data["name_template"] or "").strip()
        try:
            parse_template(template)
        except TemplateError as exc:
            problems.append(f"name_template: {exc}")
        values["name_template"] = template
    for name, (low, high) in {
        "link_ttl_s": (LINK_TTL_MIN_S, LINK_TTL_MAX_S),
        "concurrency": CONCURRENCY_RANGE,
        "fleet_size": FLEET_SIZE_RANGE,
        "local_port": PORT_RANGE,
        "storage_max_mb": STORAGE_MAX_MB_RANGE,
        "storage_max_age_days": STORAGE_MAX_AGE_DAYS_RANGE,
    }.items():
        if name in data:
            values[name] = _int_in_range(name, data[name], low, high, problems)
    if problems:
        raise SettingsError(problems)
    return replace(start, **values)


def load_settings(path: Path) -> LoadedSettings:
    """Read settings; a missing file gives defaults, a broken one defaults plus a warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return LoadedSettings(Settings(), path)
    except OSError as exc:
        return LoadedSettings(Settings(), path, f"Could not read {path}: {exc.strerror}. "
                              "Using default settings.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LoadedSettings(
            Settings(), path,
            f"Settings file {path} is not valid JSON (line {exc.lineno}: {exc.msg}). "
            "Using default settings; saving will replace it.",
        )
    if not isinstance(data, dict):
        return LoadedSettings(
            Settings(), path,
            f"Settings file {path} must hold a JSON object. Using default settings.",
        )
    try:
        return LoadedSettings(parse_settings(data), path)
    except SettingsError as exc:
        log.warning("invalid settings in %s: %s", path, exc)
        return LoadedSettings(
            Settings(), path,
            f"Settings file {path} has invalid values ({exc}). Using default settings.",
            exc.problems,
        )


def save_settings(settings: Settings, path: Path) -> None:
    """Write atomically (temp file then rename) so a crash never leaves half a file.

    The file may hold the API token, so it is readable by its owner only.
    """
    write_atomic(path, json.dumps(settings.to_json(), indent=2) + "\n")
