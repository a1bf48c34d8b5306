"""Settings from four layers with one precedence, and pydantic's errors as one line.

Every command (``python -m server``, ``python -m fleet local``) takes each option from,
first match wins: its command-line flag, the environment variable ``IMAGEFLEET_<NAME>``
(the flag's name in capitals, ``-`` as ``_``), the config file given with ``--config``
(JSON, or TOML when the name ends in ``.toml``; keys are the flag names, ``-`` or ``_``),
then the default. pydantic-settings reads and parses the environment and orders the
layers; the command's own model validates the merged values.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, create_model
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

ENV_PREFIX = "IMAGEFLEET_"


def env_name(name: str) -> str:
    """``IMAGEFLEET_<NAME>`` for a flag or field name (``link-ttl`` -> ``IMAGEFLEET_LINK_TTL``)."""
    return ENV_PREFIX + name.upper().replace("-", "_")


def problems_of(exc: ValidationError, where: Callable[[str], str] | None = None) -> list[str]:
    """One line per error, each naming its field and what is allowed.

    A validator's own ``ValueError`` message already names the field and is kept as it is;
    pydantic's type errors get ``field: message (got value)``, with ``where(field)`` (the
    variable or file the value came from) in place of the bare field name when given.
    """
    return [problem_line(error, where) for error in exc.errors()]


def problem_line(error: Any, where: Callable[[str], str] | None = None) -> str:
    """One of ``exc.errors()`` as :func:`problems_of` words it."""
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "value_error":
        return error["msg"].removeprefix("Value error, ")
    name = where(field) if where and field else field or "value"
    return f"{name}: {error['msg']} (got {error.get('input')!r})"


def one_line(exc: ValidationError, where: Callable[[str], str] | None = None) -> str:
    return "; ".join(problems_of(exc, where))


def read_config_file(path: Path, known: Iterable[str],
                     flag_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The file's values by field name, keyed in the file by flag name (``max-bytes`` and
    ``max_bytes`` alike; ``min`` for the field of ``--min``) or by field name.

    Unknown keys are refused, naming them and the known ones, so a typo never silently
    leaves an option at its default.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ValueError(f"config file {path} is not valid {kind} ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold an object of option: value")
    fields = {flag.replace("-", "_"): name for name, flag in (flag_names or {}).items()}
    values = {fields.get(key, key): value
              for key, value in ((str(k).replace("-", "_"), v) for k, v in data.items())}
    known = set(known)
    unknown = sorted(set(values) - known)
    if unknown:
        shown = sorted((flag_names or {}).get(k) or k.replace("_", "-") for k in known)
        raise ValueError(f"config file {path}: unknown options {', '.join(unknown)}; "
                         f"known: {', '.join(shown)}")
    return values


class _MappingEnvSource(EnvSettingsSource):
    """The environment source reading a given mapping (a child's environment, a test's)
    instead of this process's ``os.environ``."""

    environ: Mapping[str, str] = os.environ

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self.environ, self.case_sensitive, self.env_ignore_empty,
                              self.env_parse_none_str)


class _FileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: Mapping[str, Any]) -> None:
        super().__init__(settings_cls)
        self.values = dict(values)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class _Layers(BaseSettings):
    # Empty variables count as unset (``IMAGEFLEET_TOKEN=`` is no token), and other
    # IMAGEFLEET_* variables (those of other commands) are not this command's business.
    model_config = SettingsConfigDict(case_sensitive=False, env_ignore_empty=True,
                                      extra="ignore", populate_by_name=True)


def layered(fields: Mapping[str, Any], *, flags: Mapping[str, Any],
            environ: Mapping[str, str] | None = None, config_file: Path | None = None,
            flag_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options that some layer sets, by field name, parsed to the fields' types:
    ``flags`` (those not None) > the environment > ``config_file`` > (defaults: left out,
    so the command's model applies its own).

    ``fields`` maps each field name to its type; ``flag_names`` gives a field's flag when
    it is not the field's name (``--min`` for ``min_workers``): the variable is then
    ``IMAGEFLEET_MIN`` and the file's key ``min``.
    Raises ValueError naming the variable or the file of a value that does not parse.
    """
    env = os.environ if environ is None else environ
    flag_of = {name: (flag_names or {}).get(name) or name.replace("_", "-") for name in fields}
    names = {name: env_name(flag_of[name]) for name in fields}
    file_values = (read_config_file(config_file, fields, flag_names)
                   if config_file is not None else {})
    env_source = type("_Env", (_MappingEnvSource,), {"environ": env})

    class Layers(_Layers):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                       dotenv_settings, file_secret_settings):
            return (init_settings, env_source(settings_cls), _FileSource(settings_cls,
                                                                         file_values))

    model = create_model(
        "Layers", __base__=Layers,
        **{name: (kind | None, Field(None, validation_alias=names[name]))
           for name, kind in fields.items()})
    given = {k: v for k, v in flags.items() if v is not None and k in fields}
    lowered = {k.lower() for k in env}

    by_alias = {alias.lower(): name for name, alias in names.items()}

    def where(loc: str) -> str:
        # pydantic names the alias (the variable) in its errors; say where the value was.
        field = by_alias.get(loc.lower(), loc)
        if field in given:
            return f"--{flag_of.get(field, field)}"
        if names.get(field, "").lower() in lowered:
            return names[field]
        return f"{flag_of.get(field, field)} in {config_file}" if config_file else field

    try:
        settings = model(**given)
    except ValidationError as exc:
        raise ValueError(one_line(exc, where)) from None
    return {name: value for name, value in settings.model_dump().items() if value is not None}
