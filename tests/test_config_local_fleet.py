"""``python -m fleet local``'s options: flag > IMAGEFLEET_<FLAG> > --config file > default,
bad values refused naming the option, and the fleet's variables kept from its workers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.__main__ import build_parser, main
from fleet.local.options import FLEET_ENV, LocalFleetOptions, local_options, without_fleet_options


def options(argv: list[str], env: dict[str, str], file: dict[str, Any] | None,
            tmp_path: Path, suffix: str = ".json") -> LocalFleetOptions:
    config = []
    if file is not None:
        path = tmp_path / f"fleet{suffix}"
        path.write_text(json.dumps(file) if suffix == ".json" else "".join(
            f"{k} = {json.dumps(v)}\n" for k, v in file.items()))
        config = ["--config", str(path)]
    return local_options(build_parser().parse_args(["local", *config, *argv]), env)


# (flag, environment, file, expected) for options of each kind and the renamed --min/--max.
PRECEDENCE = [
    ("port", ["--port", "1"], "2", 3, (1, 2, 3, 8000)),
    ("workers", ["--workers", "1"], "2", 3, (1, 2, 3, 2)),
    ("min_workers", ["--min", "1"], "2", 3, (1, 2, 3, None)),
    ("max_connections", ["--max-connections", "10"], "20", 30, (10, 20, 30, None)),
    ("idle_timeout", ["--idle-timeout", "1.5"], "2.5", 3.5, (1.5, 2.5, 3.5, 60.0)),
    ("sample_interval", ["--sample-interval", "1"], "2", 3, (1.0, 2.0, 3.0, 5.0)),
    ("results", ["--results", "s3://flag"], "s3://env", "s3://file",
     ("s3://flag", "s3://env", "s3://file", None)),
    ("storage", ["--storage", "f"], "e", "c", (Path("f"), Path("e"), Path("c"),
                                               Path("storage"))),
    ("port_fallback", ["--port-fallback"], "true", False, (True, True, False, False)),
]


@pytest.mark.parametrize(("field", "flag", "env_value", "file_value", "expected"), PRECEDENCE)
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_flag_beats_environment_beats_file_beats_default(
        tmp_path: Path, field: str, flag: list[str], env_value: str, file_value: Any,
        expected: tuple[Any, Any, Any, Any], suffix: str) -> None:
    variable = "IMAGEFLEET_" + {"min_workers": "MIN"}.get(field, field.upper())
    key = flag[0][2:]  # the file is keyed by flag name
    env = {variable: env_value}
    file = {key: file_value}
    assert getattr(options(flag, env, file, tmp_path, suffix), field) == expected[0]
    assert getattr(options([], env, file, tmp_path, suffix), field) == expected[1]
    assert getattr(options([], {}, file, tmp_path, suffix), field) == expected[2]
    assert getattr(options([], {}, None, tmp_path), field) == expected[3]


def test_the_known_variables_keep_working(tmp_path: Path) -> None:
    env = {"IMAGEFLEET_TOKEN": "from-env-token", "IMAGEFLEET_RESULTS": "s3://bucket/p",
           "IMAGEFLEET_SAMPLE_INTERVAL": "1"}
    chosen = options([], env, None, tmp_path)
    assert (chosen.token, chosen.results, chosen.sample_interval) == (
        "from-env-token", "s3://bucket/p", 1.0)
    assert options([], {"IMAGEFLEET_TOKEN": ""}, None, tmp_path).token is None


def test_every_flag_has_its_variable() -> None:
    local = next(a for a in build_parser()._actions if a.dest == "command").choices["local"]
    flags = {o[2:] for a in local._actions for o in a.option_strings if o.startswith("--")}
    assert {"IMAGEFLEET_" + f.upper().replace("-", "_") for f in flags - {"help"}} == FLEET_ENV


@pytest.mark.parametrize(("env", "file", "says"), [
    ({"IMAGEFLEET_PORT": "eighty"}, None, "IMAGEFLEET_PORT: Input should be a valid integer"),
    ({"IMAGEFLEET_PORT": "70000"}, None, "--port / IMAGEFLEET_PORT: Input should be less"),
    ({}, {"max-connections": 0}, "--max-connections / IMAGEFLEET_MAX_CONNECTIONS"),
    ({}, {"idle-timeout": "soon"}, "idle-timeout in "),
    ({}, {"wokers": 3}, "unknown options wokers; known: header-timeout"),
    ({"IMAGEFLEET_VERBOSE": "loud"}, None, "IMAGEFLEET_VERBOSE: Input should be a valid boolean"),
])
def test_bad_values_are_refused_naming_the_option(tmp_path: Path, env: dict[str, str],
                                                  file: dict[str, Any] | None,
                                                  says: str) -> None:
    with pytest.raises(ValueError) as caught:
        options([], env, file, tmp_path)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_command_exits_2_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("IMAGEFLEET_MAX_BODY_BYTES", "lots")
    assert main(["local"]) == 2
    assert "IMAGEFLEET_MAX_BODY_BYTES: Input should be a valid integer" in capsys.readouterr().err


def test_workers_do_not_inherit_the_fleets_options() -> None:
    env = {"IMAGEFLEET_WORKERS": "4", "IMAGEFLEET_CONFIG": "fleet.json", "IMAGEFLEET_PORT": "1",
           "IMAGEFLEET_LINK_SECRET": "kept", "IMAGEFLEET_MAX_PIXELS": "9", "PATH": "/bin"}
    assert without_fleet_options(env) == {"IMAGEFLEET_LINK_SECRET": "kept",
                                           "IMAGEFLEET_MAX_PIXELS": "9", "PATH": "/bin"}
