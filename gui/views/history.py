"""The History view: past batches from the journal, one page at a time, each with its
counts and the expiry of its links, and buttons to copy the links, download the
results again, resume (when unfinished) or re-run it.

``PAGE_SIZE`` row widgets are built once and re-filled for each page, so the view
costs the same however many batches the journal holds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

import customtkinter as ctk

from gui.history_controller import PAGE_SIZE, Page, row_text
from gui.views.widgets import CARD, MUTED, heading


class HistoryActions(Protocol):
    def older(self) -> None: ...
    def newer(self) -> None: ...
    def shown(self) -> None: ...
    def copy_links(self, index: int) -> None: ...
    def download(self, index: int) -> None: ...
    def resume(self, index: int, *, rerun: bool = False) -> None: ...
    def clear_finished(self) -> None: ...


class _Row(ctk.CTkFrame):
    def __init__(self, master: Any, index: int, controller: HistoryActions) -> None:
        super().__init__(master, fg_color=CARD, corner_radius=6)
        self.columnconfigure(0, weight=1)
        self.label = ctk.CTkLabel(self, text="", anchor="w", justify="left")
        self.label.grid(row=0, column=0, sticky="ew", padx=10, pady=6)
        self.buttons = {
            "resume": ctk.CTkButton(self, text="Resume", width=80,
                                    command=lambda: controller.resume(index)),
            "copy": ctk.CTkButton(self, text="Copy links", width=90,
                                  command=lambda: controller.copy_links(index)),
            "download": ctk.CTkButton(self, text="Download…", width=90,
                                      command=lambda: controller.download(index)),
            "rerun": ctk.CTkButton(self, text="Re-run", width=70,
                                   command=lambda: controller.resume(index, rerun=True)),
        }
        for column, button in enumerate(self.buttons.values(), start=1):
            button.grid(row=0, column=column, padx=(0, 6), pady=4)


class HistoryView(ctk.CTkFrame):
    def __init__(self, master: Any, controller: HistoryActions) -> None:
        super().__init__(master, fg_color="transparent")
        self.controller = controller
        self.columnconfigure(0, weight=1)
        top = ctk.CTkFrame(self)
        top.grid(row=0, column=0, sticky="ew", pady=(0, 8))
        top.columnconfigure(1, weight=1)
        heading(top, "History").grid(row=0, column=0, sticky="w", padx=12, pady=12)
        self.summary = ctk.CTkLabel(top, text="", anchor="w", text_color=MUTED)
        self.summary.grid(row=0, column=1, sticky="ew", padx=12)
        self.newer_button = ctk.CTkButton(top, text="‹ Newer", width=80,
                                          command=controller.newer)
        self.newer_button.grid(row=0, column=2, padx=(0, 6))
        self.older_button = ctk.CTkButton(top, text="Older ›", width=80,
                                          command=controller.older)
        self.older_button.grid(row=0, column=3, padx=(0, 6))
        ctk.CTkButton(top, text="Refresh", width=80, command=controller.shown).grid(
            row=0, column=4, padx=(0, 6))
        ctk.CTkButton(top, text="Clear finished…", width=120,
                      command=controller.clear_finished).grid(row=0, column=5, padx=(0, 12))
        body = ctk.CTkFrame(self, fg_color="transparent")
        body.grid(row=1, column=0, sticky="nsew")
        body.columnconfigure(0, weight=1)
        self.rows = [_Row(body, i, controller) for i in range(PAGE_SIZE)]
        self.page: Page | None = None

    def show_page(self, page: Page | None, summary: str, now: datetime) -> None:
        self.page = page
        self.summary.configure(text=summary)
        batches = page.batches if page is not None else []
        for index, row in enumerate(self.rows):
            if index >= len(batches):
                row.grid_forget()
                continue
            batch = batches[index]
            row.label.configure(text=row_text(batch, now))
            if batch.unfinished:
                row.buttons["resume"].grid()
            else:
                row.buttons["resume"].grid_remove()
            row.grid(row=index, column=0, sticky="ew", pady=(0, 4))
        has_newer = page is not None and page.offset > 0
        has_older = page is not None and page.offset + len(batches) < page.total
        self.newer_button.configure(state="normal" if has_newer else "disabled")
        self.older_button.configure(state="normal" if has_older else "disabled")

    def texts(self) -> list[str]:
        """The rows shown, top to bottom (for tests and screenshots)."""
        return [row.label.cget("text") for row in self.rows if row.winfo_manager()]
