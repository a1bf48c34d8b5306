"""The options of ``python -m fleet local``: one validated, frozen value.

Each option comes from its flag, else ``IMAGEFLEET_<FLAG>`` (``--min``: ``IMAGEFLEET_MIN``,
``--max-body-bytes``: ``IMAGEFLEET_MAX_BODY_BYTES``), else the ``--config`` file (keys:
the flag names), else its default; server/settings.py does the layering.

The variables are the fleet's: the workers it starts do not inherit them
(``FLEET_ENV``), because several of them (``IMAGEFLEET_WORKERS``, ``IMAGEFLEET_PORT``,
``IMAGEFLEET_CONFIG``) mean something else to a server.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.local.gateway import GatewayLimits
from server.settings import env_name, layered, one_line

DEFAULT_STORAGE = Path("storage")
DEFAULT_SAMPLE_INTERVAL_S = 5.0
_LIMITS = GatewayLimits()


class LocalFleetOptions(BaseModel):
    """What ``python -m fleet local`` runs with. Ranges that the fleet's own parts check
    with their messages (the spec's min/desired/max, the storage caps) are left to them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(2, ge=0)
    min_workers: int | None = Field(None, ge=0)
    max_workers: int | None = Field(None, ge=1)
    port: int = Field(8000, ge=0, le=65535)
    storage: Path = DEFAULT_STORAGE
    port_fallback: bool = False
    results: str | None = None
    max_storage_mb: float | None = None
    max_age_days: float | None = None
    token: str | None = None
    max_body_bytes: int = Field(_LIMITS.max_body_bytes, ge=1)
    idle_timeout: float = Field(_LIMITS.idle_timeout_s, gt=0)
    header_timeout: float = Field(_LIMITS.header_timeout_s, gt=0)
    max_connections: int | None = Field(None, ge=1)
    ready_file: Path | None = None
    stop_on_stdin_eof: bool = False
    sample_interval: float = Field(DEFAULT_SAMPLE_INTERVAL_S, gt=0)
    verbose: bool = False


# Flags whose name is not their field's.
FLAG_NAMES = {"min_workers": "min", "max_workers": "max"}
# Options whose empty value means "not given" (IMAGEFLEET_RESULTS= in a unit file).
OPTIONAL_STRINGS = ("results", "token")
FLEET_ENV = frozenset(
    env_name(FLAG_NAMES.get(name, name)) for name in [*LocalFleetOptions.model_fields, "config"])


def without_fleet_options(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` less the fleet's own variables: what a worker inherits."""
    return {k: v for k, v in environ.items() if k.upper() not in FLEET_ENV}


def local_options(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> LocalFleetOptions:
    """The options from ``args`` (flags not given are None), the environment and
    ``args.config``; ValueError with one line naming each bad option."""
    fields = {name: info.annotation for name, info in LocalFleetOptions.model_fields.items()}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    values: dict[str, Any] = layered(fields, flags=flags, environ=environ,
                                     config_file=getattr(args, "config", None),
                                     flag_names=FLAG_NAMES)
    for optional in OPTIONAL_STRINGS:
        if values.get(optional) == "":
            values.pop(optional)
    try:
        return LocalFleetOptions(**values)
    except ValidationError as exc:
        raise ValueError(one_line(exc, _option_name)) from None


def _option_name(field: str) -> str:
    flag = FLAG_NAMES.get(field, field).replace("_", "-")
    return f"--{flag} / {env_name(flag)}"
