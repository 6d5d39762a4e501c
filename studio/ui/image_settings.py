"""The Compose tab's "Settings for this image" card, and what a generation with the whole form costs a ZeroGPU
call. The References card beside it is studio/ui/references.py."""

from __future__ import annotations

from typing import Any

import gradio as gr

from engines.types import BOX_FITS, DEFAULT_BOX_FIT, LIMITS, SCHEDULERS, JobCap
from studio.ui.forms import GenerateForm, size_choices
from studio.ui.loras import lora_card
from studio.ui.references import reference_cost

# Box fitting's time per image over an image without boxes, rounded up from the demo model's (README) so that ZeroGPU
# never cuts a call short; auto is quick on the demo model and off on Stable Diffusion
FIT_COST = {"off": 1.0, "quick": 2.0, "full": 4.0}
STRENGTH_MAX = 0.3  # the slider's range; above it the boxes overpower the prompt (the engine accepts any ≥ 0)


def generate_seconds(request: Any, *values: Any) -> float:
    """ZeroGPU duration of a /generate call, from the same arguments (steps × images; box fitting costs ~3×,
    references up to ~3× more)."""
    form = GenerateForm.from_values(values)
    fitting = FIT_COST.get(form.fit_boxes, 2.0)  # box fitting: forwards and backwards in the early steps
    work = float(form.steps or 20) * float(form.images or 1) * fitting * reference_cost(form)
    return min(120.0, 10.0 + 0.6 * work)


def settings_card(form: dict[str, Any], native: int, cap: JobCap | None = None) -> dict[str, Any]:
    """Add the card's widgets to `form` (the tab's widgets keyed by GenerateForm's field names); returns the LoRA
    list's own buttons (studio/ui/loras.py), which the tab wires. A shared studio's `cap` tops the sliders."""
    defaults = GenerateForm()
    max_steps, max_images = (cap.steps, cap.images) if cap else (LIMITS.steps, LIMITS.images)
    with gr.Accordion("Settings for this image", open=True, elem_classes="tr-card"):
        with gr.Row():
            form["seed"] = gr.Number(value=defaults.seed, precision=0, label="Seed", elem_id="seed", minimum=0)
            form["random_seed"] = gr.Checkbox(value=defaults.random_seed, label="Random seed", elem_id="random-seed")
            form["size"] = gr.Dropdown(
                size_choices(native), value=defaults.size, label="Size", elem_id="size", allow_custom_value=True
            )
        with gr.Row():
            form["steps"] = gr.Slider(1, max_steps, value=defaults.steps, step=1, label="Steps", elem_id="steps")
            form["cfg"] = gr.Slider(0, LIMITS.cfg, value=defaults.cfg, step=0.5, label="CFG", elem_id="cfg")
        with gr.Row():
            form["sampler"] = gr.Dropdown(
                [(s.title, key) for key, s in SCHEDULERS.items()],
                value=defaults.sampler,
                label="Sampler",
                elem_id="sampler",
                info="A1111's names; Default: the model's own",
            )
            form["images"] = gr.Slider(
                1, max_images, value=defaults.images, step=1, label="Images", elem_id="num-images"
            )
            form["layout_strength"] = gr.Slider(
                0,
                STRENGTH_MAX,
                value=defaults.layout_strength,
                step=0.01,
                label="Layout strength",
                elem_id="guidance-strength",
                info="0 = regions off",
            )
        form["fit_boxes"] = gr.Radio(
            [("Auto", "auto")] + [(fit.title, name) for name, fit in BOX_FITS.items()],
            value=defaults.fit_boxes,
            label="Fit objects to their boxes",
            elem_id="fit-boxes",
            info="draws objects at their boxes' size. Auto: "
            + ", ".join(f"{BOX_FITS[name].title.lower()} on {family}" for family, name in DEFAULT_BOX_FIT.items())
            + ". Quick: ~1.4x the time of an image without boxes (~1.6x with 3 or more); full: ~3x",
        )
        return lora_card(form)
