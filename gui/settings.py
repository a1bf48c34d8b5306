"""User settings of the desktop app: a validated, frozen value kept as JSON.

The file lives in the user's config folder: ``$XDG_CONFIG_HOME/imagefleet/settings.json``
when that variable is set (tests and the app point it at a folder of their own), else
platformdirs' ``user_config_dir`` (``~/.config/imagefleet`` on Linux). Loading never
raises for a bad file: it answers defaults plus a message the app shows, because a broken
settings file must not stop the app from starting. No Tk import here.

``Settings`` is a pydantic dataclass: each field's validator normalises form text and
says what is allowed; ``parse_settings`` turns pydantic's errors into ``SettingsError``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError, field_validator
from pydantic.dataclasses import dataclass as validated_dataclass

from gui.journal import DEFAULT_HISTORY_DAYS, HISTORY_DAYS_RANGE
from gui.naming import ON_CONFLICT_CHOICES as ON_CONFLICT  # Save all when a name is taken
from gui.output_rules import DEFAULT_TEMPLATE, TemplateError, parse_template
from server.atomic import write_atomic
from server.limits import MAX_LINK_SECONDS
from server.settings import layered, problem_line

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


INT_RANGES = {
    "link_ttl_s": (LINK_TTL_MIN_S, LINK_TTL_MAX_S),
    "concurrency": CONCURRENCY_RANGE,
    "fleet_size": FLEET_SIZE_RANGE,
    "local_port": PORT_RANGE,
    "storage_max_mb": STORAGE_MAX_MB_RANGE,
    "storage_max_age_days": STORAGE_MAX_AGE_DAYS_RANGE,
    "history_days": HISTORY_DAYS_RANGE,
}
APP_DIR = "imagefleet"
# Where the settings lived before platformdirs chose (macOS and Windows): still used when
# the file is there and the new folder is not, so an upgrade keeps the user's settings.
LEGACY_CONFIG = Path(".config")
LEGACY_CACHE = Path(".cache")


class SettingsError(ValueError):
    """One or more settings values are invalid; ``problems`` names each one."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# Unknown keys are refused rather than ignored so a typo never silently loses a value.
@validated_dataclass(frozen=True, config={"extra": "forbid"})
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
    # How long the History keeps a finished batch, in days since its last activity (0: for
    # ever); batches that can still be resumed are kept whatever their age.
    history_days: int = DEFAULT_HISTORY_DAYS

    @property
    def s3_location(self) -> str | None:
        """``s3://bucket[/prefix]`` for the embedded fleet, or None (the folder)."""
        if not self.s3_bucket:
            return None
        prefix = self.s3_prefix.strip("/")
        return f"s3://{self.s3_bucket}" + (f"/{prefix}" if prefix else "")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    # Each validator takes the raw value (JSON or form text) and answers the normalised
    # one, or raises ValueError with a message naming the field and what it allows.

    @field_validator("endpoint", "admin_endpoint", mode="before")
    @classmethod
    def _url(cls, raw: Any, info: Any) -> str:
        url = str(raw or "").strip().rstrip("/")
        problem = validate_endpoint(url)
        if problem:
            raise ValueError(problem.replace("endpoint", info.field_name, 1))
        return url

    @field_validator("token", "admin_token", mode="before")
    @classmethod
    def _token(cls, raw: Any, info: Any) -> str:
        value = str(raw or "").strip()
        if any(c.isspace() for c in value):
            raise ValueError(f"{info.field_name} may not contain spaces or line breaks")
        return value

    @field_validator("ca_file", mode="before")
    @classmethod
    def _ca_file(cls, raw: Any) -> str:
        # Only the form of the value here (no I/O on the UI thread): the client reads the
        # file when it connects and names what is wrong with it.
        ca_file = str(raw or "").strip()
        if "\n" in ca_file or "\x00" in ca_file:
            raise ValueError("ca_file must be the path of a PEM file")
        return str(Path(ca_file).expanduser()) if ca_file else ""

    @field_validator("s3_bucket", mode="before")
    @classmethod
    def _bucket(cls, raw: Any) -> str:
        value = str(raw or "").strip().removeprefix("s3://").strip("/")
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
            raise ValueError("s3_bucket must be an S3 bucket name (3-63 lower-case "
                             f"letters, digits, dots, hyphens), got {value!r}")
        return value

    @field_validator("s3_region", mode="before")
    @classmethod
    def _region(cls, raw: Any) -> str:
        value = str(raw or "").strip()
        if value and not re.fullmatch(r"[a-z0-9-]+", value):
            raise ValueError(f"s3_region must be a region name such as eu-west-1, "
                             f"got {value!r}")
        return value

    @field_validator("s3_prefix", mode="before")
    @classmethod
    def _prefix(cls, raw: Any) -> str:
        value = str(raw or "").strip()
        if any(c.isspace() for c in value):
            raise ValueError("s3_prefix may not contain spaces")
        return value

    @field_validator("appearance", "on_conflict", mode="before")
    @classmethod
    def _choice(cls, raw: Any, info: Any) -> str:
        allowed = APPEARANCES if info.field_name == "appearance" else ON_CONFLICT
        value = str(raw).strip().lower()
        if value not in allowed:
            raise ValueError(f"{info.field_name} must be one of {', '.join(allowed)}, "
                             f"got {value!r}")
        return value

    @field_validator("name_template", mode="before")
    @classmethod
    def _template(cls, raw: Any) -> str:
        template = str(raw or "").strip()
        try:
            parse_template(template)
        except TemplateError as exc:
            raise ValueError(f"name_template: {exc}") from None
        return template

    @field_validator(*INT_RANGES, mode="before")
    @classmethod
    def _whole_number(cls, raw: Any, info: Any) -> int:
        return int_in_range(info.field_name, raw, *INT_RANGES[info.field_name])


