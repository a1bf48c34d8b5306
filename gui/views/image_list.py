"""The Process view's image list: a virtual list that stays fast at 10,000+ images.

Only the rows on screen exist as widgets: a fixed pool of row widgets (as many as fit
the viewport) is re-pointed at the images of the rows shown as the list scrolls, so
memory and redraw cost do not grow with the number of images. The scrollbar is
proportional to the whole list; the mouse wheel (X11 buttons 4/5, Windows and macOS
``<MouseWheel>``) and Up/Down/Page Up/Page Down/Home/End work on every part of it.

The list shows what its source says: ``order`` (the ids, filtered and sorted by the
controller), ``job_of(id)`` and ``thumbnail_of(id)``. ``refresh()`` redraws the
visible rows only, and only what changed in them.
"""

from __future__ import annotations

import tkinter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import customtkinter as ctk
from PIL import Image

from gui.list_window import (
    Window,
    clamp_top,
    ensure_visible,
    moved_selection,
    moveto,
    rows_that_fit,
    scrolled,
    wheel_rows,
)
from gui.viewmodel.batch import (
    SORT_KEYS,
    STATE_FILTERS,
    ImageJob,
    JobStatus,
    can_retry,
    status_text,
)
from gui.views.widgets import CARD, ERROR, MUTED, SELECTED, caption, destroy_widgets

ROW_HEIGHT = 72  # the 56 px thumbnail and its padding
ROW_GAP = 6
ROW_PX = ROW_HEIGHT + ROW_GAP
STATUS_CHARS = 60  # the full text of a long error is in the result panel on selection
BAR_COLOUR = ("#3a7ebf", "#1f6aa5")
SORT_LABELS = {"added": "Order added", "name": "Name", "state": "State"}
FILTER_LABELS = {"all": "All", "failed": "Failed", "done": "Done", "pending": "Pending"}


class ListActions(Protocol):
    def remove_image(self, job_id: int) -> None: ...
    def retry_image(self, job_id: int) -> None: ...
    def select_image(self, job_id: int) -> None: ...
    def list_order_changed(self, sort_key: str, state_filter: str) -> None: ...
    def job_of(self, job_id: int) -> ImageJob | None: ...
    def thumbnail_of(self, job_id: int) -> ctk.CTkImage | None: ...
    def rows_shown(self, job_ids: list[int]) -> None: ...


