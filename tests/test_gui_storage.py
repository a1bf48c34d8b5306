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
