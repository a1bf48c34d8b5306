"""What the Fleet view's buttons do, and its 2-second refresh from the fleet's admin API
(``GET /fleet``, ``POST /fleet/scale``, ``POST /fleet/instances/<id>/terminate``) through
the client. The same calls serve the local gateway and the AWS fleet manager."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gui.host import FleetHost
from gui.viewmodel.errors import describe_fleet_error
from gui.viewmodel.fleet import parse_desired
from server.api import FleetState

if TYPE_CHECKING:
    from gui.views.fleet import FleetView

FLEET_POLL_MS = 2000


class FleetController:
    def __init__(self, app: FleetHost) -> None:
        self.app = app
        self.last_state: FleetState | None = None
        self._pending = False
        self._metrics_pending = False
        self.metrics_seconds = 900
        self.last_metrics: dict[str, Any] | None = None

    @property
    def view(self) -> FleetView:
        return self.app.fleet_view

    def poll(self) -> None:
        """Refresh now and every FLEET_POLL_MS (the app cancels the timer on close)."""
        self.app.schedule("fleet", FLEET_POLL_MS, self.poll)
        self.refresh_fleet()
        self.refresh_metrics()
        self.app.process.refresh_expiry()

    def refresh_fleet(self) -> None:
        if self.app.connected is None or self._pending:
            return
        self._pending = True

        def done(state: FleetState) -> None:
            self._pending = False
            self.last_state = state
            self.view.show_state(state, datetime.now(UTC))

        def failed(exc: BaseException) -> None:
            self._pending = False
            self.view.show_unavailable(
                "Fleet state unavailable: " + describe_fleet_error(exc, self.app.endpoint_text()))

        self.app.submit(self.app.connection.admin_client.fleet(), done, failed)

    def metrics_window(self, seconds: int) -> None:
        """The window selector: fetch that much now (and on every refresh)."""
        self.metrics_seconds = seconds
        self.refresh_metrics()

    def refresh_metrics(self) -> None:
        """``GET /fleet/metrics`` on the app's worker thread; the view draws the answer.
        A fleet without the window (an older manager) leaves the charts waiting."""
        if self.app.connected is None or self._metrics_pending:
            return
        self._metrics_pending = True

        def done(body: Any) -> None:
            self._metrics_pending = False
            self.last_metrics = body
            self.view.show_metrics(body)

        def failed(_exc: BaseException) -> None:
            self._metrics_pending = False

        self.app.submit(self.app.connection.admin_client.fleet_metrics(self.metrics_seconds),
                        done, failed)

    def set_desired(self, text: str) -> None:
        if self.app.connected is None:
            self.view.show_message("Not connected.", error=True)
            return
        state = self.last_state
        low, high = (state.min, state.max) if state is not None else (0, 1000)
        if low == high and text.strip() != str(low):
            hint = (" Change 'Local fleet size' in Settings." if self.app.connected.embedded
                    else "")
            self.view.show_message(
                f"This fleet has a fixed size of {low} (min = max).{hint}", error=True)
            return
        try:
            desired = parse_desired(text, low, high)
        except ValueError as exc:
            self.view.show_message(str(exc), error=True)
            return
        self.view.show_message(f"Setting desired count to {desired}…")
        self.app.submit(self.app.connection.admin_client.scale(desired),
                    lambda _s: (self.view.show_message(f"Desired count set to {desired}."),
                                self.refresh_fleet()),
                    lambda exc: self.view.show_message(
                        describe_fleet_error(exc, self.app.endpoint_text()), error=True))

    def terminate_instance(self, instance_id: str) -> None:
        if self.app.connected is None:
            return
        if not self.app.dialogs.confirm(
                "Terminate instance",
                f"Terminate {instance_id}? Requests in flight on it may fail and be retried; "
                "the fleet manager will launch a replacement."):
            self.view.show_message("Terminate cancelled.")
            return
        self.view.show_message(f"Terminating {instance_id}…")
        self.app.submit(self.app.connection.admin_client.terminate(instance_id),
                    lambda _r: (self.view.show_message(
                        f"{instance_id} is being terminated; a replacement will follow."),
                                self.refresh_fleet()),
                    lambda exc: self.view.show_message(
                        describe_fleet_error(exc, self.app.endpoint_text()), error=True))