def _short(text: str, limit: int = STATUS_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def fit_text(text: str, measure: Callable[[str], int], width: int) -> str:
    """``text``, cut with an ellipsis to fit ``width`` pixels as ``measure`` says."""
    if measure(text) <= width:
        return text
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if measure(text[:mid] + "…") <= width:
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip() + "…"


class PoolRow(ctk.CTkFrame):
    """One row widget, shown for whichever image sits at its place in the list."""

    def __init__(self, master: Any, actions: ListActions) -> None:
        super().__init__(master, fg_color=CARD, corner_radius=8, height=ROW_HEIGHT)
        self.grid_propagate(False)  # a fixed height: the list's arithmetic relies on it
        self.job_id: int | None = None
        self._shown: dict[str, Any] = {}
        self.columnconfigure(1, weight=1)
        self.thumb = ctk.CTkLabel(self, text="", width=56, height=56,
                                  fg_color=("gray80", "gray25"), corner_radius=6)
        self.thumb.grid(row=0, column=0, rowspan=3, padx=(8, 8), pady=8)
        self.name = ctk.CTkLabel(self, text="", anchor="w", height=20,
                                 font=ctk.CTkFont(size=13, weight="bold"))
        self.name.grid(row=0, column=1, sticky="ew", pady=(8, 0))
        self.remove_button = ctk.CTkButton(
            self, text="✕", width=26, height=24, fg_color="transparent", text_color=MUTED,
            hover_color=("gray80", "gray30"), command=lambda: self._act(actions.remove_image))
        self.remove_button.grid(row=0, column=2, padx=(4, 6), pady=(6, 0))
        self.status = ctk.CTkLabel(self, text="", anchor="w", text_color=MUTED, height=18,
                                   font=ctk.CTkFont(size=12))
        self.status.grid(row=1, column=1, sticky="ew")
        self.retry_button = ctk.CTkButton(self, text="Retry", width=56, height=22,
                                          command=lambda: self._act(actions.retry_image))
        self.bar = ctk.CTkProgressBar(self, height=6)
        self.bar.set(0)
        self.bar.grid(row=2, column=1, columnspan=2, sticky="ew", padx=(0, 10), pady=(2, 8))
        self._thumb_image: ctk.CTkImage | None = None
        self._blank = ctk.CTkImage(light_image=Image.new("RGBA", (1, 1), (0, 0, 0, 0)),
                                   size=(1, 1))

    def _act(self, action: Callable[[int], None]) -> None:
        if self.job_id is not None:
            action(self.job_id)

    def _changed(self, name: str, value: Any) -> bool:
        if self._shown.get(name, self) == value:
            return False
        self._shown[name] = value
        return True

    def show(self, job: ImageJob, thumb: ctk.CTkImage | None, selected: bool) -> None:
        """Point the row at ``job``; only what differs from what it shows is redrawn."""
        self.job_id = job.id
        failed = job.status in (JobStatus.FAILED, JobStatus.NOT_IMAGE)
        if self._changed("name", job.name):
            self.name.configure(text=_short(job.name, 40))
        retry = can_retry(job)  # never for a file that is not an image
        # cut to the pixels left of the Retry/remove buttons, so nothing runs under them
        # (the whole text is in the result panel when the image is selected)
        row_width = self.winfo_width() if self.winfo_width() > 1 else 270
        room = row_width - 72 - (66 if retry else 40)
        status = fit_text(_short(status_text(job)), self.status.cget("font").measure, room)
        if self._changed("status", (status, failed)):
            self.status.configure(text=status, text_color=ERROR if failed else MUTED)
        if self._changed("progress", (job.progress, failed)):
            self.bar.set(job.progress)
            self.bar.configure(progress_color=ERROR if failed else BAR_COLOUR)
        if self._changed("retry", retry):
            if retry:
                self.retry_button.grid(row=1, column=2, padx=(4, 6))
            else:
                self.retry_button.grid_remove()
        if self._changed("thumb", thumb):
            if thumb is None:
                self.thumb.configure(image=self._blank, fg_color=("gray80", "gray25"))
            else:
                self.thumb.configure(image=thumb, fg_color="transparent")
            self._thumb_image = thumb  # kept while shown: Tk needs the image alive
        if self._changed("selected", selected):
            self.configure(fg_color=SELECTED if selected else CARD)


class ImageList(ctk.CTkFrame):
    """See the module docstring."""

    def __init__(self, master: Any, actions: ListActions, empty_text: str) -> None:
        super().__init__(master, fg_color="transparent")
        self.actions = actions
        self.order: list[int] = []
        self._index: dict[int, int] = {}
        self.top = 0
        self.capacity = 1
        self.selected: int | None = None
        self.pool: list[PoolRow] = []
        self.empty_text = empty_text
        self.redraws = 0  # for tests: how often visible rows were redrawn
        self._wheel_tag = f"ImageListWheel{id(self)}"
        self.columnconfigure(0, weight=1)
        self.rowconfigure(1, weight=1)

        tools = ctk.CTkFrame(self, fg_color="transparent")
        tools.grid(row=0, column=0, columnspan=2, sticky="ew", padx=4, pady=(0, 4))
        tools.columnconfigure(1, weight=1)
        self.sort_var = ctk.StringVar(value=SORT_LABELS["added"])
        self.sort_menu = ctk.CTkOptionMenu(
            tools, values=[SORT_LABELS[k] for k in SORT_KEYS], variable=self.sort_var,
            width=112, height=26, command=lambda _v: self._order_picked())
        self.sort_menu.grid(row=0, column=0, sticky="w")
        self.filter = ctk.CTkSegmentedButton(
            tools, values=[FILTER_LABELS[k] for k in STATE_FILTERS], height=26,
            command=lambda _v: self._order_picked())
        self.filter.set(FILTER_LABELS["all"])
        self.filter.grid(row=0, column=1, sticky="e")

        self.viewport = ctk.CTkFrame(self, fg_color="transparent")
        tkinter.Frame.configure(self.viewport, takefocus=1)  # for Up/Down after a click
        self.viewport.grid(row=1, column=0, sticky="nsew")
        self.viewport.columnconfigure(0, weight=1)
        self.scrollbar = ctk.CTkScrollbar(self, command=self._scrollbar_moved)
        self.scrollbar.grid(row=1, column=1, sticky="ns")
        self.empty_hint = caption(self.viewport, empty_text, wraplength=250, justify="left")
        # the frame's own <Configure> (CTkFrame.bind would bind its drawing canvas)
        tkinter.Misc.bind(self.viewport, "<Configure>", self._resized, add="+")
        self._tag(self.viewport)
        self._tag(self.scrollbar)  # first in its tags: our handler's "break" wins
        self._bind_scrolling()
        self._resize(self.viewport.winfo_height())

    # ------------------------------------------------------------------ input
    def _tag(self, widget: tkinter.Misc) -> None:
        """Give ``widget`` and everything in it the list's wheel and key bindings."""
        tags = widget.bindtags()
        if self._wheel_tag not in tags:
            widget.bindtags((self._wheel_tag, *tags))
        # tkinter's own list: CTkFrame.winfo_children() leaves out its drawing canvas
        for child in tkinter.Misc.winfo_children(widget):
            self._tag(child)

    def _bind_scrolling(self) -> None:
        tag = self._wheel_tag
        self.bind_class(tag, "<Button-4>", lambda e: self._wheel(e, num=4))
        self.bind_class(tag, "<Button-5>", lambda e: self._wheel(e, num=5))
        self.bind_class(tag, "<MouseWheel>", lambda e: self._wheel(e, delta=e.delta))
        for key in ("Up", "Down", "Prior", "Next", "Home", "End"):
            self.bind_class(tag, f"<Key-{key}>", lambda _e, k=key: self._key(k))

    def _wheel(self, _event: Any, *, num: int | None = None, delta: int = 0) -> str:
        rows = wheel_rows(self.tk.call("tk", "windowingsystem"), num=num, delta=delta)
        if rows:
            self.scroll_to(self.top + rows)
        return "break"

    def _key(self, key: str) -> str:
        index = self._index.get(self.selected) if self.selected is not None else None
        new = moved_selection(index, key, len(self.order), self.capacity)
        if new is not None and new != index:
            self.actions.select_image(self.order[new])
        return "break"

    def _clicked(self, row: PoolRow) -> None:
        self.viewport.focus_set()  # so Up/Down move the selection from here
        if row.job_id is not None:
            self.actions.select_image(row.job_id)

    def _scrollbar_moved(self, command: str, *args: Any) -> None:
        if command == "moveto":
            self.scroll_to(moveto(float(args[0]), len(self.order), self.capacity))
        elif command == "scroll":
            self.scroll_to(scrolled(self.top, round(float(args[0])), str(args[1]),
                                    len(self.order), self.capacity))

    def _order_picked(self) -> None:
        self.actions.list_order_changed(self.sort_key, self.state_filter)

    @property
    def sort_key(self) -> str:
        label = self.sort_var.get()
        return next(k for k, v in SORT_LABELS.items() if v == label)

    @property
    def state_filter(self) -> str:
        label = self.filter.get()
        return next((k for k, v in FILTER_LABELS.items() if v == label), "all")

    def set_sort(self, sort_key: str, state_filter: str = "all") -> None:
        """What the menus do, for scripts and tests."""
        self.sort_var.set(SORT_LABELS[sort_key])
        self.filter.set(FILTER_LABELS[state_filter])
        self._order_picked()

    # ------------------------------------------------------------------ geometry
    def _resized(self, event: Any) -> None:
        self._resize(event.height)

    def _resize(self, height: int) -> None:
        capacity = rows_that_fit(max(height, ROW_PX), ROW_PX)
        if capacity == self.capacity and len(self.pool) == capacity:
            return
        self.capacity = capacity
        while len(self.pool) < capacity:
            row = PoolRow(self.viewport, self.actions)
            for widget in (row, row.thumb, row.name, row.status):
                widget.bind("<Button-1>", lambda _e, r=row: self._clicked(r), add="+")
            self._tag(row)
            self.pool.append(row)
        if len(self.pool) > capacity:
            destroy_widgets([self.pool.pop() for _ in range(len(self.pool) - capacity)])
        self.top = clamp_top(self.top, len(self.order), self.capacity)
        self.refresh()

    # ------------------------------------------------------------------ state
    @property
    def window(self) -> Window:
        return Window(self.top, len(self.order), self.capacity)

    def visible_ids(self) -> list[int]:
        return [self.order[i] for i in self.window.visible]

    @property
    def rows(self) -> dict[int, PoolRow]:
        """The row widgets on screen, by the id of the image each shows."""
        return {row.job_id: row for row in self.pool
                if row.job_id is not None and row.winfo_manager()}

    def set_order(self, order: Sequence[int]) -> None:
        """The ids to list, in order (filtered and sorted by the controller)."""
        self.order = list(order)
        self._index = {job_id: i for i, job_id in enumerate(self.order)}
        self.top = clamp_top(self.top, len(self.order), self.capacity)
        self.refresh()

    def index_of(self, job_id: int) -> int | None:
        return self._index.get(job_id)

    def scroll_to(self, top: int) -> None:
        top = clamp_top(top, len(self.order), self.capacity)
        if top != self.top:
            self.top = top
            self.refresh()

    def scroll_to_end(self) -> None:
        self.scroll_to(len(self.order))

    def set_selected(self, job_id: int | None, *, reveal: bool = True) -> None:
        self.selected = job_id
        index = self._index.get(job_id) if job_id is not None else None
        if reveal and index is not None:
            self.top = ensure_visible(index, self.top, len(self.order), self.capacity)
        self.refresh()

    def refresh(self) -> None:
        """Redraw the visible rows (at most ``capacity``), whatever the list's length."""
        self.redraws += 1
        window = self.window
        visible = window.visible
        self.actions.rows_shown([self.order[i] for i in visible])
        for slot, row in enumerate(self.pool):
            index = window.top + slot
            job = self.actions.job_of(self.order[index]) if index in visible else None
            if job is None:
                if row.winfo_manager():
                    row.grid_remove()
                row.job_id = None
                continue
            row.show(job, self.actions.thumbnail_of(job.id), job.id == self.selected)
            if not row.winfo_manager():
                row.grid(row=slot, column=0, sticky="ew", padx=4, pady=(0, ROW_GAP))
        if self.order:
            self.empty_hint.grid_forget()
        else:
            self.empty_hint.configure(text=self.empty_text if self.state_filter == "all"
                                      else f"No {self.state_filter} images.")
            self.empty_hint.grid(row=0, column=0, sticky="ew", padx=8, pady=12)
        self.scrollbar.set(*window.scrollbar())
