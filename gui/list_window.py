"""The arithmetic of the virtual image list (no Tk): which rows are on screen, where the
scrollbar's thumb goes, and how far a scroll, a key or a mouse-wheel notch moves.

The list scrolls by whole rows. Only ``capacity`` row widgets exist, whatever the
number of images; they are re-pointed at the images of the rows on screen.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

WHEEL_ROWS = 3  # rows per wheel notch, as file managers scroll
WINDOWS_NOTCH = 120  # Windows (and Tk 8.7+ on X11) report a notch as delta 120

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def rows_that_fit(height_px: int, row_px: int) -> int:
    """Rows wholly visible in a viewport ``height_px`` tall (at least one)."""
    return max(1, height_px // max(1, row_px))


def clamp_top(top: int, count: int, capacity: int) -> int:
    """The first row shown, kept so the last page is full (no blank scroll past the end)."""
    return max(0, min(top, count - capacity))


@dataclass(frozen=True)
class Window:
    top: int
    count: int
    capacity: int

    @property
    def visible(self) -> range:
        return range(self.top, min(self.count, self.top + self.capacity))

    def scrollbar(self) -> tuple[float, float]:
        """The scrollbar thumb (first, last) as fractions of the whole list."""
        if self.count <= self.capacity:
            return 0.0, 1.0
        return self.top / self.count, min(1.0, (self.top + self.capacity) / self.count)


def moveto(fraction: float, count: int, capacity: int) -> int:
    """Top row for a dragged scrollbar thumb (Tk's ``moveto FRACTION``)."""
    return clamp_top(round(fraction * count), count, capacity)


def scrolled(top: int, amount: int, unit: str, count: int, capacity: int) -> int:
    """Top row after Tk's ``scroll N units|pages``; a page keeps one row of context."""
    step = max(1, capacity - 1) if unit.startswith("page") else 1
    return clamp_top(top + amount * step, count, capacity)


def ensure_visible(index: int, top: int, count: int, capacity: int) -> int:
    """Top row that shows row ``index``, moving as little as possible."""
    if index < top:
        top = index
    elif index >= top + capacity:
        top = index - capacity + 1
    return clamp_top(top, count, capacity)


def wheel_rows(windowing_system: str, *, num: int | None = None, delta: int = 0) -> int:
    """Rows to move for one wheel event (positive: down the list).

    X11 sends buttons 4 (up) and 5 (down); Windows ``<MouseWheel>`` with delta +-120 per
    notch (positive is up; Tk 8.7+ on X11 does the same); macOS ``<MouseWheel>`` with a
    small delta per step (positive is up), many of them for one trackpad swipe.
    """
    if num == 4:
        return -WHEEL_ROWS
    if num == 5:
        return WHEEL_ROWS
    if not delta:
        return 0
    if windowing_system == "aqua" and abs(delta) < WINDOWS_NOTCH:
        return -delta
    notches = delta / WINDOWS_NOTCH
    rows = round(notches * WHEEL_ROWS)
    if rows == 0:  # a precision touchpad's fraction of a notch still moves
        rows = 1 if notches > 0 else -1
    return -rows


def moved_selection(index: int | None, key: str, count: int, capacity: int) -> int | None:
    """The selected row after Up/Down/Page Up/Page Down/Home/End (None: empty list)."""
    if count == 0:
        return None
    if index is None:
        return 0
    step = {"Up": -1, "Down": 1, "Prior": -max(1, capacity - 1),
            "Next": max(1, capacity - 1)}.get(key)
    if key == "Home":
        return 0
    if key == "End":
        return count - 1
    if step is None:
        return index
    return max(0, min(count - 1, index + step))


class LruCache(Generic[K, V]):
    """At most ``capacity`` entries; the least recently used goes first."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> list[K]:
        """Store ``value``; returns the keys evicted to make room."""
        self._items[key] = value
        self._items.move_to_end(key)
        evicted = []
        while len(self._items) > self.capacity:
            old, _ = self._items.popitem(last=False)
            evicted.append(old)
        return evicted

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)
