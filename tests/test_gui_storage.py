"""The Settings view's Local storage row: space used (measured off the UI thread) and
Clear (confirmed) on real files, the app under Xvfb."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from helpers_gui import ScriptedDialogs, app_environ, pump_until

FLEET_START = 120.0


@pytest.fixture
def app(x_display: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from gui.app import ImageFleetApp

    dialogs = ScriptedDialogs()
    app = ImageFleetApp(environ=app_environ(tmp_path_factory.mktemp("gui-storage")),
                        dialogs=dialogs)
    app.scripted = dialogs
    try:
        pump_until(app, lambda: app.connected is not None, FLEET_START,
                   "the embedded fleet to start")
        yield app
    finally:
        app.close()


def test_space_used_and_clear(app: Any) -> None:
    results = app.storage_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        (results / f"test{n}.png").write_bytes(b"x" * (2 * 2**20))
    view = app.settings_view
    app.show_view("Settings")
    pump_until(app, lambda: view.storage_used.cget("text").startswith("6.0 MB"), 20,
               "the space used shown")
    app.scripted.confirm_answer = False
    view.clear_button.invoke()
    assert app.scripted.confirmations and len(list(results.iterdir())) == 3
    app.scripted.confirm_answer = True
    view.clear_button.invoke()
    pump_until(app, lambda: view.storage_used.cget("text") == "0.0 MB used", 20,
               "the storage cleared")
    assert not list(results.iterdir())
    assert "Local storage cleared: 3 file(s)" in app.banner_text


def test_the_sharing_settings_are_edited_in_the_form(app: Any) -> None:
    """Port, S3 location, the storage caps and the history's days have form rows: they
    show the settings, a bad value is refused naming the field (nothing saved), a good
    one is saved."""
    import json

    view = app.settings_view
    app.show_view("Settings")
    assert view.raw_values()["local_port"] == str(app.settings.local_port)
    assert view.raw_values()["storage_max_mb"] == str(app.settings.storage_max_mb)
    assert view.raw_values()["history_days"] == "90"
    view.history_days.set(4000)
    view.save_button.invoke()
    assert "history_days must be from 0 to 3650, got 4000" in view.message.cget("text")
    assert app.settings.history_days == 90
    view.history_days.set(30)
    view.s3_bucket.insert(0, "Not_A_Bucket")
    view.save_button.invoke()
    assert "s3_bucket" in view.message.cget("text")
    assert app.settings.s3_bucket == ""
    view.s3_bucket.delete(0, "end")
    view.s3_bucket.insert(0, "team-photos")
    view.s3_region.insert(0, "eu-west-1")
    view.s3_prefix.insert(0, "shared/")
    view.local_port.set(9123)
    view.storage_max_mb.set(2000)
    view.storage_max_age_days.set(30)
    # The bucket is saved, not reached: the fleet's restart with it may fail without
    # credentials, which is the connection's business, not the form's.
    view.save_button.invoke()
    pump_until(app, lambda: app.config_path.exists()
               and json.loads(app.config_path.read_text()).get("s3_bucket") == "team-photos",
               20, "the settings saved")
    saved = json.loads(app.config_path.read_text())
    assert (saved["s3_region"], saved["s3_prefix"], saved["local_port"],
            saved["storage_max_mb"], saved["storage_max_age_days"], saved["history_days"]) == (
        "eu-west-1", "shared/", 9123, 2000, 30, 30)
    assert app.settings.s3_location == "s3://team-photos/shared"
