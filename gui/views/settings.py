"""The Settings view: endpoint, token, link lifetime, concurrency, appearance, the
embedded fleet (size, port, S3 storage, local storage caps), the output rules
(conflict policy, result names) and how long the History keeps batches. Validation
is ``gui.settings.parse_settings``; this view only collects the raw values and shows
the problems."""

from __future__ import annotations

from typing import Any, Protocol

import customtkinter as ctk

from gui.output_rules import FIELDS
from gui.settings import (
    CONCURRENCY_RANGE,
    FLEET_SIZE_RANGE,
    HISTORY_DAYS_RANGE,
    LINK_TTL_MAX_S,
    PORT_RANGE,
    STORAGE_MAX_AGE_DAYS_RANGE,
    STORAGE_MAX_MB_RANGE,
    Settings,
)
from gui.views.widgets import ERROR, MUTED, Spinbox, caption, heading

APPEARANCE_LABELS = {"system": "System", "light": "Light", "dark": "Dark"}
# the same words as the Process view's menu beside Save all
ON_CONFLICT_LABELS = {"unique": "add -2, -3…", "overwrite": "overwrite", "skip": "skip"}
TTL_UNITS = {"minutes": 60, "hours": 3600, "days": 86400}


class SettingsActions(Protocol):
    def apply_settings(self, raw: dict[str, Any]) -> None: ...
    def clear_storage(self) -> None: ...


