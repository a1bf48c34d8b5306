"""The Fleet view's charts under Xvfb: drawn from a metrics window, in light and dark,
and the pure geometry behind them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gui.viewmodel.fleet import marked_lines
from gui.views.charts import WINDOWS, chart_series, nice_max, scale_points

pytestmark = pytest.mark.gui


def window(now: float = 10_000.0, n: int = 200) -> dict[str, Any]:
    samples = [{"at": now - 5 * (n - i), "requests_per_s": 3.0 + i % 7, "errors_per_s": 0.1,
                "shed_per_s": 0.5 if i > 150 else 0.0, "p50_ms": 40.0 + i % 5,
                "p95_ms": None if i == 100 else 120.0, "desired": 3, "healthy": 2 + (i > 20),
                "instances": 3, "load": {"w1": i % 4, "w2": 2, "w3": 1}} for i in range(n)]
    return {"interval_s": 5.0, "now": now, "seconds": 3600, "samples": samples,
            "alerts": [{"kind": "shedding", "severity": "warning",
                        "message": "20% of requests shed for 5 minutes: raise max",
                        "events": [{"at": "2026-12-03T08:00:00Z", "kind": "scale_out",
                                    "instance_id": None, "message": "x"}]}],
            "events": []}


def test_scale_points_split_at_gaps_and_clip() -> None:
    runs = scale_points([(0, 1), (5, None), (10, 2), (20, 5)], 0, 20, 4, (0, 0, 100, 40))
    assert runs == [[0.0, 30.0], [50.0, 20.0, 100.0, 0.0]]
    assert nice_max(3.2) == 5 and nice_max(0.04) == 0.05 and nice_max(120) == 200
    titles = [title for title, _lines in chart_series(window()["samples"])]
    assert len(titles) == 5 and "Load per instance (in flight)" in titles


def test_marked_lines_match_each_wanted_line_once() -> None:
    log = ["a", "b", "a", "c"]
    assert marked_lines(log, ["a", "c"]) == [1, 4]
    assert marked_lines(log, ["a", "a", "a"]) == [1, 3]
    assert marked_lines(log, ["z"]) == []


@pytest.mark.parametrize("mode", ["Light", "Dark"])
def test_charts_render_with_data(x_display: str, mode: str) -> None:
    import customtkinter as ctk

    from gui.views.fleet import FleetView
    from server.api import FleetEvent, FleetState

    class Controller:
        def __init__(self) -> None:
            self.windows: list[int] = []

        def set_desired(self, text: str) -> None: ...
        def terminate_instance(self, instance_id: str) -> None: ...
        def refresh_fleet(self) -> None: ...

        def metrics_window(self, seconds: int) -> None:
            self.windows.append(seconds)

    ctk.set_appearance_mode(mode)
    root = ctk.CTk()
    try:
        root.geometry("1200x800")
        controller = Controller()
        view = FleetView(root, controller)
        view.pack(fill="both", expand=True)
        root.update()
        view.show_metrics(window())
        root.update()
        charts = view.charts
        assert charts.canvas.winfo_width() > 600
        assert charts.drawn_items > 40  # 5 panels: frames, labels, legends, lines
        lines = [i for i in charts.canvas.find_all() if charts.canvas.type(i) == "line"]
        assert len(lines) >= 8  # p95 has a gap: two runs
        colours = {charts.canvas.itemcget(i, "fill") for i in lines}
        assert ("#64b5f6" in colours) == (mode == "Dark")
        assert charts.canvas.cget("background") == ("#232323" if mode == "Dark" else "#ffffff")
        assert "raise max" in charts.alerts.cget("text")
        assert "scale_out" in charts.alerts.cget("text")
        for label, seconds in WINDOWS.items():
            charts._choose(label)
            root.update()
            assert charts.seconds == seconds and charts.drawn_items > 30
        assert controller.windows == [300, 900, 3600]
        # The alert's button marks its events in the Events log (the line, not a copy).
        state = FleetState.model_validate({
            "name": "t", "provider": "local", "desired": 3, "min": 1, "max": 4,
            "instances": [], "events": [
                {"at": "2026-12-03T07:59:00Z", "kind": "launched", "instance_id": "w1",
                 "message": "1 of 3"},
                {"at": "2026-12-03T08:00:00Z", "kind": "scale_out", "instance_id": None,
                 "message": "x"}]})
        view.show_state(state, datetime(2026, 12, 3, 8, 1, tzinfo=UTC))
        (button,) = charts.link_buttons()
        assert button.cget("text") == "Show the 1 event behind: shedding"
        button.invoke()
        root.update()
        (marked,) = view.marked_event_lines()
        assert "scale_out" in marked and "launched" not in marked
        # a refresh that brings a new event rewrites the log; the mark stays on its line
        newer = state.model_copy(update={"events": (*state.events, FleetEvent.model_validate(
            {"at": "2026-12-03T08:00:30Z", "kind": "launched", "instance_id": "w2",
             "message": "2 of 3"}))})
        view.show_state(newer, datetime(2026, 12, 3, 8, 1, tzinfo=UTC))
        assert view.marked_event_lines() == [marked]
        view.show_metrics(window())  # a refresh with the same alerts keeps the button
        assert charts.link_buttons() == [button]
    finally:
        root.destroy()
        ctk.set_appearance_mode("System")
