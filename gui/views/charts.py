"""The Fleet view's charts and alerts: drawn on Tk's own Canvas (no plotting library),
from the ``GET /fleet/metrics`` window the controller fetches off the UI thread.

Five small panels over the chosen window (5 min, 15 min, 1 h): throughput, p50/p95
latency, errors and shed per second, healthy vs desired, per-instance load. Colours
follow the appearance mode. :func:`chart_series` and :func:`scale_points` are pure.
"""

from __future__ import annotations

import tkinter as tk
from collections.abc import Callable, Sequence
from typing import Any

import customtkinter as ctk

WINDOWS = {"5 min": 300, "15 min": 900, "1 h": 3600}
PALETTE = {  # (light, dark)
    "bg": ("#ffffff", "#232323"), "fg": ("#1a1a1a", "#e6e6e6"), "grid": ("#e0e0e0", "#3a3a3a"),
    "grid_text": ("#757575", "#9e9e9e"),
    "a": ("#1565c0", "#64b5f6"), "b": ("#ef6c00", "#ffb74d"), "c": ("#c62828", "#ef5350"),
    "d": ("#2e7d32", "#81c784"),
}
LOAD_COLOURS = (("#6a1b9a", "#ce93d8"), ("#00838f", "#4dd0e1"), ("#9e9d24", "#dce775"),
                ("#4e342e", "#bcaaa4"), ("#ad1457", "#f48fb1"), ("#283593", "#9fa8da"))


Panel = tuple[str, list[tuple[str, str, list]]]


def chart_series(samples: Sequence[dict[str, Any]]) -> list[Panel]:
    """Panels as (title, [(label, colour key, [(t, value or None)])]), from the samples."""
    def line(key: str) -> list:
        return [(s["at"], s.get(key)) for s in samples]

    ids = sorted({iid for s in samples for iid in s.get("load", {})})
    load = [(iid, f"load{i % len(LOAD_COLOURS)}",
             [(s["at"], s.get("load", {}).get(iid)) for s in samples]) for i, iid in enumerate(ids)]
    return [
        ("Throughput (images/s)", [("images/s", "a", line("requests_per_s"))]),
        ("Latency (ms)", [("p50", "a", line("p50_ms")), ("p95", "b", line("p95_ms"))]),
        ("Errors and shed (/s)", [("errors", "c", line("errors_per_s")),
                                  ("shed", "b", line("shed_per_s"))]),
        ("Instances", [("healthy", "d", line("healthy")), ("desired", "a", line("desired"))]),
        ("Load per instance (in flight)", load),
    ]


def scale_points(points: Sequence[tuple[float, float | None]], t0: float, t1: float,
                 vmax: float, box: tuple[float, float, float, float]) -> list[list[float]]:
    """Canvas coordinates of a series in ``box`` (x0, y0, x1, y1), split at gaps (None)."""
    x0, y0, x1, y1 = box
    span, top = max(t1 - t0, 1e-9), max(vmax, 1e-9)
    runs: list[list[float]] = [[]]
    for t, v in points:
        if v is None or t < t0:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1] += [x0 + (x1 - x0) * (t - t0) / span, y1 - (y1 - y0) * min(v, top) / top]
    return [r for r in runs if r]


def nice_max(value: float) -> float:
    """The round number (1, 2 or 5 x 10^k) at or above ``value``: the panel's top."""
    for exp in range(-2, 7):
        for step in (1, 2, 5):
            if value <= step * 10 ** exp:
                return float(step * 10 ** exp)
    return value


