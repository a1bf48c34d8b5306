"""What the app's controllers need of the window around them, as small protocols.

A controller depends on one of these, not on the concrete window class: ``gui.app``
builds the controllers and passes itself, and no controller imports ``gui.app`` (not
even for type checking), so the dependency points one way. Each protocol names only
what its controller uses; ``tests/test_gui.py`` checks that the real window provides
every one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gui.connection import Connected, Connection
    from gui.dialogs import Dialogs
    from gui.journal_controller import JournalController
    from gui.process_controller import ProcessController
    from gui.settings import Settings
    from gui.views.fleet import FleetView
    from gui.views.history import HistoryView
    from gui.views.process import ProcessView
    from gui.views.settings import SettingsView
    from gui.worker import AsyncWorker

MessageAction = Callable[[], None]


@runtime_checkable
class Host(Protocol):
    """Every controller: background work, timers, messages, dialogs, the connection."""

    dialogs: Dialogs
    connection: Connection
    connected: Connected | None

    def submit(self, coro: Coroutine[Any, Any, Any],
               on_success: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Any:
        """Run ``coro`` on the background loop; the callbacks run on the UI thread."""
        ...

    def schedule(self, name: str, ms: int, callback: Callable[[], None]) -> None: ...

    def unschedule(self, name: str) -> None: ...

    def endpoint_text(self) -> str: ...

    def report_error(self, exc: BaseException) -> None: ...

    def show_error(self, message: str, key: str | None = None, action: str | None = None,
                   on_action: MessageAction | None = None) -> None: ...

    def show_info(self, message: str, key: str | None = None, action: str | None = None,
                  on_action: MessageAction | None = None) -> None: ...

    def show_notice(self, message: str, key: str | None = None, action: str | None = None,
                    on_action: MessageAction | None = None) -> None: ...

    def resolve_message(self, key: str) -> None: ...


@runtime_checkable
class RecipeHost(Host, Protocol):
    process_view: ProcessView


@runtime_checkable
class ProcessHost(Host, Protocol):
    settings: Settings
    config_path: Path
    worker: AsyncWorker
    journal: JournalController
    process_view: ProcessView
    settings_view: SettingsView

    def clipboard_text(self) -> str | None: ...

    def copy_to_clipboard(self, text: str, note: str) -> None: ...

    def open_in_browser(self, url: str) -> None: ...


@runtime_checkable
class FleetHost(Host, Protocol):
    fleet_view: FleetView
    process: ProcessController


@runtime_checkable
class JournalHost(Host, Protocol):
    environ: MutableMapping[str, str]
    settings: Settings
    closed: bool
    process: ProcessController

    def journal_ready(self) -> None: ...


@runtime_checkable
class HistoryHost(Host, Protocol):
    settings: Settings
    journal: JournalController
    history_view: HistoryView

    def copy_to_clipboard(self, text: str, note: str) -> None: ...

    def show_view(self, name: str) -> None: ...
