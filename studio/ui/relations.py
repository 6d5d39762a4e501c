"""The Relations tab: teach a relation from a few example pictures (DreamRelation's relation LoRA), and keep the
learned ones: rename, delete, export (diffusers' or kohya's format), import.

Teaching, as a person does it: name the relation ("leaning on", template "{a} leaning on {b}"), upload 3–20 example
pictures, and for each one write its prompt, name object A and object B (words of the prompt), and click on the
picture: two clicks on opposite corners draw A's box, then two more draw B's; optional clicks add keypoints. The
clicks (studio/ui/relation_editor.py) build the examples' JSON (studio/ui/relation_examples.py) shown under
"Annotations"; a ready folder's
relation.json uploaded with its pictures fills it at once. Train writes the folder deterministically and trains
with progress and Cancel; Train again after Cancel resumes from the engine's checkpoint.

API endpoints: /teach_relation (RelationForm's fields by name), /cancel_relation, /rename_relation,
/delete_relation, /export_relation, /import_relation.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from engines.types import KEYPOINT_SWITCHES, Cancelled, InputError, RelationInfo
from studio.ui.forms import RelationForm, form_handler
from studio.ui.jobs import ON_GPU, QUIET, GpuWrapper, Sessions, gpu_gate, guarded, on_gpu, stream
from studio.ui.relation_editor import ExampleEditor
from studio.ui.relation_examples import discard
from studio.ui.views import idle_html, progress_html

PICK_ONE = "Select a relation to rename, export or delete it."
FORMATS = [("diffusers", "diffusers"), ("kohya (A1111, ComfyUI)", "kohya")]
RANKS = [2, 4, 8, 16, 32]
LibraryChanged = Callable[[Callable[..., Any]], Any]  # chains "refresh every relation picker" after an event


def teach_seconds(request: Any, *values: Any) -> float:
    """ZeroGPU duration of a /teach_relation call, from the same arguments."""
    return RelationForm.from_values(values).gpu_seconds()


class RelationsTab:
    """The widgets of the Relations tab and their handlers; `form` holds RelationForm's widgets by field name."""

    def __init__(self, sessions: Sessions, gpu: GpuWrapper | None, learned: list[RelationInfo]):
        self.sessions, self.gpu = sessions, gpu
        self.form: dict[str, Any] = {}
        with gr.Tab("Relations", id="relations", elem_id="tab-relations"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3):
                    self._library_column(learned)
                with gr.Column(scale=4, elem_classes="tr-card"):
                    self._teach_card()
                    self.editor = ExampleEditor(self.form)
                    self._train_row()

    # ------------------------------------------------------------------------------------------ widgets
    def _library_column(self, learned: list[RelationInfo]) -> None:
        self.table = gr.Markdown(relation_table(learned), elem_id="relation-list")
        self.detail = gr.Markdown(PICK_ONE, elem_id="relation-detail")
        with gr.Row():
            self.pick = gr.Dropdown(
                [r.name for r in learned], value=None, label="Relation", elem_id="relation-pick", scale=2,
                allow_custom_value=True,
            )  # fmt: skip
            self.rename_to = gr.Textbox(label="New name", scale=2, elem_id="relation-rename-to")
        with gr.Row():
            self.rename_btn = gr.Button("Rename", size="sm", elem_id="relation-rename-btn")
            self.delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="relation-delete-btn")
        with gr.Row():
            self.export_format = gr.Radio(FORMATS, value="diffusers", label="Export as", elem_id="relation-format")
            self.export_btn = gr.Button("Export", size="sm", elem_id="relation-export-btn")
        self.export_file = gr.File(
            label="Exported relation (.safetensors)", interactive=False, visible=False, elem_id="relation-export-file"
        )
        self.import_btn = gr.UploadButton(
            "Import a relation (.safetensors)", file_types=[".safetensors"], size="sm", elem_id="relation-import-btn"
        )

    def _teach_card(self) -> None:
        gr.Markdown(
            "### Teach a relation\nUpload 3–20 pictures of two things in the relation (or a ready folder's "
            "`relation.json` with its pictures). For each picture write its prompt, name object A and B, and click "
            "two opposite corners of each one's box."
        )
        with gr.Row():
            self.form["relation"] = gr.Textbox(label="Relation", placeholder="leaning on", elem_id="relation-words")
            self.form["template"] = gr.Textbox(
                label="Template", placeholder="{a} leaning on {b}", elem_id="relation-template"
            )
            self.form["name"] = gr.Textbox(label="Name", placeholder="leaning on", elem_id="relation-name",
                                           info="what the Relation picker shows")  # fmt: skip

    def _train_row(self) -> None:
        defaults = RelationForm()
        with gr.Row():
            self.form["steps"] = gr.Slider(
                1, 1000, value=defaults.steps, step=1, label="Steps", elem_id="relation-steps"
            )
            self.form["rank"] = gr.Dropdown(RANKS, value=defaults.rank, label="Rank", elem_id="relation-rank",
                                            info="the LoRA's size")  # fmt: skip
            self.form["keypoints"] = gr.Radio(list(KEYPOINT_SWITCHES), value=defaults.keypoints, elem_id="relation-keypoints",
                                              label="Keypoint matching loss", info="DreamRelation's pose term; auto: "
                                              "the model's choice (off for the demo model, where it measured worse)")  # fmt: skip
        with gr.Row():
            self.train_btn = gr.Button("Train", variant="primary", elem_id="relation-train", scale=3)
            self.cancel_btn = gr.Button("Cancel", variant="stop", elem_id="relation-cancel", scale=1)
        self.status = gr.HTML(
            idle_html("Training is one GPU job; Cancel keeps its progress."), elem_id="relation-status"
        )

    # ------------------------------------------------------------------------------------------ events
    def wire(self, library_changed: LibraryChanged) -> None:
        handler = form_handler(RelationForm, guarded(self.teach))
        taught = self.train_btn.click(
            on_gpu(self.gpu, handler, teach_seconds), RelationForm.widgets_in_order(self.form), self.status,
            api_name="teach_relation", show_progress="minimal", show_progress_on=self.status,
            validator=gpu_gate(self.sessions, handler), **ON_GPU,  # one GPU job per visitor on a shared studio
        )  # fmt: skip
        self.cancel_btn.click(self.cancel, None, None, queue=False, api_name="cancel_relation", show_progress="hidden")
        renamed = self.rename_btn.click(guarded(self.rename), [self.pick, self.rename_to], [self.pick, self.detail],
                                        api_name="rename_relation", show_progress="hidden")  # fmt: skip
        deleted = self.delete_btn.click(guarded(self.delete), self.pick, [self.pick, self.detail],
                                        api_name="delete_relation", show_progress="hidden")  # fmt: skip
        imported = self.import_btn.upload(guarded(self.import_relation), self.import_btn, self.detail,
                                          api_name="import_relation", show_progress="hidden")  # fmt: skip
        for chain in (taught.then, renamed.success, deleted.success, imported.success):
            library_changed(chain)
        self.export_btn.click(guarded(self.export), [self.pick, self.export_format], self.export_file,
                              api_name="export_relation", show_progress="hidden")  # fmt: skip
        self.pick.change(self.relation_picked, self.pick, [self.detail, self.rename_to], **QUIET)
        self.editor.wire()

    # ------------------------------------------------------------------------------------------ library
    def relation_widgets(self) -> tuple[Any, ...]:
        return self.table, self.pick

    def show_relations(self, learned: list[RelationInfo]) -> dict[Any, Any]:
        """The library changed (or the page loaded): the list and the picker."""
        return {self.table: relation_table(learned), self.pick: gr.update(choices=[r.name for r in learned])}

    def relation_picked(self, name: str | None, request: gr.Request) -> tuple[str, Any]:
        info = next((r for r in self.sessions.studio_for(request).learned_relations() if r.name == name), None)
        return (relation_markdown(info), info.name) if info else (PICK_ONE, gr.skip())

    def rename(self, name: str | None, new_name: str | None, request: gr.Request) -> tuple[Any, str]:
        studio = self.sessions.studio_for(request)
        renamed = studio.rename_relation(_picked(name), (new_name or "").strip())
        names = [r.name for r in studio.learned_relations()]
        return gr.update(choices=names, value=renamed.name), f"Renamed '{name}' to '{renamed.name}'."

    def delete(self, name: str | None, request: gr.Request) -> tuple[Any, str]:
        studio = self.sessions.studio_for(request)
        studio.delete_relation(_picked(name))
        return gr.update(choices=[r.name for r in studio.learned_relations()], value=None), f"Deleted '{name}'."

    def export(self, name: str | None, fmt: str | None, request: gr.Request) -> Any:
        """The relation's LoRA as one .safetensors file (its card inside), offered as a download."""
        folder = self.sessions.outputs(request) / "export"
        folder.mkdir(parents=True, exist_ok=True)
        fmt = fmt or "diffusers"
        file = folder / f"{_picked(name).replace(' ', '-')}-{fmt}.safetensors"  # a checked name: words only
        path = self.sessions.studio_for(request).export_relation(name, file, fmt)
        return gr.update(value=str(path), visible=True)

    def import_relation(self, file: Any, request: gr.Request) -> str:
        path = getattr(file, "name", file)
        if not path or Path(path).suffix.lower() != ".safetensors":
            raise InputError("import a relation file exported by Troupe (.safetensors)")
        imported = self.sessions.studio_for(request).import_relation(path)
        return f"Imported '{imported.name}' ({imported.template})."

    # ------------------------------------------------------------------------------------------ training
    def teach(self, form: RelationForm, request: gr.Request) -> Iterator[str]:
        """Stream the status: step, loss and ETA while it trains. Every check runs before anything is written; the
        example folder is rewritten byte for byte on each Train, so a cancelled training resumes."""
        studio = self.sessions.studio_for(request)
        wanted, examples = form.to_request(studio.relation_uploads_dir)
        taken = {r.name.lower(): r.name for r in studio.learned_relations()}
        if wanted.name.lower() in taken:
            raise InputError(f"a relation named '{taken[wanted.name.lower()]}' already exists: pick another name, "
                             "or delete or rename the old one")  # fmt: skip
        cancel = self.sessions.cancel_flag(request, "relation", fresh=True)
        title, step = f"Teaching '{wanted.name}'", 0
        folder = examples.write(Path(wanted.exemplars))
        yield progress_html(title, extra=f"reading {len(examples.examples)} examples")
        try:
            for kind, item in stream(lambda on_step, flag: studio.teach_relation(wanted, on_step, flag), cancel):
                if kind == "progress":
                    step = item.step
                    yield progress_html(title, item)
                else:
                    yield progress_html(f"'{item.name}' is learned", extra=_learned(item), state="done")
        except Cancelled:
            yield idle_html(f"Cancelled at step {step}: Train again with the same examples to go on from there.")
        finally:
            discard(
                folder, Path(studio.library_dir)
            )  # the checkpoint lives in the library's work folder; this is rewritten

    def cancel(self, request: gr.Request) -> None:
        self.sessions.cancel_flag(request, "relation").set()


