"""The Compose tab's "References" group: how the subjects' photos reach the picture (SynCD's shared attention and
normalized image guidance) and whether it starts from a collage of their cut-outs (MS-CustomNet's layered map).

The widgets are GenerateForm's reference fields (studio/ui/forms.py turns them into a ReferenceConfig); this file
only lays them out, says what each does, and estimates what they cost a ZeroGPU call.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.ui.forms import GenerateForm

SWITCH_CHOICES = [("Auto", "auto"), ("On", "on"), ("Off", "off")]
START_CHOICES = [("Noise", "noise"), ("Collage", "collage")]
# The sliders' ranges; the engine accepts more (ReferenceConfig), so a PNG made elsewhere may carry a value beyond
RANGES = {
    "reference_strength": (0.0, 4.0),
    "image_guidance": (0.0, 10.0),
    "image_guidance_growth": (0.0, 10.0),
    "start_strength": (0.05, 1.0),
}


def references_card(form: dict[str, Any]) -> None:
    """Add the group's widgets to `form` (the tab's widgets keyed by GenerateForm's field names)."""
    defaults = GenerateForm()
    with gr.Accordion("References (the subjects' photos)", open=False, elem_classes="tr-card", elem_id="references"):
        gr.Markdown(
            "The picture also looks at each placed subject's photos, inside its box. Instant subjects need this; "
            "subjects with a trained residual get a closer likeness from it.",
            elem_classes="tr-hint",
        )
        with gr.Row():
            form["references"] = gr.Radio(
                SWITCH_CHOICES,
                value=defaults.references,
                label="References",
                elem_id="references-switch",
                info="auto: on whenever a subject in the prompt has photos",
            )
            form["reference_adapter"] = gr.Checkbox(
                value=defaults.reference_adapter,
                label="Use the reference adapter",
                elem_id="reference-adapter",
                info="the model's trained LoRA for reading photos, when it has one",
            )
        with gr.Row():
            form["reference_strength"] = _slider(
                "reference_strength", defaults, "Reference strength", 0.05, info="1 = as the model weighs them"
            )
            form["image_guidance"] = _slider(
                "image_guidance", defaults, "Image guidance", 0.5, info="0 = plain CFG; above 0 costs a third pass"
            )
            form["image_guidance_growth"] = _slider(
                "image_guidance_growth",
                defaults,
                "Image guidance growth",
                0.5,
                info="added over the steps, first to last",
            )
        with gr.Row():
            form["start"] = gr.Radio(
                START_CHOICES,
                value=defaults.start,
                label="Start from",
                elem_id="reference-start",
                info="collage: the subjects' cut-outs in their boxes, back to front",
            )
            form["start_strength"] = _slider(
                "start_strength",
                defaults,
                "Start strength",
                0.05,
                info="collage only: how much of it is redrawn (1 = all)",
            )


def _slider(field: str, defaults: GenerateForm, label: str, step: float, info: str) -> gr.Slider:
    elem_id = field.replace("_", "-")
    low, high = RANGES[field]
    return gr.Slider(low, high, value=getattr(defaults, field), step=step, label=label, elem_id=elem_id, info=info)


def widened(form: GenerateForm) -> dict[str, Any]:
    """Updates for the sliders whose restored value lies beyond their range, which grows to hold it: Gradio would
    otherwise refuse the next generation's value as out of bounds."""
    updates = {}
    for field, (low, high) in RANGES.items():
        value = float(getattr(form, field))
        if not low <= value <= high:
            updates[field] = gr.update(value=value, minimum=min(low, value), maximum=max(high, value))
    return updates


def reference_cost(form: GenerateForm) -> float:
    """How much longer than a plain generation one with these settings takes (for ZeroGPU's duration): the
    reference pass runs the UNet on the photos each step, image guidance adds a third batch, a collage start runs
    only its share of the steps. Auto counts as on only when the prompt names a subject."""
    on = form.references == "on" or (form.references in (None, "auto") and "<" in (form.prompt or ""))
    cost = 2.0 if on else 1.0
    if on and ((form.image_guidance or 0) > 0 or (form.image_guidance_growth or 0) > 0):
        cost *= 1.5
    if form.start == "collage":
        cost *= float(form.start_strength or 1.0)
    return cost
