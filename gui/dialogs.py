"""Everything modal or outside the app window: file and folder choosers, questions, the
web browser. One class, so tests can replace it with scripted answers
(``tests/helpers_gui.py``'s ``ScriptedDialogs``)."""

from __future__ import annotations

import tkinter
import webbrowser
from tkinter import filedialog, messagebox, simpledialog

from server.limits import IMAGE_SUFFIXES


class Dialogs:
    """Everything modal or outside the app. Tests replace these methods (the seam for
    answering a confirmation or a file dialog programmatically)."""

    def __init__(self, parent: tkinter.Misc) -> None:
        self.parent = parent

    def ask_open_files(self) -> list[str]:
        patterns = " ".join(f"*{s}" for s in sorted(IMAGE_SUFFIXES))
        names = filedialog.askopenfilenames(
            parent=self.parent, title="Add images",
            filetypes=[("Images", patterns), ("All files", "*")])
        return list(names or ())

    def ask_directory(self, title: str) -> str | None:
        return filedialog.askdirectory(parent=self.parent, title=title, mustexist=True) or None

    def ask_save_as(self, initial_name: str) -> str | None:
        return filedialog.asksaveasfilename(parent=self.parent, title="Save result as",
                                            initialfile=initial_name) or None

    def ask_string(self, title: str, prompt: str, initial: str = "") -> str | None:
        """A line of text (a recipe's name); None when cancelled."""
        answer = simpledialog.askstring(title, prompt, initialvalue=initial,
                                        parent=self.parent)
        return answer if answer else None

    def ask_open_recipe(self) -> str | None:
        return filedialog.askopenfilename(
            parent=self.parent, title="Import recipe",
            filetypes=[("Recipes", "*.json"), ("All files", "*")]) or None

    def ask_save_recipe(self, initial_name: str) -> str | None:
        return filedialog.asksaveasfilename(
            parent=self.parent, title="Export recipe", initialfile=initial_name,
            defaultextension=".json", filetypes=[("Recipes", "*.json")]) or None

    def confirm(self, title: str, message: str) -> bool:
        return bool(messagebox.askyesno(title, message, parent=self.parent, icon="warning"))

    def ask_yes_no_cancel(self, title: str, message: str) -> bool | None:
        """Yes (True), No (False) or Cancel/closed (None)."""
        return messagebox.askyesnocancel(title, message, parent=self.parent, icon="warning")

    def open_url(self, url: str) -> bool:
        """Open ``url`` in a web browser; False when none could be started. Called off
        the UI thread: a text-mode browser would block until it is closed."""
        try:
            return bool(webbrowser.open(url, new=2))
        except webbrowser.Error:
            return False
