"""The virtual image list's arithmetic, the thumbnail cache's bound and the run's event
inbox: pure code, no display."""

from __future__ import annotations

import threading

import pytest

from gui.list_window import (
    WHEEL_ROWS,
    LruCache,
    Window,
    clamp_top,
    ensure_visible,
    moved_selection,
    moveto,
    rows_that_fit,
    scrolled,
    wheel_rows,
)
from gui.run_events import Outcome, Progress, RunEvents


def test_window_shows_capacity_rows_and_a_proportional_scrollbar() -> None:
    window = Window(top=5000, count=10_000, capacity=8)
    assert list(window.visible) == list(range(5000, 5008))
    assert window.scrollbar() == pytest.approx((0.5, 0.5008))
    assert Window(0, 3, 8).scrollbar() == (0.0, 1.0)  # everything fits: a full thumb
    assert list(Window(0, 3, 8).visible) == [0, 1, 2]
    assert rows_that_fit(500, 78) == 6 and rows_that_fit(10, 78) == 1


def test_top_is_clamped_so_the_last_page_is_full() -> None:
    assert clamp_top(9999, 10_000, 8) == 9992
    assert clamp_top(-3, 10_000, 8) == 0
    assert clamp_top(4, 3, 8) == 0
    assert moveto(1.0, 10_000, 8) == 9992
    assert moveto(0.25, 10_000, 8) == 2500
    assert scrolled(100, 1, "units", 10_000, 8) == 101
    assert scrolled(100, -1, "pages", 10_000, 8) == 93  # one row of context kept
    assert scrolled(9990, 5, "pages", 10_000, 8) == 9992


def test_ensure_visible_moves_as_little_as_possible() -> None:
    assert ensure_visible(50, 40, 10_000, 8) == 43  # below: becomes the last row
    assert ensure_visible(30, 40, 10_000, 8) == 30  # above: becomes the first row
    assert ensure_visible(44, 40, 10_000, 8) == 40  # on screen: no move
    assert ensure_visible(9999, 0, 10_000, 8) == 9992


@pytest.mark.parametrize(("system", "num", "delta", "rows"), [
    ("x11", 5, 0, WHEEL_ROWS), ("x11", 4, 0, -WHEEL_ROWS),  # X11 buttons
    ("x11", None, -120, WHEEL_ROWS),  # Tk 8.7+ on X11 sends <MouseWheel> too
    ("win32", None, 120, -WHEEL_ROWS), ("win32", None, -240, 2 * WHEEL_ROWS),
    ("win32", None, -30, 1),  # a precision touchpad's quarter notch still moves
    ("aqua", None, 1, -1), ("aqua", None, -4, 4),  # macOS: small deltas, one row each
    ("x11", None, 0, 0),
])
def test_wheel_rows_per_platform(system: str, num: int | None, delta: int, rows: int) -> None:
    assert wheel_rows(system, num=num, delta=delta) == rows


def test_keyboard_moves_the_selection() -> None:
    assert moved_selection(None, "Down", 10, 4) == 0
    assert moved_selection(3, "Down", 10, 4) == 4
    assert moved_selection(0, "Up", 10, 4) == 0
    assert moved_selection(9, "Down", 10, 4) == 9
    assert moved_selection(2, "Next", 10, 4) == 5
    assert moved_selection(2, "End", 10, 4) == 9
    assert moved_selection(7, "Home", 10, 4) == 0
    assert moved_selection(None, "Down", 0, 4) is None


def test_lru_cache_is_bounded_and_keeps_the_recently_used() -> None:
    cache: LruCache[int, str] = LruCache(300)
    for key in range(300):
        cache.put(key, f"t{key}")
    assert cache.get(0) == "t0"  # touched: now the most recent
    evicted = [k for key in range(300, 10_300) for k in cache.put(key, f"t{key}")]
    assert len(cache) == 300
    assert len(evicted) == 10_000
    assert 0 not in cache and 10_299 in cache
    assert evicted[0] == 1  # the least recently used went first, not the touched 0
    with pytest.raises(ValueError):
        LruCache(0)


def test_run_events_coalesce_progress_and_keep_every_outcome() -> None:
    events = RunEvents()
    assert events.put_progress(Progress(1, 1, "uploading", 0.1))  # empty: wake the UI
    assert not events.put_progress(Progress(1, 1, "uploading", 0.9))
    assert not events.put_progress(Progress(2, 1, "processing", 0.0))
    assert not events.put_outcome(Outcome(2, 1, error="boom"))
    progress, outcomes = events.take()
    assert progress == [Progress(1, 1, "uploading", 0.9)]  # one per image, the latest
    assert outcomes == [Outcome(2, 1, error="boom")]
    assert events.take() == ([], [])

    def report(start: int) -> None:
        for job_id in range(start, start + 1000):
            for step in range(5):
                events.put_progress(Progress(job_id, 1, "uploading", step / 4))
            events.put_outcome(Outcome(job_id, 1, result="r"))

    threads = [threading.Thread(target=report, args=(n * 1000,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    progress, outcomes = events.take()
    assert progress == [] and len(outcomes) == 4000


def test_files_are_checked_and_listed_in_a_small_first_chunk_then_larger_ones() -> None:
    from gui.process_controller import chunk_bounds

    assert chunk_bounds(0, 200, 2000) == []
    assert chunk_bounds(150, 200, 2000) == [(0, 150)]
    assert chunk_bounds(10_000, 200, 2000) == [(0, 200), (200, 2200), (2200, 4200),
                                                (4200, 6200), (6200, 8200), (8200, 10_000)]