class FleetCharts(ctk.CTkFrame):
    def __init__(self, master: Any, on_window: Callable[[int], None],
                 on_show_events: Callable[[Sequence[dict[str, Any]]], None] = lambda _e: None,
                 ) -> None:
        super().__init__(master)
        self._on_window = on_window
        self._on_show_events = on_show_events
        self._alert_keys: tuple[tuple[str, str, int], ...] = ()
        self.seconds = 900
        self._body: dict[str, Any] | None = None
        self.columnconfigure(0, weight=1)
        bar = ctk.CTkFrame(self, fg_color="transparent")
        bar.grid(row=0, column=0, sticky="ew", padx=8, pady=(8, 0))
        bar.columnconfigure(1, weight=1)
        ctk.CTkLabel(bar, text="Metrics", font=ctk.CTkFont(size=15, weight="bold")).grid(
            row=0, column=0, sticky="w", padx=4)
        self.selector = ctk.CTkSegmentedButton(bar, values=list(WINDOWS),
                                               command=self._choose)
        self.selector.set("15 min")
        self.selector.grid(row=0, column=2, sticky="e")
        self.canvas = tk.Canvas(self, height=205, highlightthickness=0, borderwidth=0)
        self.canvas.grid(row=1, column=0, sticky="ew", padx=8, pady=6)
        self.canvas.bind("<Configure>", lambda _e: self.redraw())
        self.alerts = ctk.CTkLabel(self, text="", anchor="w", justify="left", wraplength=900)
        self.alerts.grid(row=2, column=0, sticky="ew", padx=12, pady=(0, 4))
        # One button per alert that has events: it marks them in the Events log.
        self.alert_links = ctk.CTkFrame(self, fg_color="transparent")
        self.alert_links.grid(row=3, column=0, sticky="w", padx=8, pady=(0, 6))
        self.drawn_items = 0

    def _choose(self, label: str) -> None:
        self.seconds = WINDOWS[label]
        if self.selector.get() != label:  # chosen by code, not by a click
            self.selector.set(label)
        self.redraw()
        self._on_window(self.seconds)

    def _colour(self, key: str) -> str:
        dark = ctk.get_appearance_mode() == "Dark"
        pair = LOAD_COLOURS[int(key[4:])] if key.startswith("load") else PALETTE[key]
        return pair[1] if dark else pair[0]

    def show(self, body: dict[str, Any]) -> None:
        self._body = body
        self.redraw()
        alerts = body.get("alerts", [])
        if alerts:
            lines = []
            for a in alerts:
                behind = "; ".join(f"{e['at'][11:19]} {e['kind']} {e['instance_id'] or ''}"
                                   for e in a.get("events", [])[-3:])
                lines.append(f"⚠ {a['message']}" + (f"  (events: {behind})" if behind else ""))
            self.alerts.configure(text="\n".join(lines), text_color=self._colour("c"))
        else:
            self.alerts.configure(text="No alerts.", text_color=self._colour("fg"))
        self._show_links(alerts)

    def _show_links(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Rebuilt only when the alerts change, not on every refresh."""
        keys = tuple((a["kind"], a["message"], len(a.get("events", []))) for a in alerts)
        if keys == self._alert_keys:
            return
        self._alert_keys = keys
        for child in self.alert_links.winfo_children():
            child.destroy()
        for n, alert in enumerate(a for a in alerts if a.get("events")):
            count = len(alert["events"])
            ctk.CTkButton(
                self.alert_links, height=24, width=10,
                text=f"Show the {count} event{'s' if count != 1 else ''} behind: "
                     f"{alert['kind'].replace('_', ' ')}",
                command=lambda events=alert["events"]: self._on_show_events(events),
            ).grid(row=0, column=n, padx=4)

    def link_buttons(self) -> list[Any]:
        return list(self.alert_links.winfo_children())

    def redraw(self) -> None:
        c = self.canvas
        c.delete("all")
        c.configure(background=self._colour("bg"))
        width, height = max(c.winfo_width(), 300), max(c.winfo_height(), 120)
        body = self._body
        if body is None:
            c.create_text(width / 2, height / 2, text="waiting for metrics…",
                          fill=self._colour("fg"))
            self.drawn_items = len(c.find_all())
            return
        now = body.get("now", 0.0)
        t0 = now - self.seconds
        samples = [s for s in body.get("samples", []) if s["at"] > t0]
        panels = chart_series(samples)
        pw = width / len(panels)
        font = (ctk.CTkFont().cget("family"), -11)
        span = next(label for label, secs in WINDOWS.items() if secs == self.seconds)
        for i, (title, lines) in enumerate(panels):
            box = (i * pw + 34, 22, (i + 1) * pw - 8, height - 44)
            values = [v for _l, _k, pts in lines for _t, v in pts if v is not None]
            top = max(values, default=0.0)
            if title == "Instances":
                top += 1  # counts sit below the frame's edge, where they can be seen
            vmax = nice_max(top or 1.0)
            c.create_text(i * pw + 8, 8, text=title, anchor="nw", fill=self._colour("fg"),
                          font=(font[0], -12, "bold"))
            c.create_rectangle(*box, outline=self._colour("grid"))
            c.create_text(box[0] - 4, box[1], text=f"{vmax:g}", anchor="ne",
                          fill=self._colour("fg"), font=font)
            c.create_text(box[0] - 4, box[3], text="0", anchor="se", fill=self._colour("fg"),
                          font=font)
            middle = (box[1] + box[3]) / 2
            c.create_line(box[0], middle, box[2], middle, fill=self._colour("grid"), dash=(2, 3))
            # the time axis: the window's start and now
            c.create_text(box[0], box[3] + 2, text=f"-{span}", anchor="nw",
                          fill=self._colour("grid_text"), font=font)
            c.create_text(box[2], box[3] + 2, text="now", anchor="ne",
                          fill=self._colour("grid_text"), font=font)
            legend_x = box[0]
            for n, (label, key, pts) in enumerate(lines):
                # a second line of a panel is dashed, so two equal series both show
                dash = (5, 3) if n == 1 and title == "Instances" else ()
                for run in scale_points(pts, t0, now, vmax, box):
                    if len(run) >= 4:
                        c.create_line(*run, fill=self._colour(key), width=2, dash=dash)
                    else:
                        c.create_oval(run[0] - 2, run[1] - 2, run[0] + 2, run[1] + 2,
                                      fill=self._colour(key), outline="")
                c.create_text(legend_x, box[3] + 18, text=label, anchor="nw",
                              fill=self._colour(key), font=font)
                legend_x += 8 + 7 * len(label)
        self.drawn_items = len(c.find_all())
