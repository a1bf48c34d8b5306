"""server.atomic.write_atomic: whole or not at all, private from the first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from server.atomic import write_atomic


def test_replaces_the_file_whole_and_owner_only(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "settings.json"
    write_atomic(target, "first")
    write_atomic(target, "second")
    assert target.read_text() == "second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["settings.json"]  # no temp left


def test_a_wider_mode_is_kept_despite_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "recipe.json", b"{}", 0o644)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "recipe.json").stat().st_mode) == 0o644


def test_a_failed_rename_leaves_what_was_there_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.mkdir()  # a folder where the file should go: the rename fails (root too)
    (target / "keep").write_text("kept")
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert (target / "keep").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
