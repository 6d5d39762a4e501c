"""The Subjects tab: register a subject from photos; rename, export, delete, import and place subjects.

API endpoints: /register (RegisterForm's fields by name), /rename_subject, /delete_subject, /export_subject,
/import_subject.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from engines.types import LIMITS, REGISTER_PRESETS, Cancelled, InputError, SubjectInfo, unknown_subject
from studio.ui.canvas import add_region
from studio.ui.forms import RegisterForm, form_handler
from studio.ui.jobs import ON_GPU, QUIET, GpuWrapper, Sessions, gpu_gate, guarded, on_gpu, stream
from studio.ui.views import idle_html, progress_html, subject_cards, subject_markdown

CLASS_WORDS = (
    "dog",
    "cat",
    "person",
    "toy",
    "plushie",
    "teddy bear",
    "mug",
    "backpack",
    "sneaker",
    "car",
    "bird",
    "ball",
    "box",
    "tent",
    "star",
    "ring",
)  # suggestions only; the last five are the demo world's objects
PICK_ONE = "Select a subject to rename, export or delete it."
PRESET_LABELS = {"instant": "Instant (no training)"}  # the other presets are shown by their names
# Given an event's `.then` or `.success`, chains "refresh every subject picker" after an event that changed the library
LibraryChanged = Callable[[Callable[..., Any]], Any]


def register_seconds(request: Any, *values: Any) -> float:
    """ZeroGPU duration of a /register call, from the same arguments: the preset's `gpu_seconds`."""
    return RegisterForm.from_values(values).gpu_seconds()


