"""The validated config values at their boundaries: the fleet spec from a mapping, the AWS
fleet file's strict types, the app's folders through platformdirs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from fleet.local.runtime import local_spec
from fleet.model import FleetSpec, spec_from_mapping
from gui import settings as app_settings


def test_spec_from_mapping_keeps_the_dataclass_and_its_defaults() -> None:
    spec = spec_from_mapping({"desired": "3", "min": 1, "max": 4}, base=FleetSpec(name="x"))
    assert dataclasses.is_dataclass(spec) and isinstance(spec, FleetSpec)
    assert (spec.name, spec.desired, spec.tick_interval_s) == ("x", 3, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.desired = 2  # type: ignore[misc]


@pytest.mark.parametrize(("values", "says"), [
    ({"desired": 5, "min": 1, "max": 4}, "desired must be within min..max (1..4), got 5"),
    ({"colour": "blue"}, "colour: Unexpected keyword argument"),
    ({"tick_interval_s": "fast"}, "tick_interval_s: Input should be a valid number"),
])
def test_spec_from_mapping_names_the_field(values: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError) as caught:
        spec_from_mapping(values)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_local_spec_overrides_are_checked() -> None:
    assert local_spec(2, 1, 4, tick_interval_s=0.25).tick_interval_s == 0.25
    with pytest.raises(ValueError, match="tick_intervall_s: Unexpected keyword argument"):
        local_spec(2, tick_intervall_s=0.25)


@pytest.mark.parametrize("kind", ["config", "cache"])
def test_app_folders_follow_xdg_then_platformdirs(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path, kind: str) -> None:
    folder = app_settings.settings_path if kind == "config" else app_settings.cache_dir
    variable = f"XDG_{kind.upper()}_HOME"
    # The variable wins on every system (tests point the app at a folder of their own).
    for platform in ("linux", "darwin", "win32"):
        monkeypatch.setattr(app_settings.sys, "platform", platform)
        chosen = folder({variable: str(tmp_path / "x"), "HOME": str(tmp_path)})
        assert chosen.is_relative_to(tmp_path / "x" / "imagefleet")
    monkeypatch.setattr(app_settings.sys, "platform", "darwin")
    import platformdirs

    new = tmp_path / "platformdirs"
    monkeypatch.setattr(platformdirs, f"user_{kind}_dir", lambda *a, **k: str(new))
    assert folder({"HOME": str(tmp_path)}).is_relative_to(new)
    # An existing folder of an older version is kept until the new one exists.
    legacy = tmp_path / f".{kind}" / "imagefleet"
    legacy.mkdir(parents=True)
    assert folder({"HOME": str(tmp_path)}).is_relative_to(legacy)
    new.mkdir()
    assert folder({"HOME": str(tmp_path)}).is_relative_to(new)
