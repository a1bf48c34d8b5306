"""Small reusable widgets: the parameter control built from a ControlSpec, a spinbox
(CustomTkinter has none), and section headings."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable
from typing import Any

import customtkinter as ctk

from gui.viewmodel.params import ControlSpec, coerce_value, format_value

MUTED = ("gray40", "gray65")
ERROR = ("#b3261e", "#ff8a80")
CARD = ("gray92", "gray17")
SELECTED = ("#dbe7f7", "#1f3a5c")


def heading(master: Any, text: str) -> ctk.CTkLabel:
    return ctk.CTkLabel(master, text=text, anchor="w",
                        font=ctk.CTkFont(size=15, weight="bold"))


def caption(master: Any, text: str = "", font_size: int = 12, **kwargs: Any) -> ctk.CTkLabel:
    return ctk.CTkLabel(master, text=text, anchor="w", text_color=MUTED,
                        font=ctk.CTkFont(size=font_size), **kwargs)


class Spinbox(ctk.CTkFrame):
    """An entry with − and + buttons; ``command`` runs after every change."""

    def __init__(self, master: Any, *, step: float = 1, value: Any = 0,
                 minimum: float | None = None, maximum: float | None = None,
                 width: int = 120, command: Callable[[], None] | None = None,
                 fmt: Callable[[float], str] = str) -> None:
        super().__init__(master, fg_color="transparent")
        self._step, self._min, self._max = step, minimum, maximum
        self._command, self._fmt = command, fmt
        self.minus = ctk.CTkButton(self, text="−", width=28, height=28,
                                   command=lambda: self._bump(-1))
        self.entry = ctk.CTkEntry(self, width=width - 64, height=28, justify="center")
        self.plus = ctk.CTkButton(self, text="+", width=28, height=28,
                                  command=lambda: self._bump(1))
        self.minus.grid(row=0, column=0)
        self.entry.grid(row=0, column=1, padx=4)
        self.plus.grid(row=0, column=2)
        self.set(value)
        self.entry.bind("<Return>", lambda _e: self._changed())
        self.entry.bind("<FocusOut>", lambda _e: self._changed())

    def _changed(self) -> None:
        if self._command:
            self._command()

    def _bump(self, direction: int) -> None:
        try:
            value = float(self.entry.get()) + direction * self._step
        except ValueError:
            value = self._min if self._min is not None else 0
        if self._min is not None:
            value = max(self._min, value)
        if self._max is not None:
            value = min(self._max, value)
        self.set(value)
        self._changed()

    def get(self) -> str:
        return self.entry.get()

    def set(self, value: Any) -> None:
        self.entry.delete(0, "end")
        self.entry.insert(0, self._fmt(value))


class ParamControl(ctk.CTkFrame):
    """One operation parameter: label, the control its spec asks for, and an error line."""

    def __init__(self, master: Any, spec: ControlSpec, on_change: Callable[[], None]) -> None:
        super().__init__(master, fg_color="transparent")
        self.spec = spec
        self._on_change = on_change
        self.columnconfigure(0, weight=1)
        top = ctk.CTkFrame(self, fg_color="transparent")
        top.grid(row=0, column=0, sticky="ew")
        top.columnconfigure(0, weight=1)
        self.label = ctk.CTkLabel(top, text=spec.label, anchor="w")
        self.label.grid(row=0, column=0, sticky="w")
        self.value_label = caption(top)
        self.value_label.grid(row=0, column=1, sticky="e")
        self.error = ctk.CTkLabel(self, text="", text_color=ERROR, anchor="w",
                                  font=ctk.CTkFont(size=11), height=0)
        self.widget: Any
        if spec.kind == "checkbox":
            self.label.configure(text="")
            # No Tk Variable here or below: a destroyed control's Variable can be
            # garbage-collected on the worker thread, where its __del__ may not call Tcl.
            self.widget = ctk.CTkCheckBox(self, text=spec.label, command=self._changed)
            if spec.default:
                self.widget.select()
        elif spec.kind == "dropdown":
            self.widget = ctk.CTkOptionMenu(self, values=list(spec.choices),
                                            command=lambda _v: self._changed(),
                                            dynamic_resizing=False)
            self.widget.set(str(spec.default))
        elif spec.kind == "slider":
            self.widget = ctk.CTkSlider(self, from_=spec.minimum, to=spec.maximum,
                                        number_of_steps=spec.steps,
                                        command=lambda _v: self._slid())
            self.widget.set(spec.default)
            self.value_label.configure(text=format_value(spec, spec.default))
        else:
            self.widget = Spinbox(self, step=spec.increment, value=spec.default,
                                  minimum=spec.minimum, maximum=spec.maximum,
                                  command=self._changed,
                                  fmt=lambda v: format_value(spec, v))
        self.widget.grid(row=1, column=0, sticky="ew", pady=(2, 0))
        if spec.description:
            caption(self, spec.description[:1].upper() + spec.description[1:], wraplength=270,
                    justify="left", font_size=11).grid(row=3, column=0, sticky="w")

    def _slid(self) -> None:
        self.value_label.configure(text=format_value(self.spec, self.widget.get()))
        self._on_change()

    def _changed(self) -> None:
        with contextlib.suppress(ValueError):  # value() shows the problem under the control
            self.value()
        self._on_change()

    def raw(self) -> Any:
        if self.spec.kind == "checkbox":
            return bool(self.widget.get())
        return self.widget.get()

    def value(self) -> Any:
        """The typed value; shows and raises ValueError when the entry is invalid."""
        try:
            value = coerce_value(self.spec, self.raw())
        except ValueError as exc:
            self.error.configure(text=str(exc))
            self.error.grid(row=2, column=0, sticky="w")
            raise
        self.error.grid_forget()
        return value

    def set(self, value: Any) -> None:
        if self.spec.kind == "checkbox":
            (self.widget.select if value else self.widget.deselect)()
        elif self.spec.kind == "dropdown":
            self.widget.set(str(value))
        else:
            self.widget.set(value)
            if self.spec.kind == "slider":
                self.value_label.configure(text=format_value(self.spec, value))


def destroy_widgets(widgets: Iterable[Any]) -> None:
    """Destroy widgets and collect the garbage they leave, here on Tk's thread.

    A destroyed CustomTkinter widget is cyclic garbage holding Tk fonts and images. If
    the garbage collector happens to free it on the worker thread, each of those makes
    a Tk call from that thread, which waits for the main loop (and, while tests pump
    the loop with ``update()``, for about a second each) — so collect it right away.
    """
    destroyed = False
    for widget in list(widgets):
        widget.destroy()
        destroyed = True
    if destroyed:
        gc.collect()