class SubjectsTab:
    """The widgets of the Subjects tab and their handlers; `form` holds RegisterForm's widgets by field name."""

    def __init__(self, sessions: Sessions, gpu: GpuWrapper | None, subjects: list[SubjectInfo]):
        self.sessions, self.gpu = sessions, gpu
        self.form: dict[str, Any] = {}
        with gr.Tab("Subjects", id="subjects", elem_id="tab-subjects"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._library_column(subjects)
                with gr.Column(scale=2, elem_classes="tr-card"):
                    self._register_card()

    # ------------------------------------------------------------------------------------------ widgets
    def _library_column(self, subjects: list[SubjectInfo]) -> None:
        self.gallery = gr.Gallery(
            value=subject_cards(subjects),
            label="Your subjects",
            columns=4,
            height=300,
            allow_preview=False,
            format="png",
            fit_columns=False,
            elem_id="subject-gallery",
            object_fit="cover",
            interactive=False,
        )
        self.detail = gr.Markdown(PICK_ONE, elem_id="subject-detail")
        with gr.Row():
            self.pick = gr.Dropdown(
                [s.name for s in subjects],
                value=None,
                label="Subject",
                elem_id="subject-pick",
                scale=2,
                allow_custom_value=True,
            )
            self.rename_to = gr.Textbox(label="New name", scale=2, elem_id="rename-to")
        with gr.Row():
            self.rename_btn = gr.Button("Rename", size="sm", scale=1, elem_id="rename-btn")
            self.export_btn = gr.Button("Export", size="sm", scale=1, elem_id="export-btn")
            self.place_btn = gr.Button("Place on canvas", size="sm", scale=1, variant="primary", elem_id="place-btn")
            self.delete_btn = gr.Button("Delete", size="sm", variant="stop", scale=1, elem_id="delete-btn")
        with gr.Row():
            self.export_file = gr.File(
                label="Exported subject (.safetensors)", interactive=False, visible=False, elem_id="export-file"
            )
            self.import_btn = gr.UploadButton(
                "Import a subject (.safetensors)", file_types=[".safetensors"], size="sm", elem_id="import-btn"
            )

    def _register_card(self) -> None:
        gr.Markdown(
            f"### New subject\nDrop 1–{LIMITS.photos} photos of one subject (more angles, plain backgrounds "
            "help). Give it a name you'll type as `<name>` in prompts."
        )
        self.form["photos"] = gr.File(
            label="Photos", file_count="multiple", file_types=["image"], elem_id="subject-photos", height=140
        )
        with gr.Row():
            self.form["name"] = gr.Textbox(label="Name", placeholder="rex", elem_id="subject-name")
            self.form["class_word"] = gr.Dropdown(
                list(CLASS_WORDS),
                value=None,
                allow_custom_value=True,
                label="Class word",
                elem_id="subject-class",
                info="what it is: dog, mug, toy…",
            )
        self.form["preset"] = gr.Radio(
            [(PRESET_LABELS.get(name, name), name) for name in REGISTER_PRESETS],
            value=RegisterForm.preset,
            label="Preset",
            elem_id="reg-preset",
            info="instant: no training, the photos do the work · quick: a first look · standard: default · "
            "thorough: hard subjects",
        )
        with gr.Row():
            self.register_btn = gr.Button("Register", variant="primary", elem_id="register-btn", scale=3)
            self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="register-cancel", scale=1)
        self.status = gr.HTML(idle_html("Registration takes one short GPU job."), elem_id="register-status")

    # ------------------------------------------------------------------------------------------ events
    def wire(self, library_changed: LibraryChanged, canvas: Any, tabs: Any) -> None:
        """`canvas` and `tabs`: "Place on canvas" adds a region there and switches to the Compose tab."""
        handler = form_handler(RegisterForm, guarded(self.register))
        registered = self.register_btn.click(
            on_gpu(self.gpu, handler, register_seconds),
            RegisterForm.widgets_in_order(self.form),
            [self.status, self.gallery],
            api_name="register",
            show_progress="minimal",
            show_progress_on=self.status,
            validator=gpu_gate(self.sessions, handler),  # one GPU job per visitor at a time on a shared studio
            **ON_GPU,
        )
        renamed = self.rename_btn.click(
            guarded(self.rename),
            [self.pick, self.rename_to],
            [self.pick, self.detail],
            api_name="rename_subject",
            show_progress="hidden",
        )
        deleted = self.delete_btn.click(
            guarded(self.delete), self.pick, [self.pick, self.detail], api_name="delete_subject", show_progress="hidden"
        )
        imported = self.import_btn.upload(
            guarded(self.import_subject),
            self.import_btn,
            self.detail,
            api_name="import_subject",
            show_progress="hidden",
        )
        for chain in (registered.then, renamed.success, deleted.success, imported.success):
            library_changed(chain)
        self.export_btn.click(
            guarded(self.export), self.pick, self.export_file, api_name="export_subject", show_progress="hidden"
        )
        self.place_btn.click(guarded(self.place), [self.pick, canvas], [canvas, tabs], **QUIET)
        self.cancel_btn.click(self.cancel_registration, None, None, queue=False, **QUIET)
        self.gallery.select(self.card_selected, None, self.pick, **QUIET)
        self.pick.change(self.subject_picked, self.pick, [self.detail, self.rename_to], **QUIET)

    # ------------------------------------------------------------------------------------------ handlers
    def subject_widgets(self) -> tuple[Any, ...]:
        return self.gallery, self.pick

    def show_subjects(self, subjects: list[SubjectInfo]) -> dict[Any, Any]:
        """The library changed (or the page loaded): the cards and the subject picker."""
        return {self.gallery: subject_cards(subjects), self.pick: gr.update(choices=[s.name for s in subjects])}

    def register(self, form: RegisterForm, request: gr.Request) -> Iterator[tuple[Any, Any]]:
        """Stream (status, subject cards): step, loss and ETA while it trains; the new card when it is ready.
        Studio.register refuses a name that is taken before any work."""
        wanted = form.to_request()
        studio = self.sessions.studio_for(request)
        cancel = self.sessions.cancel_flag(request, "register", fresh=True)
        title = f"Registering <{wanted.name}>"
        yield progress_html(title, extra="preparing photos"), gr.skip()
        try:
            for kind, item in stream(lambda on_step, flag: studio.register(wanted, on_step, flag), cancel):
                if kind == "progress":
                    yield progress_html(title, item), gr.skip()
                else:
                    trained = f"{item.steps} steps" if item.has_residual else "instant"
                    yield (
                        progress_html(f"<{item.name}> is ready", extra=f"{trained} · {item.holds}", state="done"),
                        subject_cards(studio.subjects()),
                    )
        except Cancelled:
            yield idle_html("Registration cancelled — nothing was saved."), gr.skip()

    def cancel_registration(self, request: gr.Request) -> None:
        self.sessions.cancel_flag(request, "register").set()

    def card_selected(self, event: gr.SelectData, request: gr.Request) -> Any:
        subjects = self.sessions.subjects(request)  # the cards are in the library's order
        if event.index is None or event.index >= len(subjects):
            return gr.skip()
        return gr.update(value=subjects[event.index].name)

    def subject_picked(self, name: str | None, request: gr.Request) -> tuple[str, Any]:
        """(details, the "new name" box prefilled with the current name)."""
        subject = next((s for s in self.sessions.subjects(request) if s.name == name), None)
        if subject is None:
            return PICK_ONE, gr.skip()
        return subject_markdown(subject), subject.name

    def rename(self, name: str | None, new_name: str | None, request: gr.Request) -> tuple[Any, str]:
        renamed = self.sessions.studio_for(request).rename_subject(_picked(name), (new_name or "").strip())
        names = [s.name for s in self.sessions.subjects(request)]
        return (
            gr.update(choices=names, value=renamed.name),
            f"Renamed `<{name}>` to `<{renamed.name}>`. Prompts that use `<{name}>` need updating.",
        )

    def delete(self, name: str | None, request: gr.Request) -> tuple[Any, str]:
        self.sessions.studio_for(request).delete_subject(_picked(name))
        return gr.update(choices=[s.name for s in self.sessions.subjects(request)], value=None), f"Deleted `<{name}>`."

    def export(self, name: str | None, request: gr.Request) -> Any:
        """The subject as one .safetensors file (its residuals, class word and photos), offered as a download."""
        folder = self.sessions.outputs(request) / "export"
        folder.mkdir(parents=True, exist_ok=True)
        path = self.sessions.studio_for(request).export_subject(_picked(name), folder / f"{name}.safetensors")
        return gr.update(value=str(path), visible=True)

    def place(self, name: str | None, canvas: str, request: gr.Request) -> tuple[str, Any]:
        """Add a region for the picked subject and go to the canvas."""
        known = self.sessions.class_words(request)
        if _picked(name) not in known:
            raise unknown_subject(name, known)
        return add_region(canvas, f"<{name}>"), gr.Tabs(selected="compose")

    def import_subject(self, file: Any, request: gr.Request) -> str:
        path = getattr(file, "name", file)
        if not path or Path(path).suffix.lower() != ".safetensors":
            raise InputError("import a subject file exported by Troupe (.safetensors)")
        imported = self.sessions.studio_for(request).import_subject(path)
        return f"Imported `<{imported.name}>` (a {imported.class_word})."


def _picked(name: str | None) -> str:
    if not name:
        raise InputError("select a subject first")
    return name
