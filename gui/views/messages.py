"""The message area under the header: the recent messages of ``gui.messages``, newest
first, each with its own ✕ and maybe an action button ("Copy link", "Restart").

A fixed number of rows is built once and reconfigured on every change, so showing a
message costs the same whatever happened before. Text wraps to the area's width (no
clipping): the wrap length follows the area's ``<Configure>`` events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import customtkinter as ctk

from gui.messages import MAX_MESSAGES, Level, Message

COLOURS = {Level.ERROR: ("#c62828", "#8e1b1b"), Level.INFO: ("#2e6bb0", "#1f538d"),
           Level.NOTICE: ("#2f7d6d", "#1e5a4e")}
BUTTONS_WIDTH = 190  # room kept at the right of the text for the action and ✕ buttons


class _Row(ctk.CTkFrame):
    def __init__(self, master: Any, on_dismiss: Callable[[int], None],
                 on_action: Callable[[int], None]) -> None:
        super().__init__(master, corner_radius=6)
        self.message_id = 0
        self.columnconfigure(0, weight=1)
        self.label = ctk.CTkLabel(self, text="", anchor="w", justify="left",
                                  wraplength=1000, text_color="#ffffff")
        self.label.grid(row=0, column=0, sticky="ew", padx=12, pady=5)
        self.action_button = ctk.CTkButton(
            self, text="", width=90, height=24, fg_color=("gray95", "gray85"),
            text_color="#1a1a1a", hover_color=("gray85", "gray75"),
            command=lambda: on_action(self.message_id))
        self.dismiss_button = ctk.CTkButton(
            self, text="✕", width=28, height=24, fg_color="transparent", text_color="#ffffff",
            hover_color=("gray40", "gray30"), command=lambda: on_dismiss(self.message_id))
        self.dismiss_button.grid(row=0, column=2, padx=(0, 6))

    def show(self, message: Message) -> None:
        self.message_id = message.id
        self.configure(fg_color=COLOURS[message.level])
        self.label.configure(text=message.text)
        if message.action:
            self.action_button.configure(text=message.action)
            self.action_button.grid(row=0, column=1, padx=(6, 4), pady=4)
        else:
            self.action_button.grid_forget()


class MessageArea(ctk.CTkFrame):
    """Shows up to ``MAX_MESSAGES`` messages; hidden (by its owner) when there is none."""

    def __init__(self, master: Any, on_dismiss: Callable[[int], None],
                 on_action: Callable[[int], None]) -> None:
        super().__init__(master, fg_color="transparent")
        self.columnconfigure(0, weight=1)
        self.rows = [_Row(self, on_dismiss, on_action) for _ in range(MAX_MESSAGES)]
        self._wrap = 0
        self.bind("<Configure>", self._resized)

    def show(self, messages: Sequence[Message]) -> None:
        for index, row in enumerate(self.rows):
            if index < len(messages):
                row.show(messages[index])
                row.grid(row=index, column=0, sticky="ew", pady=(0 if index == 0 else 4, 0))
            else:
                row.grid_forget()

    def _resized(self, event: Any) -> None:
        # CTk scales the wrap length it is given; the event's width is in pixels
        wrap = max(200, int(event.width / self._get_widget_scaling()) - BUTTONS_WIDTH)
        if abs(wrap - self._wrap) < 8:
            return  # ignore the tiny changes of a drag-resize in progress
        self._wrap = wrap
        for row in self.rows:
            row.label.configure(wraplength=wrap)

    def texts(self) -> list[str]:
        """What the visible rows say, top to bottom (for tests and screenshots)."""
        return [row.label.cget("text") for row in self.rows if row.winfo_manager()]
