import os

import pytest

from fleet.storage_cleanup import Caps, Entry, clear, plan_cleanup, scan, sweep, used_bytes

DAY = 86400.0
NOW = 1_000_000.0


@pytest.mark.parametrize("entries, caps, expected", [
    ([], Caps(100, DAY), []),
    # nothing over a cap
    ([Entry("a", 10, NOW - 10), Entry("b", 10, NOW - 5)], Caps(100, DAY), []),
    # the age cap
    ([Entry("old", 10, NOW - 2 * DAY), Entry("new", 10, NOW - 10)], Caps(None, DAY), ["old"]),
    # an explicit expiry before the age cap
    ([Entry("x", 10, NOW - 10, expires_at=NOW - 1)], Caps(None, DAY), ["x"]),
    ([Entry("x", 10, NOW - 10, expires_at=NOW + 1)], Caps(None, None), []),
    # the size cap: oldest first, until under it
    ([Entry("a", 40, NOW - 30), Entry("b", 40, NOW - 20), Entry("c", 40, NOW - 10)],
     Caps(80, None), ["a"]),
    ([Entry("a", 40, NOW - 30), Entry("b", 40, NOW - 20), Entry("c", 40, NOW - 10)],
     Caps(39, None), ["a", "b", "c"]),
    # expired first, then the size cap on what is left
    ([Entry("e", 5, NOW - 3 * DAY), Entry("a", 50, NOW - 30), Entry("b", 50, NOW - 20)],
     Caps(60, DAY), ["e", "a"]),
    # no caps: nothing
    ([Entry("a", 10**9, 0.0)], Caps(None, None), []),
])
def test_plan_cleanup(entries, caps, expected):
    assert plan_cleanup(entries, caps, NOW) == expected


def _put(root, key, size, mtime):
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    meta = path.with_name(path.name + ".meta.json")
    meta.write_text("{}")
    os.utime(path, (mtime, mtime))
    os.utime(meta, (mtime, mtime))


def test_sweep_and_clear_on_real_files(tmp_path):
    _put(tmp_path, "results/old.png", 1000, NOW - 10 * DAY)
    _put(tmp_path, "originals/old.png", 1000, NOW - 10 * DAY)
    _put(tmp_path, "results/a.png", 3000, NOW - 60)
    _put(tmp_path, "results/b.png", 3000, NOW - 30)
    (tmp_path / ".fleet").mkdir()
    (tmp_path / ".fleet" / "state.json").write_text("{}")  # never touched
    assert used_bytes(tmp_path) == 2 * 1002 + 2 * 3002
    removed, freed = sweep(tmp_path, Caps(max_bytes=4000, max_age_s=7 * DAY), now=NOW)
    assert removed == 3 and freed == 2 * 1002 + 3002
    assert [e.key for e in scan(tmp_path)] == ["results/b.png"]
    assert not (tmp_path / "results" / "a.png.meta.json").exists()
    assert clear(tmp_path) == (1, 3002)
    assert scan(tmp_path) == [] and (tmp_path / ".fleet" / "state.json").exists()
