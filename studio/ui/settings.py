"""The "Model & settings" tab: which model is loaded and how (device, precision, quantization, offload).

API endpoint: /load_model (ModelForm's fields by name). On a Space the model is fixed and the fields are read-only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from engines.types import DEVICES, DTYPES, OFFLOADS, QUANTIZATIONS, InputError, ModelSpec
from studio.ui.forms import ModelForm, form_handler, size_choices
from studio.ui.jobs import ON_GPU, QUIET, GpuWrapper, Sessions, guarded, on_gpu
from studio.ui.views import idle_html, library_markdown, model_badge, model_markdown, progress_html, vram_markdown

PRESET_FIELDS = ("device", "dtype", "quantization", "offload")  # what a machine preset sets: VramPreset's names


def load_seconds(*args: Any) -> float:
    """ZeroGPU duration of a model switch (never called on a Space, where switching is off; the wrapper needs one)."""
    return 60.0


def preset_of(spec: ModelSpec, presets: dict[str, Any]) -> str | None:
    """The machine preset that loads a model the way `spec` does, if any (shown as the picker's value)."""
    wanted = tuple(getattr(spec, name) for name in PRESET_FIELDS)
    return next((name for name, p in presets.items() if tuple(getattr(p, f) for f in PRESET_FIELDS) == wanted), None)


class SettingsTab:
    """The widgets of the settings tab and their handlers; `form` holds ModelForm's widgets by field name."""

    def __init__(self, sessions: Sessions, gpu: GpuWrapper | None, info: dict[str, Any], allow_switch: bool):
        self.sessions, self.gpu, self.allow_switch = sessions, gpu, allow_switch
        self.native = int(info.get("native_size") or 512)
        self.vram = sessions.studio.vram_presets()
        self.form: dict[str, Any] = {}
        with gr.Tab("Model & settings", id="settings", elem_id="tab-settings"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, elem_classes="tr-card"):
                    self._model_card(ModelForm.from_request(sessions.studio.model_spec))
                with gr.Column(scale=2, elem_classes="tr-card"):
                    self.info = gr.Markdown(model_markdown(info), elem_id="model-info")
                    library = library_markdown(
                        sessions.studio.library_dir, sessions.per_user_root is not None, sessions.outputs_dir
                    )
                    gr.Markdown(library, elem_id="library-info")
                    gr.Markdown(vram_markdown(self.vram))

    def _model_card(self, current: ModelForm) -> None:
        form, editable = self.form, self.allow_switch
        form["source"] = gr.Textbox(
            value=current.source,
            label="Model source",
            elem_id="model-source",
            interactive=editable,
            info="demo · a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5) · a local "
            "diffusers folder or .safetensors file",
        )
        self.preset = gr.Dropdown(
            list(self.vram),
            value=preset_of(self.sessions.studio.model_spec, self.vram),
            label="Machine preset",
            elem_id="vram-preset",
            interactive=editable,
        )
        with gr.Row():
            form["device"] = gr.Dropdown(
                list(DEVICES), value=current.device, label="Device", elem_id="device", interactive=editable
            )
            form["dtype"] = gr.Dropdown(
                list(DTYPES), value=current.dtype, label="Precision", elem_id="dtype", interactive=editable
            )
            form["quantization"] = gr.Dropdown(
                list(QUANTIZATIONS),
                value=current.quantization,
                label="Quantization",
                elem_id="quantization",
                interactive=editable,
            )
            form["offload"] = gr.Dropdown(
                list(OFFLOADS), value=current.offload, label="Offload", elem_id="offload", interactive=editable
            )
        self.load_btn = gr.Button("Load model", variant="primary", elem_id="load-model-btn", interactive=editable)
        self.status = gr.HTML(
            idle_html("The model loads once; switching waits for running jobs."), elem_id="load-status"
        )

    # ------------------------------------------------------------------------------------------ events
    def wire(self, badge: Any, size: Any) -> None:
        """`badge` (the header's) and `size` (Compose's size picker) follow the loaded model."""
        self.preset.change(
            self.preset_chosen, self.preset, [self.form[name] for name in PRESET_FIELDS], queue=False, **QUIET
        )
        load = on_gpu(self.gpu, form_handler(ModelForm, guarded(self.load_model)), load_seconds)
        self.load_btn.click(
            load,
            ModelForm.widgets_in_order(self.form),
            [self.status, self.info, badge, size],
            api_name="load_model",
            show_progress="minimal",
            show_progress_on=self.status,
            **ON_GPU,
        )

    # ------------------------------------------------------------------------------------------ handlers
    def preset_chosen(self, name: str | None) -> tuple[Any, ...]:
        """A machine preset fills device, precision, quantization and offload (in PRESET_FIELDS' order)."""
        preset = self.vram.get(name or "")
        if preset is None:
            return tuple(gr.skip() for _ in PRESET_FIELDS)
        return tuple(getattr(preset, field) for field in PRESET_FIELDS)

    def load_model(self, form: ModelForm, request: gr.Request) -> Iterator[tuple[Any, Any, Any, Any]]:
        """Stream (status, model info, header badge, size choices); the old model stays if the new one fails."""
        if not self.allow_switch:
            raise InputError("this studio's model is fixed (switching is off here)")
        spec = form.to_request(self.sessions.studio.model_spec)  # keeps the app's --vae, --embedding, --compile
        yield (
            progress_html(f"Loading {spec.source}…", extra="other jobs wait their turn"),
            gr.skip(),
            gr.skip(),
            gr.skip(),
        )
        started = time.perf_counter()
        studio = self.sessions.studio
        studio.load_model(spec)
        info = studio.model_info()
        native = int(info.get("native_size") or self.native)
        yield (
            progress_html(f"Loaded {spec.source}", extra=f"{time.perf_counter() - started:.1f}s", state="done"),
            model_markdown(info),
            model_badge(info),
            gr.update(choices=size_choices(native), value="native"),
        )
