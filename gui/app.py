"""The ImageFleet desktop app: one CTk window composing the Process, Fleet and Settings
views with their controllers (``gui.process_controller``, ``gui.fleet_controller``), and
the services they share: the worker thread, the connection, dialogs and messages.

Messages go to a message area that keeps the recent ones (``gui.messages``): errors stay
until dismissed or resolved (a connection error goes when a connection succeeds), infos
expire. The embedded fleet is a child process (``gui.fleet_process``); when it dies the
app says so and starts a new one.

Threads: Tk runs on the main thread only. Network, file and image work runs as
coroutines on ``AsyncWorker``'s loop; outcomes come back through its queue, drained by
``after(50, ...)``. Nothing here blocks the main loop except ``close()``, which waits
for the worker to stop (the window is already hidden then).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import tkinter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import customtkinter as ctk
from PIL import ImageTk

from gui.connection import (
    Connected,
    Connection,
    FleetExit,
    FleetFactory,
    choose_admin_endpoint,
    choose_admin_token,
    choose_ca_file,
    choose_endpoint,
    choose_token,
    default_fleet_factory,
    local_fleet_options,
    restart_allowed,
)
from gui.dialogs import Dialogs
from gui.fleet_controller import FleetController
from gui.fleet_process import LOG_FILE as FLEET_LOG_FILE
from gui.history_controller import HistoryController
from gui.journal_controller import JournalController
from gui.messages import Level, MessageBoard
from gui.preview import app_icon
from gui.process_controller import ProcessController
from gui.settings import (
    LoadedSettings,
    Settings,
    SettingsError,
    cache_dir,
    load_settings,
    parse_settings,
    save_settings,
    settings_path,
)
from gui.viewmodel.errors import describe_error, describe_os_error
from gui.viewmodel.formatting import parse_path_list
from gui.views.fleet import FleetView
from gui.views.history import HistoryView
from gui.views.messages import MessageArea
from gui.views.process import ProcessView
from gui.views.settings import SettingsView
from gui.views.widgets import MUTED
from gui.worker import AsyncWorker

log = logging.getLogger(__name__)

DRAIN_MS = 50
# Message keys: a later success removes the message filed under its key.
CONNECTION = "connection"
FLEET_STOPPED = "fleet-stopped"
PORT_TAKEN = "port-taken"


try:
    # Gives the root window tkinterdnd2's drop_target_register / dnd_bind (it adds them to
    # every other widget by itself).
    from tkinterdnd2.TkinterDnD import DnDWrapper as _DropMethods
except ImportError:  # not installed: no dropping, and the empty list does not offer it
    class _DropMethods:  # type: ignore[no-redef]
        pass


def load_drop_support(root: tkinter.Tk) -> None:
    """Load tkinterdnd2's Tcl extension (tkdnd) into ``root``'s interpreter; raises
    ImportError or RuntimeError when it cannot be (e.g. no build for this platform)."""
    from tkinterdnd2 import TkinterDnD

    TkinterDnD.require(root)


class ImageFleetApp(ctk.CTk, _DropMethods):
    """The desktop app. ``environ``/``config_path``/``fleet_factory``/``dialogs`` are
    seams for tests; by default they come from the process environment."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        admin_endpoint: str | None = None,
        environ: Mapping[str, str] | None = None,
        config_path: Path | None = None,
        fleet_factory: FleetFactory = default_fleet_factory,
        dialogs: Dialogs | None = None,
        open_paths: Sequence[str] = (),
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.config_path = config_path or settings_path(self.environ)
        loaded: LoadedSettings = load_settings(self.config_path)
        self.settings: Settings = loaded.settings
        ctk.set_appearance_mode(self.settings.appearance)
        super().__init__()
        self.title("ImageFleet")
        self._icon = ImageTk.PhotoImage(app_icon(), master=self)
        self.iconphoto(True, self._icon)
        self.geometry("1280x800")
        self.minsize(1100, 680)
        self.endpoint_flag = endpoint
        self.admin_flag = admin_endpoint
        self.dialogs = dialogs or Dialogs(self)
        self.connected: Connected | None = None
        self._after_ids: dict[str, str] = {}
        self._connect_seq = 0
        self.messages = MessageBoard()
        self._message_actions: dict[int, Callable[[], None]] = {}
        self._fleet_deaths: list[float] = []
        self._fleet_exit_handled: FleetExit | None = None
        self.ui_failures: list[BaseException] = []
        self.errors_shown: list[str] = []  # every error message shown, newest last
        self._closing = False
        self.closed = False

        self.worker = AsyncWorker()
        self.worker.start()
        self.connection = Connection(self.storage_dir, fleet_factory)
        self.process = ProcessController(self)
        self.fleet = FleetController(self)
        self.journal = JournalController(self)
        self.history = HistoryController(self)

        self._build()
        self.protocol("WM_DELETE_WINDOW", self.close)
        self._bind_shortcuts()
        self.drop_enabled = self._enable_drop()
        self.process_view.set_drop_available(self.drop_enabled)
        self.process.recipes.refresh()  # the saved recipes, read on the worker thread
        self.schedule("drain", DRAIN_MS, self._drain)
        self.settings_view.show(self.settings, self._display_path(self.config_path),
                                self._override_note())
        if loaded.warning:
            self.show_error(loaded.warning)
        self.connect()
        self.journal.start()  # opened off this thread; then it offers to resume a batch
        if open_paths:
            # "Open with" / the command line: listed as soon as the window exists; the
            # folders are read on the worker thread like any other add.
            paths = list(open_paths)
            self.after_idle(lambda: self.process.add_images(paths))

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        self.columnconfigure(0, weight=1)
        self.rowconfigure(2, weight=1)
        header = ctk.CTkFrame(self, corner_radius=0, height=56)
        header.grid(row=0, column=0, sticky="ew")
        header.columnconfigure(1, weight=1)
        ctk.CTkLabel(header, text="◆ ImageFleet", font=ctk.CTkFont(size=20, weight="bold")).grid(
            row=0, column=0, padx=(18, 24), pady=12)
        self.nav = ctk.CTkSegmentedButton(header,
                                          values=["Process", "History", "Fleet", "Settings"],
                                          command=self.show_view, width=400,
                                          font=ctk.CTkFont(size=13, weight="bold"))
        self.nav.grid(row=0, column=1, sticky="w")
        self.status_dot = ctk.CTkLabel(header, text="●", text_color=("#8a6d00", "#f2c94c"),
                                       font=ctk.CTkFont(size=16))
        self.status_dot.grid(row=0, column=2, padx=(8, 4))
        self.status_label = ctk.CTkLabel(header, text="Starting…", anchor="e", text_color=MUTED)
        self.status_label.grid(row=0, column=3, padx=(0, 18))

        self.message_area = MessageArea(self, on_dismiss=self.dismiss_message,
                                        on_action=self._message_action)

        self.content = ctk.CTkFrame(self, fg_color="transparent")
        self.content.grid(row=2, column=0, sticky="nsew", padx=14, pady=(10, 14))
        self.content.columnconfigure(0, weight=1)
        self.content.rowconfigure(0, weight=1)
        self.process_view = ProcessView(self.content, self.process)
        self.fleet_view = FleetView(self.content, self.fleet)
        self.settings_view = SettingsView(self.content, self)
        self.history_view = HistoryView(self.content, self.history)
        self.views = {"Process": self.process_view, "History": self.history_view,
                      "Fleet": self.fleet_view, "Settings": self.settings_view}
        self.show_view("Process")
        self.process_view.set_ready(False)

    def show_view(self, name: str) -> None:
        for view_name, view in self.views.items():
            if view_name == name:
                view.grid(row=0, column=0, sticky="nsew")
            else:
                view.grid_forget()
        self.nav.set(name)
        self.current_view = name
        if name == "History":
            self.history.shown()
        elif name == "Settings":
            self.refresh_storage_used()

    def _bind_shortcuts(self) -> None:
        self.bind_all("<Control-o>", lambda _e: self.process.add_files_dialog())
        self.bind_all("<Control-Return>", lambda _e: self.process.process_all())
        self.bind_all("<Control-KP_Enter>", lambda _e: self.process.process_all())
        self.bind_all("<Control-Shift-C>", lambda _e: self.process.copy_link())
        self.bind_all("<Control-Shift-c>", lambda _e: self.process.copy_link())
        self.bind("<Control-v>", self._paste_shortcut)

    def _paste_shortcut(self, _event: Any) -> None:
        focused = self.focus_get()
        if isinstance(focused, tkinter.Entry | tkinter.Text):
            return  # a text field pastes text, not images
        self.process.paste_paths()

    def _enable_drop(self) -> bool:
        """Files and folders dropped anywhere on the window are added (tkinterdnd2). If its
        Tcl extension cannot load here, the app says nothing about dropping."""
        if not hasattr(self, "drop_target_register"):
            log.warning("drag and drop unavailable: tkinterdnd2 is not installed")
            return False
        try:
            from tkinterdnd2 import COPY, DND_FILES

            load_drop_support(self)
            # The root covers every widget inside it: tkdnd looks for a registered target
            # from the widget under the pointer up to its toplevel.
            self.drop_target_register(DND_FILES)
            self.dnd_bind("<<Drop>>", lambda event: self._dropped(event.data, COPY))
        except (ImportError, RuntimeError, tkinter.TclError) as exc:
            log.warning("drag and drop unavailable: %s", exc)
            return False
        return True

    def _dropped(self, data: str, action: str) -> str:
        paths = parse_path_list(data)
        if paths:
            self.process.add_images(paths)
        return action  # tells the drag source the drop was taken as a copy

    # ------------------------------------------------------------------ plumbing
    def report_callback_exception(self, exc: type[BaseException], val: BaseException,
                                  tb: Any) -> None:
        """Tk callback bugs: logged and kept (tests assert there are none)."""
        if issubclass(exc, KeyboardInterrupt):  # Ctrl-C in the terminal: quit cleanly
            self.close()
            return
        log.error("Tk callback failed", exc_info=(exc, val, tb))
        self.ui_failures.append(val)

    @property
    def failures(self) -> list[BaseException]:
        return [*self.ui_failures, *self.worker.callback_failures]

    def schedule(self, name: str, ms: int, callback: Callable[[], None]) -> None:
        """Schedule a named ``after`` (replacing an earlier one) so close() can cancel it."""
        if self._closing:
            return
        self.unschedule(name)

        def run() -> None:
            self._after_ids.pop(name, None)
            callback()

        self._after_ids[name] = self.after(ms, run)

    def unschedule(self, name: str) -> None:
        after_id = self._after_ids.pop(name, None)
        if after_id is not None:
            self.after_cancel(after_id)

    def _drain(self) -> None:
        self.worker.drain()
        self.schedule("drain", DRAIN_MS, self._drain)

    def submit(self, coro: Any, on_success: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None) -> Any:
        if self._closing:
            coro.close()
            return None
        return self.worker.submit(coro, on_success, on_error or self.report_error)

    def report_error(self, exc: BaseException) -> None:
        self.show_error(describe_error(exc, self.endpoint_text()))

    def endpoint_text(self) -> str:
        return self.connected.endpoint if self.connected else "the endpoint"

    # ------------------------------------------------------------------ messages
    def show_error(self, message: str, key: str | None = None, action: str | None = None,
                   on_action: Callable[[], None] | None = None) -> None:
        """An error stays until dismissed, or until ``resolve_message(key)``."""
        log.warning("%s", message)
        self.errors_shown.append(message)
        self._post(Level.ERROR, message, key, action, on_action)

    def show_info(self, message: str, key: str | None = None, action: str | None = None,
                  on_action: Callable[[], None] | None = None) -> None:
        """An info expires after a few seconds."""
        self._post(Level.INFO, message, key, action, on_action)

    def show_notice(self, message: str, key: str | None = None, action: str | None = None,
                    on_action: Callable[[], None] | None = None) -> None:
        """Not a problem, but it stays until dismissed or acted on (an offer to resume)."""
        self._post(Level.NOTICE, message, key, action, on_action)

    def journal_ready(self) -> None:
        """The batch journal is open (the History view may show it now)."""
        if self.current_view == "History":
            self.history.shown()

    def _post(self, level: Level, text: str, key: str | None, action: str | None,
              on_action: Callable[[], None] | None) -> None:
        self.messages, message = self.messages.post(level, text, time.monotonic(), key,
                                                    action if on_action else None)
        if on_action is not None:
            self._message_actions[message.id] = on_action
        self._render_messages()

    def resolve_message(self, key: str) -> None:
        self.messages = self.messages.resolve(key)
        self._render_messages()

    def dismiss_message(self, message_id: int) -> None:
        self.messages = self.messages.dismiss(message_id)
        self._render_messages()

    def hide_banner(self) -> None:
        """Dismiss every message (the name is older than the message area)."""
        self.messages = self.messages.clear()
        self._render_messages()

    def _message_action(self, message_id: int) -> None:
        callback = self._message_actions.get(message_id)
        self.dismiss_message(message_id)
        if callback is not None:
            callback()

    def _expire_messages(self) -> None:
        self.messages = self.messages.expire(time.monotonic())
        self._render_messages()

    def _render_messages(self) -> None:
        visible = self.messages.messages
        ids = {m.id for m in visible}
        for message_id in [i for i in self._message_actions if i not in ids]:
            del self._message_actions[message_id]
        self.message_area.show(visible)
        if visible:
            self.message_area.grid(row=1, column=0, sticky="ew", padx=14, pady=(10, 0))
        else:
            self.message_area.grid_forget()
        expiry = self.messages.next_expiry()
        if expiry is None:
            self.unschedule("messages")
        else:
            delay = max(50, int((expiry - time.monotonic()) * 1000) + 20)
            self.schedule("messages", delay, self._expire_messages)

    @property
    def banner_text(self) -> str:
        """Every message on screen, newest first, one per line."""
        return "\n".join(m.text for m in self.messages.messages)

    def open_in_browser(self, url: str) -> None:
        """Open a link off the UI thread; when no browser starts, offer to copy it."""
        def opened(ok: bool) -> None:
            if not ok:
                self.show_error("No web browser could be opened for this link.",
                                key="browser", action="Copy link",
                                on_action=lambda: self.copy_to_clipboard(url, "Link copied."))

        self.submit(asyncio.to_thread(self.dialogs.open_url, url), opened)

    def clipboard_text(self) -> str | None:
        """The clipboard's text; None when it holds none."""
        try:
            return self.clipboard_get()
        except tkinter.TclError:
            return None

    def copy_to_clipboard(self, text: str, note: str) -> None:
        self.clipboard_clear()
        self.clipboard_append(text)
        self.show_info(note)

    def _set_status(self, text: str, state: str) -> None:
        colours = {"ok": ("#1b7f3b", "#5fd38d"), "busy": ("#8a6d00", "#f2c94c"),
                   "error": ("#b3261e", "#ff6b6b")}
        self.status_dot.configure(text_color=colours[state])
        self.status_label.configure(text=text)

    # ------------------------------------------------------------------ connection
    def _display_path(self, path: Path) -> str:
        home = self.environ.get("HOME")
        if home and path.is_relative_to(home):
            return str(Path("~") / path.relative_to(home))
        return str(path)

    def _override_note(self) -> str:
        if self.endpoint_flag:
            return f"endpoint set by --endpoint ({self.endpoint_flag})"
        if self.environ.get("IMAGEFLEET_ENDPOINT"):
            return "endpoint set by IMAGEFLEET_ENDPOINT"
        return ""

    def connect(self) -> None:
        endpoint = choose_endpoint(self.endpoint_flag, self.environ, self.settings)
        if endpoint:
            self._set_status(f"Connecting to {endpoint}…", "busy")
        else:
            size = self.settings.fleet_size
            self._set_status(f"Starting a local fleet ({size} worker{'s' if size > 1 else ''})…",
                             "busy")
        self.connected = None
        self.process_view.set_ready(False)
        settings = self.settings
        admin = choose_admin_endpoint(self.admin_flag, self.environ, settings)
        self._connect_seq += 1
        seq = self._connect_seq

        def connected(result: Connected) -> None:
            if seq == self._connect_seq:  # a later reconnect supersedes this one
                self._on_connected(result)

        def failed(exc: BaseException) -> None:
            if seq == self._connect_seq:
                self._on_connect_failed(exc)

        self.connection.fleet_options = local_fleet_options(self.environ, settings)
        self.submit(self.connection.connect(endpoint, choose_token(self.environ, settings),
                                            settings.concurrency, settings.fleet_size, admin,
                                            choose_ca_file(self.environ, settings),
                                            choose_admin_token(self.environ, settings)),
                    connected, failed)

    def _on_connected(self, connected: Connected) -> None:
        self.connected = connected
        where = "local fleet" if connected.embedded else "endpoint"
        self._set_status(f"{where} · {connected.endpoint}", "ok")
        self.resolve_message(CONNECTION)
        self.resolve_message(FLEET_STOPPED)
        self.process.on_connected(connected, self.settings.concurrency)
        self.fleet.poll()
        notice = self.connection.fleet_notice if connected.embedded else None
        if notice:
            self.show_notice(notice, key=PORT_TAKEN)
        else:
            self.resolve_message(PORT_TAKEN)
        if connected.embedded:
            # Every connect to the same fleet shares one watch, so one death comes back
            # to each of them: it is handled once, whichever connect is current.
            def exited(result: FleetExit | None) -> None:
                if result is not None and result is not self._fleet_exit_handled:
                    self._fleet_exit_handled = result
                    self._on_fleet_exit(result)

            self.submit(self.connection.watch_fleet(), exited)

    def _on_connect_failed(self, exc: BaseException) -> None:
        message = describe_error(exc, choose_endpoint(self.endpoint_flag, self.environ,
                                                      self.settings) or "the local fleet")
        self._set_status("not connected", "error")
        self.show_error(message, key=CONNECTION)
        self.process_view.set_ready(False, "Not connected. " + message)

    def _on_fleet_exit(self, exit_: FleetExit) -> None:
        """The embedded fleet's process died: say so, and start a new one unless it keeps
        dying (then the user decides, with the message's Restart button)."""
        self.connected = None
        self.process_view.set_ready(False, "The local fleet stopped.")
        self._set_status("local fleet stopped", "error")
        now = time.monotonic()
        self._fleet_deaths = [*self._fleet_deaths, now][-10:]
        if self.process.batch.running:
            self.process.cancel_run()
        if restart_allowed(self._fleet_deaths, now):
            self.show_error(f"The local fleet stopped ({exit_.detail}); starting it again…",
                            key=FLEET_STOPPED)
            self.connect()
            self._set_status("local fleet stopped · restarting…", "busy")
        else:
            log_file = self._display_path(cache_dir(self.environ) / FLEET_LOG_FILE)
            self.show_error(f"The local fleet stopped ({exit_.detail}) and keeps stopping; "
                            f"its log is {log_file}.", key=FLEET_STOPPED,
                            action="Restart", on_action=self.connect)
    # ------------------------------------------------------------------ settings
    @property
    def storage_dir(self) -> Path:
        return cache_dir(self.environ) / "storage"

    def refresh_storage_used(self) -> None:
        """Measure the local storage off the UI thread; the Settings view shows it."""
        from fleet.storage_cleanup import used_bytes

        self.submit(asyncio.to_thread(used_bytes, self.storage_dir),
                    self.settings_view.show_storage_used)

    def clear_storage(self) -> None:
        """The Settings view's Clear button: remove every stored result and original."""
        from fleet.storage_cleanup import clear

        if not self.dialogs.confirm("Clear local storage", "Remove every result and "
                                    "original the local fleet keeps? Their links stop "
                                    "working."):
            return

        def cleared(outcome: tuple[int, int]) -> None:
            removed, freed = outcome
            self.show_info(f"Local storage cleared: {removed} file(s), "
                           f"{freed / 2**20:.1f} MB.")
            self.refresh_storage_used()

        self.submit(asyncio.to_thread(clear, self.storage_dir), cleared)

    def apply_settings(self, raw: dict[str, Any]) -> None:
        try:
            new = parse_settings(raw, self.settings)
        except SettingsError as exc:
            self.settings_view.show_message("Not saved: " + "; ".join(exc.problems), error=True)
            return
        old, self.settings = self.settings, new
        ctk.set_appearance_mode(new.appearance)
        self.fleet_view.apply_theme()

        def saved(_path: Any) -> None:
            self.settings_view.show_message(f"Saved to {self.config_path}.")

        def not_saved(exc: BaseException) -> None:
            text = (describe_os_error(exc, "save settings to") if isinstance(exc, OSError)
                    else str(exc))
            self.settings_view.show_message(text, error=True)

        self.submit(asyncio.to_thread(save_settings, new, self.config_path), saved, not_saved)
        self.process.settings_changed()
        # the output rules only change names: no reconnect for them
        if replace(old, appearance=new.appearance, on_conflict=new.on_conflict,
                   name_template=new.name_template) != new:
            if self.process.batch.running:
                self.process.cancel_run()
            self.connect()

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Cancel work, stop the embedded fleet and the worker thread, then destroy."""
        if self._closing:
            return
        self._closing = True
        for after_id in self._after_ids.values():
            self.after_cancel(after_id)
        self._after_ids.clear()
        self.withdraw()
        self.worker.stop(cleanup=self.connection.close)
        self.journal.close()  # after the worker: the last outcomes are queued by then
        self.closed = True
        self.quit()
        self.destroy()
        self._forget_in_customtkinter()

    def _forget_in_customtkinter(self) -> None:
        """CustomTkinter's class-level trackers keep every window ever made, and with it
        its Tcl interpreter and X connection. Dropping them lets a closed app be freed
        (a later app in the same process, like the next GUI test module on another
        display, must not find a dead display's connection in Tk's event loop)."""
        from customtkinter.windows.widgets.appearance_mode import AppearanceModeTracker
        from customtkinter.windows.widgets.scaling import ScalingTracker

        with contextlib.suppress(ValueError):
            AppearanceModeTracker.app_list.remove(self)
        ScalingTracker.window_widgets_dict.pop(self, None)
        ScalingTracker.window_dpi_scaling_dict.pop(self, None)