def ttl_to_form(seconds: int) -> tuple[str, str]:
    """The largest unit that shows the lifetime as a whole number."""
    for unit in ("days", "hours", "minutes"):
        if seconds % TTL_UNITS[unit] == 0:
            return str(seconds // TTL_UNITS[unit]), unit
    return str(round(seconds / 60)), "minutes"


class SettingsView(ctk.CTkFrame):
    def __init__(self, master: Any, controller: SettingsActions) -> None:
        super().__init__(master, fg_color="transparent")
        self.controller = controller
        self.columnconfigure(0, weight=1)
        card = ctk.CTkFrame(self)
        card.grid(row=0, column=0, sticky="nw", ipadx=12, ipady=8)
        card.columnconfigure(1, weight=1)
        heading(card, "Settings").grid(row=0, column=0, columnspan=3, sticky="w", padx=16,
                                       pady=(14, 2))
        self.path_label = caption(card, "")
        self.path_label.grid(row=1, column=0, columnspan=3, sticky="w", padx=16, pady=(0, 10))

        def row(index: int, label: str, widget: Any, hint: str = "") -> None:
            ctk.CTkLabel(card, text=label, anchor="w", width=150).grid(
                row=index, column=0, sticky="w", padx=(16, 8), pady=6)
            widget.grid(row=index, column=1, sticky="w", pady=6)
            if hint:
                caption(card, hint, wraplength=330, justify="left").grid(
                    row=index, column=2, sticky="w", padx=(12, 16))

        self.endpoint = ctk.CTkEntry(card, width=360,
                                     placeholder_text="empty: embedded local fleet")
        row(2, "Endpoint", self.endpoint,
            "Load balancer URL, e.g. http://my-alb.example.com. Leave empty to run a local "
            "fleet on this computer.")
        self.admin = ctk.CTkEntry(card, width=360, placeholder_text="same as the endpoint")
        row(3, "Fleet admin URL", self.admin,
            "Where the fleet's /fleet API is served, if not at the endpoint (a manager "
            "run on a laptop). An AWS fleet serves it at the endpoint.")
        self.token = ctk.CTkEntry(card, width=360, show="•", placeholder_text="none")
        row(4, "Token", self.token, "Sent as a Bearer token when the servers need one.")
        self.admin_token = ctk.CTkEntry(card, width=360, show="•",
                                        placeholder_text="the token above")
        row(5, "Admin token", self.admin_token,
            "The fleet's admin token, for the Fleet view of an AWS fleet (its admin has "
            "it); empty: the token above is sent.")
        self.ca_file = ctk.CTkEntry(card, width=360, placeholder_text="the system's trust")
        row(6, "Certificate file", self.ca_file,
            "A PEM file: the only certificate the endpoint is trusted with (the fleet's "
            "self-signed one, written by bootstrap_aws up).")
        ttl = ctk.CTkFrame(card, fg_color="transparent")
        self.ttl_value = ctk.CTkEntry(ttl, width=80, justify="center")
        self.ttl_value.grid(row=0, column=0)
        self.ttl_unit = ctk.CTkOptionMenu(ttl, values=list(TTL_UNITS), width=110)
        self.ttl_unit.grid(row=0, column=1, padx=(8, 0))
        row(7, "Link lifetime", ttl,
            f"How long shared links work (1 minute to {LINK_TTL_MAX_S // 86400} days).")
        self.concurrency = Spinbox(card, step=1, value=4, minimum=CONCURRENCY_RANGE[0],
                                   maximum=CONCURRENCY_RANGE[1], width=130)
        row(8, "Concurrency", self.concurrency,
            f"Images processed at once ({CONCURRENCY_RANGE[0]}–{CONCURRENCY_RANGE[1]}).")
        self.appearance = ctk.CTkSegmentedButton(card, values=list(APPEARANCE_LABELS.values()))
        row(9, "Appearance", self.appearance)
        local = ctk.CTkFrame(card, fg_color="transparent")
        self.fleet_size = Spinbox(local, step=1, value=2, minimum=FLEET_SIZE_RANGE[0],
                                  maximum=FLEET_SIZE_RANGE[1], width=130)
        self.fleet_size.grid(row=0, column=0)
        ctk.CTkLabel(local, text="workers, port").grid(row=0, column=1, padx=8)
        self.local_port = Spinbox(local, step=1, value=8765, minimum=PORT_RANGE[0],
                                  maximum=PORT_RANGE[1], width=130)
        self.local_port.grid(row=0, column=2)
        row(10, "Local fleet size", local,
            f"The embedded fleet's workers ({FLEET_SIZE_RANGE[0]}–{FLEET_SIZE_RANGE[1]}) "
            "and port (0: any free one; a fixed one keeps its links working after a "
            "restart). Used when the endpoint is empty.")
        s3 = ctk.CTkFrame(card, fg_color="transparent")
        self.s3_bucket = ctk.CTkEntry(s3, width=170, placeholder_text="bucket: none")
        self.s3_bucket.grid(row=0, column=0)
        self.s3_region = ctk.CTkEntry(s3, width=100, placeholder_text="region")
        self.s3_region.grid(row=0, column=1, padx=(8, 0))
        self.s3_prefix = ctk.CTkEntry(s3, width=74, placeholder_text="prefix")
        self.s3_prefix.grid(row=0, column=2, padx=(8, 0))
        row(11, "Results in S3", s3,
            "With a bucket, the embedded fleet's links open anywhere (AWS credentials "
            "from the standard chain, never kept here). Without: this computer only.")
        self._conflict_by_label = {label: value for value, label in ON_CONFLICT_LABELS.items()}
        self.on_conflict = ctk.CTkOptionMenu(card, values=list(ON_CONFLICT_LABELS.values()),
                                             width=130)
        row(12, "When a name is taken", self.on_conflict,
            "Save all and recipe outputs: add -2, -3… to the new file's name, overwrite "
            "the old file, or skip the new one.")
        self.name_template = ctk.CTkEntry(card, width=360)
        row(13, "Result names", self.name_template,
            "Save all's file names, from " + " ".join("{" + f + "}" for f in FIELDS)
            + " ({n:04}: the image's number, zero-padded).")
        storage = ctk.CTkFrame(card, fg_color="transparent")
        self.storage_used = ctk.CTkLabel(storage, text="…", anchor="w", width=130)
        self.storage_used.grid(row=0, column=0)
        self.clear_button = ctk.CTkButton(storage, text="Clear", width=80,
                                          command=controller.clear_storage)
        self.clear_button.grid(row=0, column=1, padx=(8, 0))
        ctk.CTkLabel(storage, text="keep at most").grid(row=0, column=2, padx=(16, 8))
        self.storage_max_mb = Spinbox(storage, step=100, value=500,
                                      minimum=STORAGE_MAX_MB_RANGE[0],
                                      maximum=STORAGE_MAX_MB_RANGE[1], width=130)
        self.storage_max_mb.grid(row=0, column=3)
        ctk.CTkLabel(storage, text="MB for").grid(row=0, column=4, padx=8)
        self.storage_max_age_days = Spinbox(storage, step=1, value=7,
                                            minimum=STORAGE_MAX_AGE_DAYS_RANGE[0],
                                            maximum=STORAGE_MAX_AGE_DAYS_RANGE[1], width=110)
        self.storage_max_age_days.grid(row=0, column=5)
        ctk.CTkLabel(storage, text="days").grid(row=0, column=6, padx=(8, 0))
        row(14, "Local storage", storage,
            "The embedded fleet's results here; past the size or age (0: no limit) the "
            "oldest go. Clear removes them all: their links stop working.")
        history = ctk.CTkFrame(card, fg_color="transparent")
        self.history_days = Spinbox(history, step=30, value=90,
                                    minimum=HISTORY_DAYS_RANGE[0],
                                    maximum=HISTORY_DAYS_RANGE[1], width=130)
        self.history_days.grid(row=0, column=0)
        ctk.CTkLabel(history, text="days").grid(row=0, column=1, padx=(8, 0))
        row(15, "Keep history", history,
            "Finished batches older than this leave the History at the next start (0: "
            "kept for ever); unfinished ones stay. Results and links are not touched.")
        buttons = ctk.CTkFrame(card, fg_color="transparent")
        buttons.grid(row=16, column=0, columnspan=3, sticky="w", padx=16, pady=(14, 4))
        self.save_button = ctk.CTkButton(buttons, text="Save and reconnect", width=160,
                                         command=self._save)
        self.save_button.grid(row=0, column=0)
        self.message = ctk.CTkLabel(card, text="", anchor="w", justify="left", wraplength=760)
        self.message.grid(row=17, column=0, columnspan=3, sticky="w", padx=16, pady=(4, 8))

    def show(self, settings: Settings, path: str, overridden: str = "") -> None:
        self.path_label.configure(text=f"Kept in {path}" + (f" · {overridden}"
                                                               if overridden else ""))
        for entry, value in ((self.endpoint, settings.endpoint), (self.token, settings.token),
                             (self.admin, settings.admin_endpoint),
                             (self.admin_token, settings.admin_token),
                             (self.ca_file, settings.ca_file),
                             (self.s3_bucket, settings.s3_bucket),
                             (self.s3_region, settings.s3_region),
                             (self.s3_prefix, settings.s3_prefix)):
            if entry.get() != value:  # an untouched empty entry keeps its placeholder
                entry.delete(0, "end")
                if value:
                    entry.insert(0, value)
        value, unit = ttl_to_form(settings.link_ttl_s)
        self.ttl_value.delete(0, "end")
        self.ttl_value.insert(0, value)
        self.ttl_unit.set(unit)
        self.concurrency.set(settings.concurrency)
        self.appearance.set(APPEARANCE_LABELS.get(settings.appearance, "System"))
        self.fleet_size.set(settings.fleet_size)
        self.local_port.set(settings.local_port)
        self.storage_max_mb.set(settings.storage_max_mb)
        self.storage_max_age_days.set(settings.storage_max_age_days)
        self.history_days.set(settings.history_days)
        self.set_on_conflict(settings.on_conflict)
        self.name_template.delete(0, "end")
        self.name_template.insert(0, settings.name_template)

    def set_on_conflict(self, value: str) -> None:
        """Follow the Process view's menu (one setting, shown in both places)."""
        self.on_conflict.set(ON_CONFLICT_LABELS.get(value, ON_CONFLICT_LABELS["unique"]))

    def raw_values(self) -> dict[str, Any]:
        """The form as raw values for ``parse_settings``; a bad lifetime stays raw text so
        the validation message names it."""
        ttl_text = self.ttl_value.get().strip()
        try:
            ttl: Any = round(float(ttl_text) * TTL_UNITS[self.ttl_unit.get()])
        except ValueError:
            ttl = ttl_text
        appearance = {v: k for k, v in APPEARANCE_LABELS.items()}.get(self.appearance.get(),
                                                                      "system")
        return {
            "endpoint": self.endpoint.get(),
            "admin_endpoint": self.admin.get(),
            "token": self.token.get(),
            "admin_token": self.admin_token.get(),
            "ca_file": self.ca_file.get(),
            "link_ttl_s": ttl,
            "concurrency": self.concurrency.get(),
            "appearance": appearance,
            "fleet_size": self.fleet_size.get(),
            "local_port": self.local_port.get(),
            "s3_bucket": self.s3_bucket.get(),
            "s3_region": self.s3_region.get(),
            "s3_prefix": self.s3_prefix.get(),
            "storage_max_mb": self.storage_max_mb.get(),
            "storage_max_age_days": self.storage_max_age_days.get(),
            "history_days": self.history_days.get(),
            "on_conflict": self._conflict_by_label.get(self.on_conflict.get(), "unique"),
            "name_template": self.name_template.get(),
        }

    def show_storage_used(self, used_bytes: int) -> None:
        self.storage_used.configure(text=f"{used_bytes / 2**20:.1f} MB used")

    def _save(self) -> None:
        self.controller.apply_settings(self.raw_values())

    def show_message(self, text: str, error: bool = False) -> None:
        self.message.configure(text=text, text_color=ERROR if error else MUTED)