def _picked(name: str | None) -> str:
    if not name:
        raise InputError("select a relation first")
    return name


def _learned(info: RelationInfo) -> str:
    curve = f" · loss {info.loss_curve[0]:.4f} → {info.loss_curve[-1]:.4f}" if info.loss_curve else ""
    return f"{info.examples} examples · {info.steps} steps · {info.seconds:.0f}s{curve} · pick it in Compose"


def relation_table(learned: list[RelationInfo]) -> str:
    """The learned relations as a Markdown table (names and templates escaped)."""
    if not learned:
        return "### Your relations\nNone learned yet: teach one from a few pictures →"
    rows = [
        f"| {_cell(r.name)} | {_cell(r.template)} | {r.examples} | {r.steps} | {'yes' if r.keypoint_weight > 0 else 'no'} |"
        for r in learned
    ]
    head = "| relation | template | examples | steps | keypoints |\n|---|---|---|---|---|"
    return "### Your relations\n" + head + "\n" + "\n".join(rows)


def relation_markdown(info: RelationInfo) -> str:
    curve = f" · loss {info.loss_curve[0]:.4f} → {info.loss_curve[-1]:.4f}" if info.loss_curve else ""
    return (
        f"**{_cell(info.name)}** — {_cell(info.template)} · {info.examples} examples · {info.steps} steps · rank "
        f"{info.rank} · keypoint weight {info.keypoint_weight:g}{curve} · model family `{info.family}` · learned "
        f"{info.created[:16].replace('T', ' ')}"
    )


def _cell(text: str) -> str:
    return html.escape(text).replace("|", "\\|")
