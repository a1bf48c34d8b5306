"""The Fleet view: instances table, totals, events log, set desired, terminate."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from tkinter import ttk
from typing import Any, Protocol

import customtkinter as ctk

from gui.viewmodel.fleet import (
    HEALTH_COLOURS,
    event_lines,
    fleet_rows,
    fleet_totals,
    marked_lines,
)
from gui.views.widgets import CARD, ERROR, MUTED, heading
from server.api import FleetEvent, FleetState

ALERT_TAG = "alert_event"
ALERT_BACKGROUND = ("#fff3c4", "#5c4a00")  # (light, dark)
COLUMNS = (("id", "Instance", 220), ("state", "State", 120), ("health", "Health", 120),
           ("address", "Address", 220), ("inflight", "In flight", 100), ("uptime", "Uptime", 120))


class FleetActions(Protocol):
    def set_desired(self, text: str) -> None: ...
    def terminate_instance(self, instance_id: str) -> None: ...
    def refresh_fleet(self) -> None: ...


class FleetView(ctk.CTkFrame):
    def __init__(self, master: Any, controller: FleetActions) -> None:
        super().__init__(master, fg_color="transparent")
        self.controller = controller
        self.columnconfigure(0, weight=1)
        self.rowconfigure(2, weight=3)
        self.rowconfigure(3, weight=2)
        self._known_rows: set[str] = set()
        self._health: dict[str, str] = {}
        self._marked: list[str] = []  # the log lines of the alert last asked about

        top = ctk.CTkFrame(self)
        top.grid(row=0, column=0, sticky="ew", pady=(0, 8))
        top.columnconfigure(1, weight=1)
        self.title = heading(top, "Fleet")
        self.title.grid(row=0, column=0, sticky="w", padx=12, pady=(12, 0))
        self.totals = ctk.CTkLabel(top, text="waiting for the fleet…", anchor="w",
                                   font=ctk.CTkFont(size=14))
        self.totals.grid(row=1, column=0, sticky="w", padx=12, pady=(0, 12))
        controls = ctk.CTkFrame(top, fg_color="transparent")
        controls.grid(row=0, column=2, rowspan=2, sticky="e", padx=12, pady=12)
        ctk.CTkLabel(controls, text="Desired").grid(row=0, column=0, padx=(0, 6))
        self.desired_entry = ctk.CTkEntry(controls, width=60, justify="center")
        self.desired_entry.grid(row=0, column=1)
        self.desired_entry.bind("<Return>", lambda _e: self._apply_desired())
        self.apply_button = ctk.CTkButton(controls, text="Set", width=60,
                                          command=self._apply_desired)
        self.apply_button.grid(row=0, column=2, padx=(6, 16))
        self.terminate_button = ctk.CTkButton(
            controls, text="Terminate selected…", width=150, fg_color=("#c62828", "#b71c1c"),
            hover_color=("#a51f1f", "#8e1515"), command=self._terminate_selected)
        self.terminate_button.grid(row=0, column=3)
        self.message = ctk.CTkLabel(top, text="", anchor="w", text_color=MUTED)
        self.message.grid(row=1, column=1, sticky="ew", padx=12, pady=(0, 12))

        from gui.views.charts import FleetCharts
        self.charts = FleetCharts(self, getattr(controller, "metrics_window", lambda _s: None),
                                  self.show_alert_events)
        self.charts.grid(row=1, column=0, sticky="ew", pady=(0, 8))

        table_card = ctk.CTkFrame(self)
        table_card.grid(row=2, column=0, sticky="nsew", pady=(0, 8))
        table_card.columnconfigure(0, weight=1)
        table_card.rowconfigure(0, weight=1)
        self.style = ttk.Style(self)
        self.table = ttk.Treeview(table_card, columns=[c[0] for c in COLUMNS], show="headings",
                                  selectmode="browse", style="Fleet.Treeview")
        for key, title, width in COLUMNS:
            self.table.heading(key, text=title, anchor="w")
            self.table.column(key, width=width, minwidth=width, anchor="w",
                              stretch=key in ("id", "address"))
        self.table.grid(row=0, column=0, sticky="nsew", padx=8, pady=8)
        scroll = ctk.CTkScrollbar(table_card, command=self.table.yview)
        scroll.grid(row=0, column=1, sticky="ns", pady=8)
        self.table.configure(yscrollcommand=scroll.set)

        log_card = ctk.CTkFrame(self)
        log_card.grid(row=3, column=0, sticky="nsew")
        log_card.columnconfigure(0, weight=1)
        log_card.rowconfigure(1, weight=1)
        heading(log_card, "Events").grid(row=0, column=0, sticky="w", padx=12, pady=(10, 4))
        self.events = ctk.CTkTextbox(log_card, font=ctk.CTkFont(family="monospace", size=12),
                                     fg_color=CARD, wrap="none")
        self.events.grid(row=1, column=0, sticky="nsew", padx=8, pady=(0, 8))
        self.events.configure(state="disabled")
        self.apply_theme()

    def apply_theme(self) -> None:
        """ttk does not follow CustomTkinter's appearance mode; style it to match."""
        dark = ctk.get_appearance_mode() == "Dark"
        bg, fg, head_bg, sel = (("#2b2b2b", "#e6e6e6", "#333333", "#1f538d") if dark
                                else ("#f7f7f7", "#1a1a1a", "#e3e3e3", "#3a7ebf"))
        family = ctk.CTkFont().cget("family")
        self.style.theme_use("default")
        # negative sizes are pixels, matching CustomTkinter's own fonts
        self.style.configure("Fleet.Treeview", background=bg, fieldbackground=bg, foreground=fg,
                             rowheight=30, borderwidth=0, font=(family, -14))
        self.style.configure("Fleet.Treeview.Heading", background=head_bg, foreground=fg,
                             relief="flat", font=(family, -14, "bold"), padding=(6, 6))
        self.style.map("Fleet.Treeview", background=[("selected", sel)],
                       foreground=[("selected", "#ffffff")])
        for health, (light, dark_colour) in HEALTH_COLOURS.items():
            self.table.tag_configure(health, foreground=dark_colour if dark else light)
        if hasattr(self, "charts"):
            self.charts.redraw()

    # -- state
    def show_state(self, state: FleetState, now: datetime) -> None:
        totals = fleet_totals(state)
        provider, name = state.provider, state.name
        self.title.configure(text=f"Fleet · {name} ({provider})" if name else "Fleet")
        self.totals.configure(text=totals.text, text_color=("gray10", "gray90"))
        if not self._editing_desired():
            self.desired_entry.delete(0, "end")
            self.desired_entry.insert(0, str(totals.desired))
        self._minmax = (totals.minimum, totals.maximum)
        rows = fleet_rows(state.instances, now)
        seen = set()
        for row in rows:
            values = (row.id, row.state, row.health, row.address, row.inflight, row.uptime)
            if row.id in self._known_rows:
                self.table.item(row.id, values=values, tags=(row.health,))
            else:
                self.table.insert("", "end", iid=row.id, values=values, tags=(row.health,))
                self._known_rows.add(row.id)
            seen.add(row.id)
        for gone in self._known_rows - seen:
            self.table.delete(gone)
        self._known_rows = seen
        self._health = {row.id: row.health for row in rows}
        self._set_events(event_lines(state.events))

    def _editing_desired(self) -> bool:
        """True while the user types a count, so a refresh does not overwrite it."""
        try:
            focused = self.focus_get()
        except KeyError:  # Tk raises this while a dropdown's popup has the focus
            return False
        return focused is not None and str(focused).startswith(str(self.desired_entry))

    def _set_events(self, lines: list[str]) -> None:
        text = "\n".join(lines) if lines else "No events yet."
        if self.events.get("1.0", "end-1c") == text:
            return
        self.events.configure(state="normal")
        self.events.delete("1.0", "end")
        self.events.insert("1.0", text)
        self.events.configure(state="disabled")
        self._mark(self._marked)  # a rewritten log keeps the alert's events marked

    def show_alert_events(self, events: Sequence[dict[str, Any]]) -> None:
        """Mark an alert's events in the Events log and scroll to the newest of them."""
        wanted = event_lines(FleetEvent.model_validate(e) for e in events)
        self._marked = wanted
        found = self._mark(wanted)
        if found:
            self.events.see(f"{found[0]}.0")
        missing = len(wanted) - len(found)
        self.show_message(f"{len(found)} event(s) marked in the log" + (
            f"; {missing} no longer in it" if missing else ""))

    def _mark(self, wanted: list[str]) -> list[int]:
        """Tag the log's lines that are ``wanted``; their line numbers."""
        box = self.events
        box.tag_remove(ALERT_TAG, "1.0", "end")
        box.tag_config(ALERT_TAG, background=ALERT_BACKGROUND[ctk.get_appearance_mode() == "Dark"])
        found = marked_lines(box.get("1.0", "end-1c").split("\n"), wanted)
        for line in found:
            box.tag_add(ALERT_TAG, f"{line}.0", f"{line}.end")
        return found

    def marked_event_lines(self) -> list[str]:
        ranges = self.events.tag_ranges(ALERT_TAG)
        return [self.events.get(start, end) for start, end in zip(ranges[::2], ranges[1::2],
                                                                   strict=True)]

    def show_metrics(self, body: dict[str, Any]) -> None:
        self.charts.show(body)

    def show_unavailable(self, message: str) -> None:
        self.totals.configure(text=message, text_color=ERROR)

    def show_message(self, text: str, error: bool = False) -> None:
        self.message.configure(text=text, text_color=ERROR if error else MUTED)

    def instance_ids(self) -> list[str]:
        return list(self.table.get_children())

    def health_of(self, instance_id: str) -> str | None:
        return self._health.get(instance_id)

    def selected_instance(self) -> str | None:
        selection = self.table.selection()
        return selection[0] if selection else None

    def select_instance(self, instance_id: str) -> None:
        self.table.selection_set(instance_id)

    # -- actions
    def _apply_desired(self) -> None:
        self.controller.set_desired(self.desired_entry.get())

    def _terminate_selected(self) -> None:
        instance_id = self.selected_instance()
        if instance_id is None:
            self.show_message("Select an instance in the table first.", error=True)
            return
        self.controller.terminate_instance(instance_id)
