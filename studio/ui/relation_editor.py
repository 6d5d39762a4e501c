"""The Relations tab's example editor: the pictures, and for each one its prompt, its two objects, their boxes and
keypoints, set with clicks on the picture (gr.Image's select event gives the clicked pixel).

How a person draws: pick "Box of A" and click two opposite corners of object A (the first click shows a cross, the
second draws the orange box and switches to "Box of B"); the same for B (blue). "Keypoints of A/B" adds one point
per click. ◀ ▶ step through the examples; "Use this prompt and objects for every example" copies the words.

All of it lives in one widget, the annotations JSON (RelationForm's `annotations`, studio/ui/relation_examples.py):
every handler reads it and writes it back whole, so what Train sends is exactly what the person sees there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from engines.types import InputError
from studio.ui.jobs import QUIET, guarded
from studio.ui.relation_examples import (
    DISPLAY,
    MODES,
    cleared,
    clicked,
    copied_to_all,
    dump_draft,
    entry_of,
    fraction,
    parse_draft,
    shown,
    summary,
    synced,
    uploads,
    with_text,
)


class ExampleEditor:
    """The example widgets (RelationForm's `examples` and `annotations` go into `form`) and their handlers."""

    def __init__(self, form: dict[str, Any]):
        self.form = form
        form["examples"] = gr.File(
            label="Example pictures", file_count="multiple", file_types=["image", ".json"], height=120,
            elem_id="relation-examples",
        )  # fmt: skip
        self._widgets()

    def _widgets(self) -> None:
        with gr.Group():
            with gr.Row(equal_height=True):
                self.prev_btn = gr.Button("◀", size="sm", scale=0, min_width=44, elem_id="relation-prev")
                self.example = gr.Dropdown([], value=None, label="Example", scale=3, elem_id="relation-example")
                self.next_btn = gr.Button("▶", size="sm", scale=0, min_width=44, elem_id="relation-next")
                self.mode = gr.Radio(MODES, value="box a", label="Clicks set", scale=6, elem_id="relation-click-mode")
            self.picture = gr.Image(
                None, label="Click two opposite corners per box · one click per keypoint",
                interactive=False, height=DISPLAY + 20, type="pil", format="png", elem_id="relation-example-image",
            )  # fmt: skip
            self.summary = gr.Markdown(summary([], None), elem_id="relation-example-summary")
            with gr.Row():
                self.prompt = gr.Textbox(label="Prompt", placeholder="a red box leaning on a blue tent on grass",
                                         scale=3, elem_id="relation-example-prompt")  # fmt: skip
                self.phrase_a = gr.Textbox(
                    label="Object A (orange)", placeholder="red box", elem_id="relation-phrase-a"
                )
                self.phrase_b = gr.Textbox(
                    label="Object B (blue)", placeholder="blue tent", elem_id="relation-phrase-b"
                )
            with gr.Row():
                self.copy_btn = gr.Button("Use this prompt and objects for every example", size="sm",
                                          elem_id="relation-copy-all")  # fmt: skip
                self.clear_btn = gr.Button("Clear this example's clicks", size="sm", elem_id="relation-clear-clicks")
        self.pending = gr.State(None)  # the first corner of a box being drawn
        with gr.Accordion("Annotations (relation.json's examples)", open=False):
            self.form["annotations"] = gr.Code("[]", language="json", elem_id="relation-annotations")

    def wire(self) -> None:
        """The example editor's plumbing: every handler reads the annotations JSON and writes it back whole. The
        handlers that change the picked example also take its words as shown, so a click right after typing keeps
        what was typed even if the typing's own update is still on its way."""
        files, notes, relation, template = (self.form[k] for k in ("examples", "annotations", "relation", "template"))
        words = [self.prompt, self.phrase_a, self.phrase_b]
        show = (guarded(self.show_example), [files, notes, self.example],
                [self.picture, *words, self.pending, self.summary])  # fmt: skip
        files.change(
            guarded(self.files_changed), [files, notes, self.example, relation, template],
            [notes, self.example, relation, template], **QUIET,
        ).then(*show, **QUIET)  # fmt: skip
        self.example.input(*show, **QUIET)
        notes.blur(*show, **QUIET)
        for button, step in ((self.prev_btn, -1), (self.next_btn, 1)):
            moved = button.click(guarded(_stepper(step)), [notes, self.example, *words], [notes, self.example], **QUIET)
            moved.then(*show, **QUIET)
        self.picture.select(
            guarded(self.picture_clicked), [files, notes, self.example, self.mode, self.pending, *words],
            [notes, self.picture, self.mode, self.pending, self.summary], **QUIET,
        )  # fmt: skip
        self.mode.input(guarded(self.redrawn), [files, notes, self.example, self.mode], [self.picture, self.pending],
                        **QUIET)  # fmt: skip
        for box in words:  # .change, not .input: Gradio 6 sends a textbox's input event once per burst of typing
            box.change(guarded(self.words_edited), [notes, self.example, *words], [notes, self.summary],
                       trigger_mode="always_last", **QUIET)  # fmt: skip
        self.copy_btn.click(guarded(self.copied), [notes, self.example, *words], [notes, self.summary], **QUIET)
        self.clear_btn.click(guarded(self.clicks_cleared), [files, notes, self.example, *words],
                             [notes, self.picture, self.pending, self.summary], **QUIET)  # fmt: skip
        relation.blur(self.words_given, [relation, template, self.form["name"]], [template, self.form["name"]],
                      **QUIET)  # fmt: skip

    # ------------------------------------------------------------------------------------------ handlers
    def files_changed(
        self, files: Any, notes: str, picked: str | None, relation: str | None, template: str | None
    ) -> tuple[Any, ...]:
        """New uploads: one example per picture, annotations kept; a ready relation.json fills the blank ones and
        the empty relation and template boxes."""
        result = synced(files, parse_draft(notes))
        names = [entry["image"] for entry in result.draft]
        return (
            dump_draft(result.draft),
            gr.update(choices=names, value=picked if picked in names else (names[0] if names else None)),
            result.relation if result.relation and not (relation or "").strip() else gr.skip(),
            result.template if result.template and not (template or "").strip() else gr.skip(),
        )

    def show_example(self, files: Any, notes: str, picked: str | None) -> tuple[Any, ...]:
        """The picked example: its picture with boxes and keypoints, its prompt and objects."""
        draft = parse_draft(notes)
        entry = next((e for e in draft if e.get("image") == picked), None)
        path = uploads(files).get(picked or "")
        if entry is None or path is None:
            return None, "", "", "", None, summary(draft, picked)
        phrases = [str(o.get("phrase") or "") for o in entry["objects"]]
        return shown(path, entry), str(entry.get("prompt") or ""), *phrases, None, summary(draft, picked)

    def picture_clicked(
        self, files: Any, notes: str, picked: str | None, mode: str, pending: Any, prompt: str, phrase_a: str,
        phrase_b: str, event: gr.SelectData,
    ) -> tuple[Any, ...]:  # fmt: skip
        draft, entry = _with_words(notes, picked, (prompt, phrase_a, phrase_b))
        path = uploads(files).get(picked or "")
        if path is None:
            raise InputError(f"{picked}: upload this picture again")
        point = fraction(event.index, shown(path, entry).size)
        mode, pending = clicked(entry, mode, pending, point)
        return dump_draft(draft), shown(path, entry, pending, mode), mode, pending, summary(draft, picked)

    def redrawn(self, files: Any, notes: str, picked: str | None, mode: str) -> tuple[Any, None]:
        """Another click mode: a half-drawn box is dropped."""
        path = uploads(files).get(picked or "")
        entry = next((e for e in parse_draft(notes) if e.get("image") == picked), None)
        return (shown(path, entry, None, mode) if path and entry else gr.skip()), None

    def words_edited(
        self, notes: str, picked: str | None, prompt: str, phrase_a: str, phrase_b: str
    ) -> tuple[Any, str]:
        """Typing in the prompt or an object's box; a box filled by showing another example changes nothing."""
        words = (prompt, phrase_a, phrase_b)
        draft = parse_draft(notes)
        entry = next((e for e in draft if e.get("image") == picked), None)
        if entry is None or _words_of(entry) == tuple(w or "" for w in words):
            return gr.skip(), summary(draft, picked)
        with_text(entry, *words)
        return dump_draft(draft), summary(draft, picked)

    def copied(self, notes: str, picked: str | None, prompt: str, phrase_a: str, phrase_b: str) -> tuple[str, str]:
        draft, entry = _with_words(notes, picked, (prompt, phrase_a, phrase_b))
        copied_to_all(draft, entry)
        return dump_draft(draft), f"{summary(draft, picked)} · words copied to all {len(draft)} examples"

    def clicks_cleared(
        self, files: Any, notes: str, picked: str | None, prompt: str, phrase_a: str, phrase_b: str
    ) -> tuple[Any, ...]:
        draft, entry = _with_words(notes, picked, (prompt, phrase_a, phrase_b))
        cleared(entry)
        path = uploads(files).get(picked or "")
        return dump_draft(draft), (shown(path, entry) if path else None), None, summary(draft, picked)

    def words_given(self, relation: str | None, template: str | None, name: str | None) -> tuple[Any, Any]:
        """The relation's words fill an empty template and name: "leaning on" → "{a} leaning on {b}"."""
        words = " ".join((relation or "").split())
        if not words:
            return gr.skip(), gr.skip()
        fill = not (template or "").strip(), not (name or "").strip()
        return (f"{{a}} {words} {{b}}" if fill[0] else gr.skip()), (words[:40] if fill[1] else gr.skip())


def _stepper(step: int) -> Callable[..., tuple[str, Any]]:
    """The previous or next example, wrapping around (the picked one keeps its words as shown)."""

    def move(notes: str, picked: str | None, prompt: str, phrase_a: str, phrase_b: str) -> tuple[str, Any]:
        draft = parse_draft(notes)
        names = [e.get("image") for e in draft]
        if picked not in names:
            return notes, names[0] if names else gr.skip()
        with_text(entry_of(draft, picked), prompt, phrase_a, phrase_b)
        return dump_draft(draft), names[(names.index(picked) + step) % len(names)]

    return move


def _with_words(notes: str, picked: str | None, words: tuple[str, ...]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The draft, and its picked example with the words as the person sees them."""
    draft = parse_draft(notes)
    entry = entry_of(draft, picked)
    with_text(entry, *words)
    return draft, entry


def _words_of(entry: dict[str, Any]) -> tuple[str, ...]:
    return (str(entry.get("prompt") or ""), *(str(o.get("phrase") or "") for o in entry["objects"]))