@dataclass(frozen=True)
class LoadedSettings:
    settings: Settings
    path: Path
    warning: str | None = None  # shown in the UI when the file was unusable
    problems: list[str] = field(default_factory=list)


def _xdg_platform() -> bool:
    return sys.platform.startswith(("linux", "freebsd", "openbsd", "netbsd"))


def _user_dir(kind: str, environ: Mapping[str, str] | None) -> Path:
    """The app's ``config`` or ``cache`` folder. ``XDG_<KIND>_HOME`` of ``environ`` wins
    on every system (tests and the app pass their own environment); on Linux and other
    XDG systems the rest of platformdirs' rule (``~/.config``, ``~/.cache``) is applied to
    ``environ``'s HOME, elsewhere platformdirs decides."""
    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    # ~/.config/imagefleet: XDG's default, and the folder used everywhere before platformdirs
    legacy = home / (LEGACY_CONFIG if kind == "config" else LEGACY_CACHE) / APP_DIR
    base = env.get(f"XDG_{kind.upper()}_HOME")
    if base:
        return Path(base) / APP_DIR
    if _xdg_platform():
        return legacy
    import platformdirs

    chosen = Path(platformdirs.user_config_dir(APP_DIR, appauthor=False) if kind == "config"
                  else platformdirs.user_cache_dir(APP_DIR, appauthor=False))
    return legacy if legacy.is_dir() and not chosen.exists() else chosen


# The app's variables: each wins over its saved setting, and a command-line flag (where
# there is one) over the variable. IMAGEFLEET_LOCAL_PORT stays text: a bad one is ignored
# (the app must start), not refused.
APP_ENVIRONMENT: dict[str, type] = {
    "endpoint": str, "admin_endpoint": str, "token": str, "admin_token": str,
    "ca_file": str, "local_port": str,
}


def app_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``IMAGEFLEET_*`` variables of ``APP_ENVIRONMENT`` that are set and not empty,
    by setting name, read the same way as the server's and the fleet's."""
    return layered(APP_ENVIRONMENT, flags={}, environ=environ)


def settings_path(environ: Mapping[str, str] | None = None) -> Path:
    return _user_dir("config", environ) / "settings.json"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the embedded fleet keeps its storage (results survive a restart)."""
    return _user_dir("cache", environ)


def validate_endpoint(value: str) -> str | None:
    """Problem with an endpoint URL, or None when it is usable (empty = embedded fleet)."""
    if not value:
        return None
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return f"endpoint must be an http:// or https:// URL, got {value!r}"
    return None


def int_in_range(name: str, raw: Any, low: int, high: int) -> int:
    """``raw`` (a number or form text) as a whole number in low..high, or ValueError."""
    if isinstance(raw, bool):
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {raw!r}")
    try:
        value = int(str(raw).strip()) if not isinstance(raw, int) else raw
    except ValueError:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, "
                         f"got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, got {value}")
    return value


def parse_settings(data: Mapping[str, Any], base: Settings | None = None) -> Settings:
    """Validate raw values (from JSON or from the form) into Settings, the keys not in
    ``data`` taken from ``base`` (default: the defaults).

    Unknown keys are rejected rather than ignored so a typo never silently loses a value.
    Raises SettingsError listing every problem at once.
    """
    start = base or Settings()
    try:
        return Settings(**{**asdict(start), **data})
    except ValidationError as exc:
        raise SettingsError(settings_problems(exc)) from None


def settings_problems(exc: ValidationError) -> list[str]:
    """One line per problem; the validators' messages name their field already."""
    known = ", ".join(sorted(f.name for f in fields(Settings)))
    return [f"unknown setting {'.'.join(str(p) for p in error['loc'])!r} (known: {known})"
            if error["type"] in ("unexpected_keyword_argument", "extra_forbidden")
            else problem_line(error) for error in exc.errors()]


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
