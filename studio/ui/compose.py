"""The Compose tab: pick a relation, lay out regions on the canvas, set up the image, generate, reuse, save, open.

The relation picker lists the presets and this session's learned relations (the Relations tab refreshes it); a
learned one shows its "Relation strength", the scale of its LoRA.

API endpoints: /generate and /save_project (GenerateForm's fields by name), /stop, /apply_relation, /add_region,
/open_png and /open_project (both fill GenerateForm's widgets).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from gradio.utils import get_upload_folder

from engines.types import Cancelled, GenerateRequest, GenerateResult, InputError, SubjectInfo
from studio.ui.canvas import (
    add_region,
    canvas_component,
    cleared,
    empty_canvas,
    layout_to_canvas,
    size_of,
    with_size,
    with_suggestions,
)
from studio.ui.forms import GenerateForm, form_handler, parse_size, size_choices, with_choice
from studio.ui.image_settings import generate_seconds, settings_card
from studio.ui.jobs import ON_GPU, QUIET, GpuWrapper, Sessions, gpu_gate, guarded, on_gpu, stream
from studio.ui.loras import check_uploaded, wire_lora_card
from studio.ui.references import references_card, widened
from studio.ui.views import idle_html, is_learned, progress_html, relation_choices, subject_labels

if TYPE_CHECKING:
    from engines.service import Studio

SCALE_RANGE = (0.0, 2.0)  # the relation strength slider's range; a PNG may carry more (see _widened_scale)


class ComposeTab:
    """The widgets of the Compose tab and their handlers; `form` holds GenerateForm's widgets by field name."""

    def __init__(self, sessions: Sessions, gpu: GpuWrapper | None, native: int, subjects: list[SubjectInfo]):
        self.sessions, self.gpu, self.native = sessions, gpu, native
        self.form: dict[str, Any] = {}
        with gr.Tab("Compose", id="compose", elem_id="tab-compose"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=6, min_width=480):
                    self._relation_card(sessions.studio.relations())
                    self._canvas_card(native, subjects)
                    self.lora_widgets = settings_card(self.form, native, sessions.studio.job_cap)
                    references_card(self.form)
                with gr.Column(scale=5, min_width=380):
                    self._prompt_column()
            self.selected_result = gr.State(None)
        self.canvas = self.form["canvas"]
        self.size = self.form["size"]

    # ------------------------------------------------------------------------------------------ widgets
    def _relation_card(self, relations: Mapping[str, Any]) -> None:
        with gr.Group(elem_classes="tr-card"):
            gr.Markdown(
                "**Relation** — pick how your subjects relate; it fills the prompt and proposes boxes you can move.",
                elem_classes="tr-hint",
            )
            with gr.Row():
                # custom values: a relation learned after start-up reaches only the pickers a browser refreshed; an
                # API client names it as it is, and the engine refuses a name it does not know
                self.form["relation"] = gr.Dropdown(
                    relation_choices(relations), value=GenerateForm.relation, label="Relation", elem_id="relation",
                    scale=3, allow_custom_value=True,
                )  # fmt: skip
                self.slot_a = gr.Dropdown(
                    [],
                    value=None,
                    label="Subject A",
                    allow_custom_value=True,
                    elem_id="relation-a",
                    scale=2,
                    info="a <subject> or words",
                )
                self.slot_b = gr.Dropdown(
                    [], value=None, label="Subject B", allow_custom_value=True, elem_id="relation-b", scale=2
                )
                self.scene = gr.Textbox("", label="Scene", placeholder="on the beach", elem_id="scene", scale=3)
            self.form["relation_scale"] = gr.Slider(
                *SCALE_RANGE, value=GenerateForm.relation_scale, step=0.05, label="Relation strength",
                info="how much the learned relation's LoRA changes the picture (1 = as trained)", visible=False,
                elem_id="relation-scale",
            )  # fmt: skip

    def _canvas_card(self, native: int, subjects: list[SubjectInfo]) -> None:
        with gr.Group(elem_classes="tr-card"):
            self.form["canvas"] = canvas_component(empty_canvas(native, native, subject_labels(subjects)))
            with gr.Row(elem_classes="tr-add-row"):
                gr.HTML(
                    '<span class="tr-add-label">Add a region</span>',
                    scale=0,
                    min_width=90,
                    elem_classes="tr-add-label-wrap",
                )
                self.add_label = gr.Dropdown(
                    [],
                    value=None,
                    allow_custom_value=True,
                    show_label=False,
                    container=False,
                    scale=4,
                    elem_id="add-region-label",
                    interactive=True,
                )
                self.add_btn = gr.Button("+ Add region", size="sm", scale=1, min_width=90, elem_id="add-region-btn")
                self.clear_btn = gr.Button(
                    "Clear", size="sm", scale=0, min_width=70, variant="secondary", elem_id="clear-canvas-btn"
                )

    def _prompt_column(self) -> None:
        self.form["prompt"] = gr.Textbox(
            GenerateForm.prompt,
            label="Prompt",
            lines=3,
            elem_id="prompt",
            placeholder="a photo of <rex> hugging <milo> on the beach — <name> is a "
            "registered subject; region words must appear here; (words:1.3) weighs them",
        )
        self.form["negative_prompt"] = gr.Textbox(
            GenerateForm.negative_prompt,
            label="Negative prompt",
            lines=1,
            elem_id="negative-prompt",
            placeholder="blurry, low quality",
        )
        with gr.Row():
            self.generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
        self.status = gr.HTML(idle_html("Ready."), elem_id="gen-status")
        self.results = gr.Gallery(
            label="Results (live preview while generating)",
            format="png",
            columns=2,
            height=380,
            elem_id="result-gallery",
            interactive=False,
            object_fit="contain",
            buttons=["download", "fullscreen"],
        )
        with gr.Accordion("Reuse · save · open", open=True, elem_classes="tr-card"):
            with gr.Row():
                self.reuse_btn = gr.Button("Reuse settings of selected result", size="sm", elem_id="reuse-btn")
                self.png_in = gr.UploadButton("Open a PNG", file_types=[".png"], size="sm", elem_id="open-png")
            with gr.Row():
                self.save_btn = gr.Button("Save project", size="sm", elem_id="save-project")
                self.project_in = gr.UploadButton(
                    "Open project", file_types=[".json"], size="sm", elem_id="open-project"
                )
            self.project_file = gr.File(label="Project file", interactive=False, visible=False, elem_id="project-file")

    # ------------------------------------------------------------------------------------------ events
    def wire(self) -> None:
        self._wire_canvas()
        self._wire_generation()
        self._wire_files()

    def _wire_canvas(self) -> None:
        relation = self.form["relation"]
        inputs = [relation, self.slot_a, self.slot_b, self.scene, self.canvas]
        outputs = [self.slot_b, self.form["prompt"], self.canvas]
        picked = [self.scene, self.slot_b, self.form["relation_scale"]]
        relation.change(self.relation_picked, relation, picked, queue=False, **QUIET).then(
            guarded(self.apply_relation), inputs, outputs, api_name="apply_relation", show_progress="hidden"
        )
        for trigger in (self.slot_a.change, self.slot_b.change, self.scene.submit):
            trigger(guarded(self.apply_relation), inputs, outputs, **QUIET)
        self.add_btn.click(
            guarded(self.new_region),
            [self.canvas, self.add_label],
            [self.canvas, self.add_label],
            api_name="add_region",
            show_progress="hidden",
        )
        self.clear_btn.click(guarded(cleared), self.canvas, self.canvas, **QUIET)
        self.size.change(guarded(self.resize_canvas), [self.size, self.canvas], self.canvas, **QUIET)

    def _wire_generation(self) -> None:
        inputs = GenerateForm.widgets_in_order(self.form)
        handler = form_handler(GenerateForm, guarded(self.generate))
        generate = on_gpu(self.gpu, handler, generate_seconds)
        gate = gpu_gate(self.sessions, handler, form_handler(GenerateForm, self.cost_problem))
        for trigger, api in ((self.generate_btn.click, {"api_name": "generate"}),
                             (self.form["prompt"].submit, {"api_visibility": "undocumented"})):  # fmt: skip
            trigger(generate, inputs, [self.status, self.results], show_progress="minimal",
                    show_progress_on=self.status, validator=gate, **api, **ON_GPU)  # fmt: skip
        self.stop_btn.click(self.stop, None, None, queue=False, api_name="stop", show_progress="hidden")
        self.results.select(self.result_selected, None, self.selected_result, **QUIET)
        wire_lora_card(self.form["loras"], self.lora_widgets, QUIET)

    def _wire_files(self) -> None:
        widgets = GenerateForm.widgets_in_order(self.form)
        self.reuse_btn.click(guarded(self.reuse), self.selected_result, widgets, **QUIET)
        self.png_in.upload(guarded(self.open_png), self.png_in, widgets, api_name="open_png", show_progress="hidden")
        self.save_btn.click(
            form_handler(GenerateForm, guarded(self.save_project)),
            widgets,
            self.project_file,
            api_name="save_project",
            show_progress="hidden",
        )
        self.project_in.upload(
            guarded(self.open_project), self.project_in, widgets, api_name="open_project", show_progress="hidden"
        )

    # ------------------------------------------------------------------------------------------ handlers
    def relation_picked(self, relation: str | None, request: gr.Request) -> tuple[Any, Any, Any]:
        """A relation was picked: suggest its scene; a one-subject relation hides Subject B; a learned one shows
        its strength."""
        relations = self.sessions.studio_for(request).relations()
        chosen = relations.get(relation or "")
        return (
            gr.update(value=chosen.scene if chosen else ""),
            gr.update(visible=not chosen or chosen.arity == 2),
            gr.update(visible=is_learned(relations, relation)),
        )

    def apply_relation(
        self,
        relation: str | None,
        subject_a: str | None,
        subject_b: str | None,
        scene: str | None,
        canvas: str,
        request: gr.Request,
    ) -> tuple[Any, Any, Any]:
        """Fill the prompt and propose boxes once every slot of the relation is filled: (slot B, prompt, canvas)."""
        studio = self.sessions.studio_for(request)
        chosen = studio.relations().get(relation or "")
        slot_b = gr.update(visible=not chosen or chosen.arity == 2)
        participants = [str(p or "").strip() for p in (subject_a, subject_b)[: chosen.arity]] if chosen else []
        if not chosen or not all(participants):
            return slot_b, gr.skip(), gr.skip()
        prompt, layout = studio.apply_relation(chosen.name, participants, scene or "")
        width, height = size_of(canvas)
        return slot_b, prompt, layout_to_canvas(layout, width, height, subject_labels(studio.subjects()))

    def new_region(self, canvas: str, label: str | None) -> tuple[str, Any]:
        """A new region in front, labelled with a `<subject>` or words; the label picker empties."""
        return add_region(canvas, label or ""), gr.update(value=None)

    def resize_canvas(self, size: str, canvas: str) -> str:
        width, height = parse_size(size)
        native = self.sessions.native_size(self.native)
        return with_size(canvas, width or native, height or native)

    def subject_widgets(self) -> tuple[Any, ...]:
        return self.slot_a, self.slot_b, self.add_label, self.canvas

    def show_subjects(self, subjects: list[SubjectInfo], canvas: str) -> dict[Any, Any]:
        """The library changed (or the page loaded): every `<subject>` picker and the canvas suggestions."""
        labels = subject_labels(subjects)
        pickers = {picker: gr.update(choices=labels) for picker in (self.slot_a, self.slot_b, self.add_label)}
        return {**pickers, self.canvas: with_suggestions(canvas, labels)}

    def relation_widgets(self) -> tuple[Any, ...]:
        return (self.form["relation"],)

    def show_relations(self, relations: Mapping[str, Any], picked: str | None) -> dict[Any, Any]:
        """The relation library changed (or the page loaded): the picker's entries; a relation that is gone is
        unpicked (its change event then hides the strength slider)."""
        value = picked if (picked or "") in relations else ""
        return {self.form["relation"]: gr.update(choices=relation_choices(relations), value=value)}

    def generate(self, form: GenerateForm, request: gr.Request) -> Iterator[tuple[Any, Any]]:
        """Stream (status, results): previews while running, then the PNGs. Bad input: one message, no change."""
        studio = self.sessions.studio_for(request)
        wanted = self.requested(form, studio, request)
        if self.sessions.per_user_root is not None:  # a Space reads only the visitor's uploads, never typed paths
            check_uploaded(wanted.loras, [Path(get_upload_folder()), Path(studio.library_dir)])
        cancel = self.sessions.cancel_flag(request, "generate", fresh=True)
        yield progress_html("Starting…", extra="waiting for the model"), gr.skip()
        try:
            for kind, item in stream(lambda on_step, flag: studio.generate(wanted, on_step, flag), cancel):
                if kind == "progress":
                    yield progress_html("Generating", item), [item.preview] if item.preview is not None else gr.skip()
                else:
                    yield self.finished(item, self.sessions.outputs(request))
        except Cancelled:
            yield idle_html("Stopped — nothing was changed."), gr.skip()

    def cost_problem(self, form: GenerateForm, request: gr.Request) -> str | None:
        """Why a shared studio would refuse this job (its cost cap), asked before the job joins the queue; a form
        with bad input passes here, and the job says what is wrong with it."""
        studio = self.sessions.studio_for(request)
        try:
            wanted = self.requested(form, studio, request)
        except InputError:
            return None
        try:
            studio.check_cost(wanted)
        except InputError as error:
            return str(error)
        return None

    def requested(self, form: GenerateForm, studio: Studio, request: gr.Request) -> GenerateRequest:
        """The form as a request; box fitting "auto" becomes the loaded model family's choice, so the image and a
        saved project record what ran."""
        wanted = form.to_request(self.sessions.class_words(request))
        return studio.with_default_fit(wanted) if form.fit_choice == "auto" else wanted

    def stop(self, request: gr.Request) -> None:
        self.sessions.cancel_flag(request, "generate").set()

    def result_selected(self, event: gr.SelectData) -> str | None:
        """The path of the clicked result (for "Reuse settings")."""
        value = event.value or {}
        image = value.get("image") if isinstance(value, dict) else None
        return image.get("path") if isinstance(image, dict) else None

    def reuse(self, path: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not path:
            raise InputError("click a result first, then reuse its settings")
        opened = self.sessions.studio_for(request).open_png(path)  # says which VAE/embeddings it needs, if not loaded
        if opened.note:
            gr.Warning(opened.note)
        return self._apply(opened.request, request)

    def open_png(self, file: Any, request: gr.Request) -> tuple[Any, ...]:
        """A Troupe PNG's settings, or an A1111 or ComfyUI PNG's as a start; what did not carry over is one toast."""
        path = getattr(file, "name", file)
        if not path or Path(path).suffix.lower() != ".png":
            raise InputError("open a PNG made by Troupe, A1111 or ComfyUI")
        opened = self.sessions.studio_for(request).open_png(path)
        if opened.note:
            gr.Warning(opened.note)
        return self._apply(opened.request, request)

    def save_project(self, form: GenerateForm, request: gr.Request) -> Any:
        """The composition as a .troupe.json (offered as a download)."""
        studio = self.sessions.studio_for(request)
        width, height = size_of(form.canvas)
        path = studio.save_project(
            self.requested(form, studio, request),
            width,
            height,
            self.sessions.outputs(request) / "projects",
        )
        return gr.update(value=str(path), visible=True)

    def open_project(self, file: Any, request: gr.Request) -> tuple[Any, ...]:
        path = getattr(file, "name", file)
        if not path:
            raise InputError("choose a project file (.json)")
        project = self.sessions.studio.read_project(path)
        missing = sorted(set(project.subjects) - set(self.sessions.class_words(request)))
        if missing:
            gr.Warning(
                "This project names subjects you have not registered: "
                + ", ".join(f"<{m}>" for m in missing)
                + ". Import them before generating."
            )
        return self._apply(project.request, request, project.width, project.height)

    def _apply(
        self, wanted: GenerateRequest, request: gr.Request, width: int | None = None, height: int | None = None
    ) -> tuple[Any, ...]:
        """A request back into GenerateForm's widgets; the canvas keeps a project's own size."""
        native = self.sessions.native_size(self.native)
        width, height = width or wanted.width or native, height or wanted.height or native
        canvas = layout_to_canvas(wanted.layout, width, height, subject_labels(self.sessions.subjects(request)))
        form = GenerateForm.from_request(wanted, canvas, self.sessions.studio_for(request).relations())
        size = gr.update(choices=with_choice(size_choices(native), form.size), value=form.size)
        return form.as_outputs(size=size, **widened(form), **_widened_scale(form.relation_scale))

    def finished(self, result: GenerateResult, folder: Path) -> tuple[str, list[str]]:
        """The last update of a generation: "Done" with the seeds, and the saved PNGs (settings included)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        paths = [
            str(self.sessions.studio.save_png(image, folder / f"troupe-{stamp}-{index + 1}.png"))
            for index, image in enumerate(result.images)
        ]
        seeds = ", ".join(str(s) for s in result.seeds)
        took = result.timings.get("total", 0.0)
        for warning in result.warnings:  # a toast each, and on the status line, which stays after the toasts go
            gr.Warning(warning)
        notes = "".join(f" · ⚠ {w}" for w in result.warnings)
        return progress_html("Done", extra=f"seed {seeds} · {took:.1f}s{notes}", state="done"), paths


def _widened_scale(scale: float) -> dict[str, Any]:
    """A restored relation strength beyond the slider's range widens it (the engine accepts up to ±4)."""
    low, high = SCALE_RANGE
    if low <= scale <= high:
        return {}
    return {"relation_scale": gr.update(value=scale, minimum=min(low, scale), maximum=max(high, scale))}
