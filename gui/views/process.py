"""The Process view: image list, operation and parameters, run controls, before/after
preview and result actions.

The view only shows state and forwards user intent to its controller (the app); it
holds no network or file logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import customtkinter as ctk
from PIL import Image

from gui.preview import compose_split, fit_within, flatten
from gui.viewmodel.batch import Overall
from gui.viewmodel.params import ControlSpec, SchemaError, controls_for
from gui.viewmodel.requests import (
    ICC_LABELS,
    LOSSY_FORMATS,
    METADATA_LABELS,
    OUTPUT_FORMATS,
    SUBSAMPLINGS,
    OutputSettings,
    RequestStep,
    describe_step,
)
from gui.views.image_list import ImageList, ListActions, PoolRow
from gui.views.settings import ON_CONFLICT_LABELS
from gui.views.widgets import (
    CARD,
    ERROR,
    MUTED,
    ParamControl,
    caption,
    destroy_widgets,
    heading,
)

PREVIEW_BOX = (600, 380)
NO_STEP = "No step being edited"  # the menu entry for "run just the pipeline"
NO_RECIPE = "(none: the settings below)"


def empty_hint_text(drop: bool) -> str:
    """What the empty list says; it promises dropping only when dropping works."""
    ways = "the buttons above, Ctrl+O or by pasting paths (Ctrl+V)"
    if drop:
        return f"Add images with {ways}, or drop files and folders here."
    return f"Add images with {ways}."


class ProcessActions(ListActions, Protocol):
    def add_files_dialog(self) -> None: ...
    def add_folder_dialog(self) -> None: ...
    def paste_paths(self) -> None: ...
    def remove_image(self, job_id: int) -> None: ...
    def retry_image(self, job_id: int) -> None: ...
    def select_image(self, job_id: int) -> None: ...
    def params_changed(self) -> None: ...
    def add_step(self) -> None: ...
    def remove_step(self, index: int) -> None: ...
    def clear_pipeline(self) -> None: ...
    def process_all(self) -> None: ...
    def cancel_run(self) -> None: ...
    def copy_link(self) -> None: ...
    def open_link(self) -> None: ...
    def save_as(self) -> None: ...
    def save_all(self) -> None: ...
    def on_conflict_changed(self, value: str) -> None: ...
    def recipe_picked(self, label: str) -> None: ...
    def save_recipe_as(self) -> None: ...
    def rename_recipe(self) -> None: ...
    def delete_recipe(self) -> None: ...
    def import_recipe(self) -> None: ...
    def export_recipe(self) -> None: ...


class ProcessView(ctk.CTkFrame):
    """See the module docstring. The app calls the ``set_*``/``show_*`` methods."""

    def __init__(self, master: Any, controller: ProcessActions) -> None:
        super().__init__(master, fg_color="transparent")
        self.controller = controller
        self.controls: list[ParamControl] = []
        self.operations: dict[str, Any] = {}
        self._title_to_name: dict[str, str] = {}
        self._before: Image.Image | None = None
        self._after: Image.Image | None = None
        self._after_text = "processing preview…"
        self._images: list[ctk.CTkImage] = []
        self.columnconfigure(0, weight=0, minsize=310)
        self.columnconfigure(1, weight=0, minsize=320)
        self.columnconfigure(2, weight=1)
        self.rowconfigure(0, weight=1)
        self._build_images_column()
        self._build_operation_column()
        self._build_preview_column()

    # ------------------------------------------------------------------ layout
    def _build_images_column(self) -> None:
        col = ctk.CTkFrame(self)
        col.grid(row=0, column=0, sticky="nsew", padx=(0, 8))
        col.rowconfigure(2, weight=1)
        col.columnconfigure(0, weight=1)
        head = ctk.CTkFrame(col, fg_color="transparent")
        head.grid(row=0, column=0, sticky="ew", padx=12, pady=(12, 4))
        head.columnconfigure(0, weight=1)
        heading(head, "Images").grid(row=0, column=0, sticky="w")
        self.count_label = caption(head, "none yet")
        self.count_label.grid(row=0, column=1, sticky="e")
        buttons = ctk.CTkFrame(col, fg_color="transparent")
        buttons.grid(row=1, column=0, sticky="ew", padx=12, pady=(0, 6))
        self.add_button = ctk.CTkButton(buttons, text="Add images…", width=104,
                                        command=self.controller.add_files_dialog)
        self.add_button.grid(row=0, column=0, padx=(0, 6))
        ctk.CTkButton(buttons, text="Folder…", width=76, fg_color="transparent", border_width=1,
                      text_color=("gray10", "gray90"),
                      command=self.controller.add_folder_dialog).grid(row=0, column=1, padx=(0, 6))
        ctk.CTkButton(buttons, text="Paste paths", width=92, fg_color="transparent",
                      border_width=1, text_color=("gray10", "gray90"),
                      command=self.controller.paste_paths).grid(row=0, column=2)
        # folders added, dropped or pasted: with their sub-folders, which Save all mirrors
        self.subfolders_var = ctk.BooleanVar(value=False)
        ctk.CTkCheckBox(buttons, text="Folders with sub-folders (Save all mirrors them)",
                        variable=self.subfolders_var, checkbox_width=18, checkbox_height=18,
                        font=ctk.CTkFont(size=12)).grid(row=1, column=0, columnspan=3,
                                                        sticky="w", pady=(6, 0))
        self.image_list = ImageList(col, self.controller, empty_hint_text(drop=False))
        self.image_list.grid(row=2, column=0, sticky="nsew", padx=4, pady=(0, 4))
        self.empty_hint = self.image_list.empty_hint
        run = ctk.CTkFrame(col, fg_color="transparent")
        run.grid(row=3, column=0, sticky="ew", padx=12, pady=(4, 12))
        run.columnconfigure(0, weight=1)
        self.overall_label = caption(run, "No run yet")
        self.overall_label.grid(row=0, column=0, columnspan=2, sticky="ew")
        self.overall_bar = ctk.CTkProgressBar(run, height=10)
        self.overall_bar.set(0)
        self.overall_bar.grid(row=1, column=0, columnspan=2, sticky="ew", pady=(2, 8))
        self.process_button = ctk.CTkButton(run, text="Process all  (Ctrl+Enter)", height=36,
                                            font=ctk.CTkFont(size=14, weight="bold"),
                                            command=self.controller.process_all)
        self.process_button.grid(row=2, column=0, sticky="ew", padx=(0, 6))
        self.cancel_button = ctk.CTkButton(run, text="Cancel", width=76, height=36,
                                           fg_color=("gray70", "gray30"),
                                           hover_color=("gray60", "gray35"),
                                           state="disabled", command=self.controller.cancel_run)
        self.cancel_button.grid(row=2, column=1)
        self.runs_label = caption(run, "", wraplength=280, justify="left")
        self.runs_label.grid(row=3, column=0, columnspan=2, sticky="ew", pady=(4, 0))

    def _build_operation_column(self) -> None:
        col = ctk.CTkFrame(self)
        col.grid(row=0, column=1, sticky="nsew", padx=(0, 8))
        col.columnconfigure(0, weight=1)
        col.rowconfigure(4, weight=1)
        self._build_recipe_bar(col)
        heading(col, "Operation").grid(row=1, column=0, sticky="w", padx=12, pady=(12, 4))
        self.operation_var = ctk.StringVar(value="Loading operations…")
        self.operation_menu = ctk.CTkOptionMenu(col, values=["Loading operations…"],
                                                variable=self.operation_var,
                                                command=self._operation_picked,
                                                dynamic_resizing=False)
        self.operation_menu.grid(row=2, column=0, sticky="ew", padx=12)
        self.description = caption(col, "Waiting for the server's operations…",
                                   wraplength=290, justify="left")
        self.description.grid(row=3, column=0, sticky="ew", padx=12, pady=(4, 4))
        self.params_frame = ctk.CTkScrollableFrame(col, fg_color="transparent", height=150)
        self.params_frame.grid(row=4, column=0, sticky="nsew", padx=4)
        self.params_frame.columnconfigure(0, weight=1)

        pipe = ctk.CTkFrame(col, fg_color="transparent")
        pipe.grid(row=5, column=0, sticky="ew", padx=12, pady=(6, 0))
        pipe.columnconfigure(0, weight=1)
        ctk.CTkLabel(pipe, text="Pipeline", anchor="w",
                     font=ctk.CTkFont(size=13, weight="bold")).grid(row=0, column=0, sticky="w")
        self.add_step_button = ctk.CTkButton(pipe, text="+ Add as step", width=104, height=26,
                                             command=self.controller.add_step)
        self.add_step_button.grid(row=0, column=1, padx=(4, 0))
        self.clear_button = ctk.CTkButton(pipe, text="Clear", width=52, height=26,
                                          fg_color="transparent", border_width=1,
                                          text_color=("gray10", "gray90"),
                                          command=self.controller.clear_pipeline)
        self.clear_button.grid(row=0, column=2, padx=(4, 0))
        self.steps_frame = ctk.CTkFrame(pipe, fg_color="transparent")
        self.steps_frame.grid(row=1, column=0, columnspan=3, sticky="ew", pady=(4, 0))
        self.steps_frame.columnconfigure(0, weight=1)
        self.set_pipeline([], {})

        out = ctk.CTkFrame(col, fg_color="transparent")
        out.grid(row=6, column=0, sticky="ew", padx=12, pady=(10, 12))
        out.columnconfigure(1, weight=1)
        ctk.CTkLabel(out, text="Output", font=ctk.CTkFont(size=13, weight="bold")).grid(
            row=0, column=0, sticky="w", columnspan=3)
        ctk.CTkLabel(out, text="Format").grid(row=1, column=0, sticky="w", pady=(4, 0))
        self.format_var = ctk.StringVar(value="original")
        self.format_menu = ctk.CTkOptionMenu(out, values=list(OUTPUT_FORMATS), width=120,
                                             variable=self.format_var,
                                             command=lambda _v: self._format_changed())
        self.format_menu.grid(row=1, column=1, columnspan=2, sticky="w", padx=(8, 0), pady=(4, 0))
        ctk.CTkLabel(out, text="Quality").grid(row=2, column=0, sticky="w", pady=(6, 0))
        self.quality_slider = ctk.CTkSlider(out, from_=1, to=100, number_of_steps=99,
                                            command=lambda _v: self._quality_moved())
        self.quality_slider.set(90)
        self.quality_slider.grid(row=2, column=1, sticky="ew", padx=(8, 4), pady=(6, 0))
        self.quality_label = caption(out, "90", width=28)
        self.quality_label.grid(row=2, column=2, pady=(6, 0))
        self._build_encoder_options(out)

    def _build_encoder_options(self, out: ctk.CTkFrame) -> None:
        """Encoder, colour and metadata options; each is enabled only for the formats
        that have it (``_format_changed``)."""
        flags = ctk.CTkFrame(out, fg_color="transparent")
        flags.grid(row=3, column=1, columnspan=2, sticky="w", padx=(8, 0), pady=(6, 0))
        changed = self.controller.params_changed
        self.progressive_var = ctk.BooleanVar(value=False)
        self.progressive_box = ctk.CTkCheckBox(flags, text="Progressive",
                                               variable=self.progressive_var,
                                               command=changed)
        self.progressive_box.grid(row=0, column=0, sticky="w")
        self.lossless_var = ctk.BooleanVar(value=False)
        self.lossless_box = ctk.CTkCheckBox(flags, text="Lossless", variable=self.lossless_var,
                                            command=self._format_changed)
        self.lossless_box.grid(row=0, column=1, sticky="w", padx=(8, 0))
        menus = (("Chroma", "subsampling", list(SUBSAMPLINGS)),
                 ("Colour", "icc", list(ICC_LABELS.values())),
                 ("Metadata", "metadata", list(METADATA_LABELS.values())))
        for row, (label, name, values) in enumerate(menus, start=4):
            ctk.CTkLabel(out, text=label).grid(row=row, column=0, sticky="w", pady=(6, 0))
            var = ctk.StringVar(value=values[0])
            menu = ctk.CTkOptionMenu(out, values=values, width=170, variable=var,
                                     command=lambda _v: self.controller.params_changed())
            menu.grid(row=row, column=1, columnspan=2, sticky="w", padx=(8, 0), pady=(6, 0))
            setattr(self, f"{name}_var", var)
            setattr(self, f"{name}_menu", menu)
        self._format_changed(notify=False)
        # the first names Save all writes, from the same function (gui.output_rules)
        self.names_label = caption(out, "", wraplength=290, justify="left")
        self.names_label.grid(row=7, column=0, columnspan=3, sticky="ew", pady=(6, 0))

    def _build_recipe_bar(self, col: Any) -> None:
        bar = ctk.CTkFrame(col, fg_color="transparent")
        bar.grid(row=0, column=0, sticky="ew", padx=12, pady=(12, 0))
        bar.columnconfigure(1, weight=1)
        ctk.CTkLabel(bar, text="Recipe", font=ctk.CTkFont(size=13, weight="bold")).grid(
            row=0, column=0, sticky="w")
        self.recipe_var = ctk.StringVar(value=NO_RECIPE)
        self.recipe_menu = ctk.CTkOptionMenu(bar, values=[NO_RECIPE], variable=self.recipe_var,
                                             dynamic_resizing=False,
                                             command=self.controller.recipe_picked)
        self.recipe_menu.grid(row=0, column=1, columnspan=4, sticky="ew", padx=(8, 0))
        buttons = ctk.CTkFrame(bar, fg_color="transparent")
        buttons.grid(row=1, column=0, columnspan=5, sticky="w", pady=(4, 0))
        self.recipe_buttons: dict[str, ctk.CTkButton] = {}
        for i, (text, command) in enumerate((
                ("Save as…", self.controller.save_recipe_as),
                ("Rename…", self.controller.rename_recipe),
                ("Delete", self.controller.delete_recipe),
                ("Import…", self.controller.import_recipe),
                ("Export…", self.controller.export_recipe))):
            # width 10: as wide as the text needs (the five fit the column)
            button = ctk.CTkButton(buttons, text=text, width=10, height=24,
                                   font=ctk.CTkFont(size=12), fg_color="transparent",
                                   border_width=1,
                                   text_color=("gray10", "gray90"), command=command)
            button.grid(row=0, column=i, padx=(0, 4))
            self.recipe_buttons[text] = button
        self.recipe_outputs = caption(bar, "", wraplength=290, justify="left")
        self.recipe_outputs.grid(row=2, column=0, columnspan=5, sticky="ew")
        self.set_recipes([], None, "")

    def _build_preview_column(self) -> None:
        col = ctk.CTkFrame(self)
        col.grid(row=0, column=2, sticky="nsew")
        col.columnconfigure(0, weight=1)
        col.rowconfigure(1, weight=1)
        head = ctk.CTkFrame(col, fg_color="transparent")
        head.grid(row=0, column=0, sticky="ew", padx=12, pady=(12, 4))
        head.columnconfigure(0, weight=1)
        heading(head, "Before / after").grid(row=0, column=0, sticky="w")
        self.mode = ctk.CTkSegmentedButton(head, values=["Side by side", "Slider"],
                                           command=lambda _v: self._render_preview())
        self.mode.set("Side by side")
        self.mode.grid(row=0, column=1, sticky="e")
        # the same text as under Process all: what the preview shows is what runs
        self.preview_runs_label = caption(head, "", wraplength=560, justify="left")
        self.preview_runs_label.grid(row=1, column=0, columnspan=2, sticky="ew", pady=(2, 0))
        self.stage = ctk.CTkFrame(col, fg_color=("gray78", "gray14"), corner_radius=8)
        self.stage.grid(row=1, column=0, sticky="nsew", padx=12)
        self.stage.columnconfigure((0, 1), weight=1)
        self.stage.rowconfigure(0, weight=1)
        self._blank = ctk.CTkImage(light_image=Image.new("RGBA", (1, 1), (0, 0, 0, 0)),
                                   size=(1, 1))
        self.before_label = ctk.CTkLabel(self.stage, text="")
        self.after_label = ctk.CTkLabel(self.stage, text="", wraplength=260, justify="left")
        self.stage_hint = caption(self.stage, "Select an image to see it here.")
        self.stage_hint.grid(row=0, column=0, columnspan=2)
        self.split = ctk.CTkSlider(col, from_=0, to=1, command=lambda _v: self._render_preview())
        self.split.set(0.5)
        self.preview_caption = caption(col, "", wraplength=560, justify="left")
        self.preview_caption.grid(row=3, column=0, sticky="ew", padx=12, pady=(4, 0))

        info = ctk.CTkFrame(col, fg_color=CARD, corner_radius=8)
        info.grid(row=4, column=0, sticky="ew", padx=12, pady=(8, 12))
        info.columnconfigure(0, weight=1)
        self.result_title = ctk.CTkLabel(info, text="No result selected", anchor="w",
                                         font=ctk.CTkFont(size=13, weight="bold"))
        self.result_title.grid(row=0, column=0, sticky="ew", padx=10, pady=(8, 0))
        # wrapped, never cut: a failed image's whole server message is shown here
        self.result_meta = caption(info, "Process an image to get a shareable link.",
                                   wraplength=540, justify="left")
        self.result_meta.grid(row=1, column=0, sticky="ew", padx=10)
        info.bind("<Configure>", lambda e: self.result_meta.configure(
            wraplength=max(200, e.width - 24)), add="+")
        self.expiry_label = caption(info, "")
        self.expiry_label.grid(row=2, column=0, sticky="ew", padx=10)
        self.link_entry = ctk.CTkEntry(info, state="readonly", height=28)
        self.link_entry.grid(row=3, column=0, sticky="ew", padx=10, pady=(4, 6))
        actions = ctk.CTkFrame(info, fg_color="transparent")
        actions.grid(row=4, column=0, sticky="ew", padx=10, pady=(0, 10))
        self.copy_button = ctk.CTkButton(actions, text="Copy link", width=90,
                                         command=self.controller.copy_link)
        self.open_button = ctk.CTkButton(actions, text="Open in browser", width=120,
                                         command=self.controller.open_link)
        self.save_button = ctk.CTkButton(actions, text="Save as…", width=84,
                                         command=self.controller.save_as)
        self.save_all_button = ctk.CTkButton(actions, text="Save all to folder…", width=136,
                                             fg_color="transparent", border_width=1,
                                             text_color=("gray10", "gray90"),
                                             command=self.controller.save_all)
        for i, button in enumerate((self.copy_button, self.open_button, self.save_button,
                                    self.save_all_button)):
            button.grid(row=0, column=i, padx=(0, 6))
        conflict = ctk.CTkFrame(info, fg_color="transparent")
        conflict.grid(row=5, column=0, sticky="ew", padx=10, pady=(0, 10))
        caption(conflict, "Save all, when a name is taken:").grid(row=0, column=0, sticky="w")
        self._conflict_by_label = {label: value for value, label in ON_CONFLICT_LABELS.items()}
        self.on_conflict_var = ctk.StringVar(value=ON_CONFLICT_LABELS["unique"])
        self.on_conflict_menu = ctk.CTkOptionMenu(
            conflict, values=list(ON_CONFLICT_LABELS.values()), variable=self.on_conflict_var,
            width=130, command=lambda label: self.controller.on_conflict_changed(
                self._conflict_by_label[label]))
        self.on_conflict_menu.grid(row=0, column=1, padx=(6, 0))
        self.show_result(None, "", "")

    # ------------------------------------------------------------------ operations
    def set_on_conflict(self, value: str) -> None:
        self.on_conflict_var.set(ON_CONFLICT_LABELS.get(value, ON_CONFLICT_LABELS["unique"]))

    def on_conflict(self) -> str:
        return self._conflict_by_label[self.on_conflict_var.get()]

    def set_recipes(self, names: Sequence[str], active: str | None, outputs: str) -> None:
        """The saved recipes in the menu, the one in use (None: the settings below) and
        what its outputs are."""
        self.recipe_menu.configure(values=[NO_RECIPE, *names])
        self.recipe_var.set(active if active is not None else NO_RECIPE)
        self.recipe_outputs.configure(text=outputs)
        self.recipe_outputs.grid() if outputs else self.recipe_outputs.grid_remove()
        for text in ("Rename…", "Delete", "Export…"):
            self.recipe_buttons[text].configure(state="normal" if active else "disabled")

    def include_subfolders(self) -> bool:
        return bool(self.subfolders_var.get())

    def set_names(self, text: str) -> None:
        self.names_label.configure(text=text)

    def set_runs(self, text: str, problem: bool = False) -> None:
        for label in (self.runs_label, self.preview_runs_label):
            label.configure(text=text, text_color=ERROR if problem else MUTED)

    def set_operations(self, operations: Sequence[Any]) -> None:
        self.operations = {op.name: op for op in operations}
        titles = [op.title or op.name for op in operations]
        self._title_to_name = {(op.title or op.name): op.name for op in operations}
        self.operation_menu.configure(values=[*titles, NO_STEP] if titles else
                                      ["no operations"])
        if operations and self.operation_var.get() == NO_STEP:
            return  # a reconnect must not slip an operation into the pipeline's run
        if operations:
            current = self.current_operation()
            op = self.operations.get(current or "") or operations[0]
            self.operation_var.set(op.title or op.name)
            self._show_operation(op)

    def _operation_picked(self, title: str) -> None:
        op = self.operations.get(self._title_to_name.get(title, ""))
        if op is not None:
            self._show_operation(op)
            self.controller.params_changed()
        elif title == NO_STEP:
            self.clear_operation()
            self.controller.params_changed()

    def clear_operation(self) -> None:
        """No step being edited: Process all runs the pipeline alone."""
        destroy_widgets(self.params_frame.winfo_children())
        self.controls = []
        self.operation_var.set(NO_STEP)
        self.description.configure(
            text="Process all runs the pipeline below. Pick an operation to add a step.",
            text_color=MUTED)

    def _show_operation(self, op: Any) -> None:
        destroy_widgets(self.params_frame.winfo_children())
        self.controls = []
        text = op.description or ""
        if getattr(op, "tileable", False):
            text += "  Large images are split into tiles across the fleet."
        self.description.configure(text=text.strip(), text_color=MUTED)
        try:
            specs: list[ControlSpec] = controls_for(op)
        except SchemaError as exc:
            self.description.configure(text=f"This operation cannot be used: {exc}",
                                       text_color=ERROR)
            return
        for row, spec in enumerate(specs):
            control = ParamControl(self.params_frame, spec, self.controller.params_changed)
            control.grid(row=row, column=0, sticky="ew", padx=8, pady=(0, 8))
            self.controls.append(control)
        if not specs:
            caption(self.params_frame, "No parameters.").grid(row=0, column=0, sticky="w",
                                                              padx=8)

    def current_operation(self) -> str | None:
        return self._title_to_name.get(self.operation_var.get())

    def select_operation(self, name: str) -> None:
        op = self.operations[name]
        self.operation_var.set(op.title or op.name)
        self._show_operation(op)

    def param_controls(self) -> dict[str, ParamControl]:
        return {c.spec.name: c for c in self.controls}

    def current_params(self) -> dict[str, Any]:
        """Typed values of the controls; raises ValueError naming the first bad one."""
        values: dict[str, Any] = {}
        problems = []
        for name, control in self.param_controls().items():
            try:
                values[name] = control.value()
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return values

    def output_format(self) -> str:
        return self.format_var.get()

    def quality(self) -> int:
        return round(self.quality_slider.get())

    def output_settings(self) -> OutputSettings:
        icc = {label: key for key, label in ICC_LABELS.items()}[self.icc_var.get()]
        metadata = {label: key for key, label in METADATA_LABELS.items()}[self.metadata_var.get()]
        return OutputSettings(progressive=self.progressive_var.get(),
                              subsampling=self.subsampling_var.get(),
                              lossless=self.lossless_var.get(), icc=icc, metadata=metadata)

    def _format_changed(self, notify: bool = True) -> None:
        fmt = self.format_var.get()
        original = fmt == "original"
        lossless = self.lossless_var.get() and fmt == "webp"
        lossy = (fmt in LOSSY_FORMATS or original) and not lossless
        self.quality_slider.configure(state="normal" if lossy else "disabled")

        def enable(widget: Any, on: bool) -> None:
            widget.configure(state="normal" if on else "disabled")

        enable(self.progressive_box, original or fmt == "jpeg")
        enable(self.lossless_box, original or fmt == "webp")
        enable(self.subsampling_menu, original or fmt in ("jpeg", "avif"))
        if notify:
            self.controller.params_changed()

    def _quality_moved(self) -> None:
        self.quality_label.configure(text=str(self.quality()))
        self.controller.params_changed()

    def set_pipeline(self, steps: Sequence[RequestStep], titles: dict[str, str]) -> None:
        destroy_widgets(self.steps_frame.winfo_children())
        if not steps:
            caption(self.steps_frame, "Empty: Process runs the operation above. Add steps "
                    "to chain operations.", wraplength=290, justify="left").grid(
                row=0, column=0, sticky="ew")
            return
        for index, step in enumerate(steps):
            ctk.CTkLabel(self.steps_frame, text=f"{index + 1}. {describe_step(step, titles)}",
                         anchor="w", wraplength=240, justify="left").grid(
                row=index, column=0, sticky="ew")
            ctk.CTkButton(self.steps_frame, text="✕", width=24, height=22,
                          fg_color="transparent", text_color=MUTED,
                          hover_color=("gray80", "gray30"),
                          command=lambda i=index: self.controller.remove_step(i)).grid(
                row=index, column=1)

    # ------------------------------------------------------------------ images
    @property
    def rows(self) -> dict[int, PoolRow]:
        """The row widgets on screen, by image id (only the visible rows exist)."""
        return self.image_list.rows

    def set_selected(self, job_id: int | None) -> None:
        self.image_list.set_selected(job_id)

    def set_count(self, count: int) -> None:
        self.count_label.configure(text=f"{count} image{'s' if count != 1 else ''}"
                                   if count else "none yet")

    def set_overall(self, overall: Overall) -> None:
        self.overall_bar.set(overall.fraction)
        self.overall_label.configure(text=overall.text)

    def set_running(self, running: bool) -> None:
        self.cancel_button.configure(state="normal" if running else "disabled")

    def set_drop_available(self, available: bool) -> None:
        self.image_list.empty_text = empty_hint_text(available)  # the list re-shows it
        self.empty_hint.configure(text=self.image_list.empty_text)

    def set_ready(self, ready: bool, why: str = "") -> None:
        self.process_button.configure(state="normal" if ready else "disabled")
        if why:
            self.description.configure(text=why, text_color=MUTED)

    # ------------------------------------------------------------------ preview
    def show_images(self, before: Image.Image | None, after: Image.Image | None,
                    caption_text: str = "", after_text: str = "processing preview…",
                    problem: bool = False) -> None:
        """``after_text`` stands in the after side while there is no after image."""
        self._before, self._after = before, after
        self._after_text = after_text
        self.preview_caption.configure(text=caption_text, text_color=ERROR if problem else MUTED)
        self._render_preview()

    @property
    def shown_after(self) -> Image.Image | None:
        """The "after" image on screen (None: the after side shows a text instead)."""
        return self._after

    def set_preview_mode(self, mode: str, split: float | None = None) -> None:
        """Show "Side by side" or "Slider" (with the divider at ``split``, 0..1)."""
        self.mode.set(mode)
        if split is not None:
            self.split.set(split)
        self._render_preview()

    def _render_preview(self) -> None:
        # Old CTkImages must outlive the configure() that replaces them: Tk deletes an
        # image when its Python object goes, and a label still showing it then errors.
        new_images: list[ctk.CTkImage] = []

        def put(label: ctk.CTkLabel, picture: Image.Image | None, text: str = "") -> None:
            if picture is None:
                label.configure(image=self._blank, text=text)
                return
            image = ctk.CTkImage(light_image=picture, size=picture.size)
            new_images.append(image)
            label.configure(image=image, text=text)

        for widget in (self.before_label, self.after_label, self.stage_hint, self.split):
            widget.grid_forget()
        box_w, box_h = PREVIEW_BOX
        if self._before is None:
            put(self.before_label, None)
            put(self.after_label, None)
            self.stage_hint.grid(row=0, column=0, columnspan=2)
        elif self.mode.get() == "Slider" and self._after is not None:
            put(self.before_label, compose_split(self._before, self._after, self.split.get(),
                                                 PREVIEW_BOX))
            put(self.after_label, None)
            self.before_label.grid(row=0, column=0, columnspan=2, padx=8, pady=8)
            self.split.grid(row=2, column=0, sticky="ew", padx=24, pady=(6, 0))
        else:
            half = (box_w - 24) // 2
            put(self.before_label, flatten(fit_within(self._before, half, box_h)))
            if self._after is None:
                put(self.after_label, None, self._after_text)
            else:
                put(self.after_label, flatten(fit_within(self._after, half, box_h)))
            self.before_label.grid(row=0, column=0, padx=(8, 4), pady=8)
            self.after_label.grid(row=0, column=1, padx=(4, 8), pady=8)
        self._images = new_images

    def show_result(self, title: str | None, meta: str, expiry: str, url: str = "") -> None:
        self.result_title.configure(text=title or "No result selected")
        self.result_meta.configure(text=meta or "Process an image to get a shareable link.")
        self.expiry_label.configure(text=expiry)
        self.link_entry.configure(state="normal")
        self.link_entry.delete(0, "end")
        self.link_entry.insert(0, url)
        self.link_entry.configure(state="readonly")
        has_link = bool(url)
        for button in (self.copy_button, self.open_button, self.save_button):
            button.configure(state="normal" if has_link else "disabled")
