"""The Troupe studio in the browser (Gradio): subjects, a layered canvas, relations, generation, settings.

`build_ui(studio)` is a factory, so tests pass a tiny-model Studio. It talks to the engines only through
engines.service.Studio and the dataclasses of engines.types; every handler turns its widgets into one dataclass in
one place (`_request_from`, `_register_from`, `_spec_from`). Bad input is one readable message (gr.Error with the
InputError text), never a traceback, and it changes nothing.

    python -m studio ui --model demo --port 7860 --library ~/.troupe/library
"""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr
from PIL import Image, ImageDraw, PngImagePlugin, UnidentifiedImageError

from engines.relations import Relation, apply_relation, load_relations
from engines.types import (
    DTYPES,
    OFFLOADS,
    PRESETS,
    QUANTIZATIONS,
    SCHEDULERS,
    Cancelled,
    GenerateRequest,
    GuidanceConfig,
    InputError,
    ModelSpec,
    RegisterRequest,
    StepProgress,
    SubjectInfo,
)
from studio import ui_canvas as canvas
from studio.ui_project import Project, read_project
from studio.ui_settings import DEVICES, load_vram_presets, preset_of

if TYPE_CHECKING:
    from engines.service import Studio

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
CLASS_WORDS = ("dog", "cat", "person", "toy", "plushie", "teddy bear", "mug", "backpack", "sneaker", "car", "bird",
               "ball", "box", "tent", "star", "ring")  # the last five are the demo world's objects
ASPECTS = (("1:1", 1, 1), ("4:3", 4, 3), ("3:4", 3, 4), ("3:2", 3, 2), ("2:3", 2, 3), ("16:9", 16, 9), ("9:16", 9, 16))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
GpuWrapper = Callable[[Callable, Callable[..., float]], Callable]  # (fn, seconds(*args)) -> fn run on a GPU (Spaces)


def launch_options() -> dict[str, Any]:
    """Theme and CSS: in Gradio 6 they are arguments of `launch()`."""
    theme = gr.themes.Soft(primary_hue="orange", secondary_hue="slate", neutral_hue="slate",
                           font=["Inter", "ui-sans-serif", "system-ui", "sans-serif"],
                           font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    return {"theme": theme, "css": (STATIC / "studio.css").read_text()}


# ------------------------------------------------------------------------------------------------ helpers
def _say(error: BaseException) -> gr.Error:
    """A readable message for the person; the traceback (for a real bug) goes to the server log only."""
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, InputError):
        return gr.Error(str(error), title="Check your input", print_exception=False)
    if isinstance(error, FileNotFoundError):
        return gr.Error(f"file not found: {error.filename or error}", title="Check your input", print_exception=False)
    log.exception("unexpected error in a studio handler")
    return gr.Error(f"{type(error).__name__}: {error}", title="Something went wrong", print_exception=False)


def guarded(fn: Callable) -> Callable:
    """Handlers raise InputError for bad input; the person sees the message and nothing changes."""
    @functools.wraps(fn)  # Gradio reads the signature (gr.Request parameters) through __wrapped__
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - every error becomes one readable line
            raise _say(error) from None
    return wrapper


def _session(request: gr.Request | None) -> str:
    return (getattr(request, "session_hash", None) or "local") if request is not None else "local"


def _stream(work: Callable[[Callable[[StepProgress], None], threading.Event], Any],
            cancel: threading.Event) -> Iterator[tuple[str, Any]]:
    """Run `work(on_progress, cancel)` in a thread; yield ("progress", StepProgress) … then ("done", result).

    Progress is coalesced to the latest step, so a slow browser never lags behind the job. If the consumer goes
    away (the tab closes), the job is cancelled between two steps."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", work(lambda p: events.put(("progress", p)), cancel)))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            events.put(("error", error))

    thread = threading.Thread(target=run, name="troupe-job", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = events.get()
            while kind == "progress" and not events.empty():
                nxt = events.get()
                if nxt[0] != "progress":
                    yield kind, item
                kind, item = nxt
            if kind == "error":
                raise item
            yield kind, item
            if kind == "done":
                return
    finally:
        if thread.is_alive():
            cancel.set()


def _progress_html(title: str, p: StepProgress | None = None, extra: str = "", state: str = "run") -> str:
    if p is None:
        pct, detail = (100 if state == "done" else 0), extra
    else:
        pct = int(100 * p.step / max(p.total, 1))
        bits = [f"step {p.step}/{p.total}"]
        if p.loss is not None:
            bits.append(f"loss {p.loss:.4f}")
        bits.append(f"{p.elapsed:.1f}s elapsed")
        if p.step < p.total:
            bits.append(f"ETA {p.eta:.0f}s")
        detail = " · ".join(bits) + (f" · {extra}" if extra else "")
    return (f'<div class="tr-progress tr-{state}"><div class="tr-progress-head"><b>{html.escape(title)}</b>'
            f'<span>{html.escape(detail)}</span></div><div class="tr-bar"><div style="width:{pct}%"></div></div></div>')


def _idle_html(text: str) -> str:
    return f'<div class="tr-progress tr-idle"><div class="tr-progress-head"><span>{html.escape(text)}</span></div></div>'


def _sizes(native: int) -> list[tuple[str, str]]:
    """Size choices for a model: the native square and a few aspects of about the same area (multiples of 8)."""
    choices = [(f"Native ({native}×{native})", "native")]
    for label, a, b in ASPECTS[1:]:
        w, h = native * (a / b) ** 0.5, native * (b / a) ** 0.5
        scale = max(1.0, 64 / min(w, h))
        w, h = (int(round(v * scale / 8) * 8) for v in (w, h))
        choices.append((f"{label} ({w}×{h})", f"{w}x{h}"))
    choices.append((f"2× ({2 * native}×{2 * native})", f"{2 * native}x{2 * native}"))
    return choices


def _parse_size(value: str, native: int) -> tuple[int | None, int | None]:
    if not value or value == "native":
        return None, None
    try:
        w, h = (int(v) for v in str(value).lower().replace("×", "x").split("x"))
    except ValueError as error:
        raise InputError(f"size must look like 512x768 (got {value!r})") from error
    return w, h


def _placeholder(info: SubjectInfo) -> Image.Image:
    digest = hashlib.sha1(info.name.encode()).digest()
    image = Image.new("RGB", (128, 128), (80 + digest[0] % 120, 80 + digest[1] % 120, 80 + digest[2] % 120))
    ImageDraw.Draw(image).text((54, 52), info.name[:1].upper(), fill="white", font_size=28)
    return image


def _check_photos(paths: list[str]) -> tuple[str, ...]:
    if not paths:
        raise InputError("drop 1–10 photos of the subject first")
    for path in paths:
        name = Path(path).name
        if Path(path).suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"'{name}' is not an image: use PNG, JPEG or WebP photos")
        try:
            with Image.open(path) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise InputError(f"'{name}' is not a readable image ({error.__class__.__name__})") from error
    return tuple(str(p) for p in paths)


def _save_pngs(images: tuple, metadata: tuple, folder: Path) -> list[str]:
    """Write each image with its text chunks, so downloads and "reuse settings" keep the whole request."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for index, (image, chunks) in enumerate(zip(images, metadata)):
        info = PngImagePlugin.PngInfo()
        for key, value in (chunks or image.info or {}).items():
            if isinstance(value, str):
                info.add_text(key, value)
        path = folder / f"troupe-{stamp}-{index + 1}.png"
        image.save(path, format="PNG", pnginfo=info)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------ sessions
@dataclass
class _Sessions:
    """Per-browser-session state that cannot live in gr.State: cancel flags and (on a Space) subject libraries."""

    studio: Studio
    per_user_root: Path | None = None
    outputs_dir: Path | None = None
    cancels: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    studios: dict[str, Studio] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def studio_for(self, request: gr.Request | None) -> Studio:
        """The shared studio, or (per-user mode) a view of it whose library is this session's own folder."""
        if self.per_user_root is None:
            return self.studio
        session = _session(request)
        with self.lock:
            if session not in self.studios:
                folder = self.per_user_root / hashlib.sha256(session.encode()).hexdigest()[:24]
                self.studios[session] = self.studio.with_library(folder)
            return self.studios[session]

    def cancel_flag(self, request: gr.Request | None, kind: str, fresh: bool = False) -> threading.Event:
        key = (_session(request), kind)
        with self.lock:
            if fresh or key not in self.cancels:
                self.cancels[key] = threading.Event()
            return self.cancels[key]

    def forget(self, request: gr.Request | None) -> None:
        """The tab closed: stop its jobs, drop its outputs and (per-user mode) its private library."""
        session = _session(request)
        with self.lock:
            for key in [k for k in self.cancels if k[0] == session]:
                self.cancels.pop(key).set()
            view = self.studios.pop(session, None)
        if self.per_user_root is None:
            return  # a desktop keeps its outputs
        folders = [self.outputs(request)] + ([Path(view.library_dir)] if view is not None else [])
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def outputs(self, request: gr.Request | None) -> Path:
        """Where this session's images, projects and exports go: a persistent folder on a desktop, a private
        temporary one per visitor on a Space."""
        if self.per_user_root is None and self.outputs_dir is not None:
            return self.outputs_dir
        return Path(tempfile.gettempdir()) / "troupe-outputs" / hashlib.sha256(_session(request).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------------ the UI
def build_ui(studio: Studio, *, per_user_library: str | Path | None = None, gpu: GpuWrapper | None = None,
             allow_model_switch: bool = True, outputs_dir: str | Path | None = "outputs",
             title: str = "Troupe Studio") -> gr.Blocks:
    """The whole studio as a gr.Blocks. `per_user_library`: a root folder under which every browser session gets
    its own subject library (Spaces). `gpu`: wraps the GPU handlers (spaces.GPU) with a duration from the inputs."""
    sessions = _Sessions(studio, Path(per_user_library) if per_user_library else None,
                         Path(outputs_dir).expanduser().resolve() if outputs_dir else None)
    allow_model_switch = allow_model_switch and not per_user_library  # views share one loaded model
    relations: dict[str, Relation] = load_relations()
    vram = load_vram_presets()
    try:
        info = studio.model_info()
    except Exception as error:  # noqa: BLE001 - the UI still opens, the Settings tab says what is wrong
        log.warning("model not loaded yet: %s", error)
        info = {"source": studio.model_spec.source, "family": "?", "native_size": 512, "device": "?",
                "status": f"not loaded: {error}"}
    native = int(info.get("native_size") or 512)
    initial = [] if per_user_library else studio.subjects()  # per-visitor lists arrive with the page load

    def on_gpu(fn: Callable, seconds: Callable[..., float]) -> Callable:
        return gpu(fn, seconds) if gpu else fn

    def subjects_of(request: gr.Request | None) -> list[SubjectInfo]:
        return sessions.studio_for(request).subjects()

    def class_words(request: gr.Request | None) -> dict[str, str]:
        return {s.name: s.class_word for s in subjects_of(request)}

    def suggestions(subjects: list[SubjectInfo]) -> list[str]:
        return [f"<{s.name}>" for s in subjects]

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        # ---------------------------------------------------------------- header
        with gr.Row(elem_classes="tr-header"):
            gr.HTML('<div class="tr-title"><span class="tr-logo">◐</span> Troupe Studio'
                    '<small>your subjects, together — layout, layers, relations</small></div>')
            model_badge = gr.HTML(_model_badge(info), elem_classes="tr-badge-wrap")

        with gr.Tabs(elem_id="tabs") as tabs:
            # ============================================================ Compose
            with gr.Tab("Compose", id="compose", elem_id="tab-compose"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=6, min_width=480):
                        with gr.Group(elem_classes="tr-card"):
                            gr.Markdown("**Relation** — pick how your subjects relate; it fills the prompt and "
                                        "proposes boxes you can move.", elem_classes="tr-hint")
                            with gr.Row():
                                relation = gr.Dropdown(
                                    [("— none —", "")] + [(_relation_label(r), r.name) for r in relations.values()],
                                    value="", label="Relation", elem_id="relation", scale=3)
                                slot_a = gr.Dropdown([], value=None, label="Subject A", allow_custom_value=True,
                                                     elem_id="relation-a", scale=2,
                                                     info="a <subject> or words")
                                slot_b = gr.Dropdown([], value=None, label="Subject B", allow_custom_value=True,
                                                     elem_id="relation-b", scale=2)
                                scene = gr.Textbox(label="Scene", placeholder="on the beach", elem_id="scene",
                                                   scale=3)
                        with gr.Group(elem_classes="tr-card"):
                            canvas_box = canvas.canvas_component(
                                canvas.empty_canvas(native, native, suggestions(initial)))
                            with gr.Row(elem_classes="tr-add-row"):
                                gr.HTML('<span class="tr-add-label">Add a region</span>', scale=0, elem_classes="tr-add-label-wrap",
                                        min_width=90)
                                add_label = gr.Dropdown([], value=None, allow_custom_value=True, show_label=False,
                                                        container=False, scale=4, elem_id="add-region-label",
                                                        interactive=True)
                                add_btn = gr.Button("+ Add region", size="sm", scale=1, min_width=90, elem_id="add-region-btn")
                                clear_btn = gr.Button("Clear", size="sm", scale=0, min_width=70, variant="secondary",
                                                      elem_id="clear-canvas-btn")
                        with gr.Accordion("Settings for this image", open=True, elem_classes="tr-card"):
                            with gr.Row():
                                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed", minimum=0)
                                randomize = gr.Checkbox(value=True, label="Random seed", elem_id="random-seed")
                                size = gr.Dropdown(_sizes(native), value="native", label="Size", elem_id="size",
                                                   allow_custom_value=True)
                            with gr.Row():
                                steps = gr.Slider(1, 150, value=20, step=1, label="Steps", elem_id="steps")
                                cfg = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG", elem_id="cfg")
                            with gr.Row():
                                scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Sampler",
                                                        elem_id="sampler")
                                num_images = gr.Slider(1, 8, value=1, step=1, label="Images", elem_id="num-images")
                                strength = gr.Slider(0, 0.3, value=GuidanceConfig().strength, step=0.01,
                                                     label="Layout strength", elem_id="guidance-strength",
                                                     info="0 = regions off")
                            fit_boxes = gr.Checkbox(value=False, label="Fit objects to their boxes",
                                                    elem_id="fit-boxes",
                                                    info="draws objects at their boxes' size; 2-4x slower")
                    with gr.Column(scale=5, min_width=380):
                        prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                            placeholder="a photo of <rex> hugging <milo> on the beach — <name> is a "
                                                        "registered subject; region words must appear here")
                        negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt",
                                              placeholder="blurry, low quality")
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn", scale=3)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
                        gen_status = gr.HTML(_idle_html("Ready."), elem_id="gen-status")
                        results = gr.Gallery(label="Results (live preview while generating)", format="png",
                                             columns=2, height=380, elem_id="result-gallery", interactive=False,
                                             object_fit="contain", buttons=["download", "fullscreen"])
                        with gr.Accordion("Reuse · save · open", open=True, elem_classes="tr-card"):
                            with gr.Row():
                                reuse_btn = gr.Button("Reuse settings of selected result", size="sm",
                                                      elem_id="reuse-btn")
                                png_in = gr.UploadButton("Open a Troupe PNG", file_types=[".png"], size="sm",
                                                         elem_id="open-png")
                            with gr.Row():
                                save_btn = gr.Button("Save project", size="sm", elem_id="save-project")
                                project_in = gr.UploadButton("Open project", file_types=[".json"], size="sm",
                                                             elem_id="open-project")
                            project_file = gr.File(label="Project file", interactive=False, visible=False,
                                                   elem_id="project-file")
                selected_result = gr.State(None)

            # ============================================================ Subjects
            with gr.Tab("Subjects", id="subjects", elem_id="tab-subjects"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3):
                        subject_gallery = gr.Gallery(value=_cards(initial), label="Your subjects",
                                                     columns=4, height=300, allow_preview=False, format="png", fit_columns=False,
                                                     elem_id="subject-gallery", object_fit="cover",
                                                     interactive=False)
                        subject_detail = gr.Markdown("Select a subject to rename, export or delete it.",
                                                     elem_id="subject-detail")
                        with gr.Row():
                            subject_pick = gr.Dropdown([s.name for s in initial], value=None,
                                                       label="Subject", elem_id="subject-pick", scale=2,
                                                       allow_custom_value=True)
                            rename_to = gr.Textbox(label="New name", scale=2, elem_id="rename-to")
                        with gr.Row():
                            rename_btn = gr.Button("Rename", size="sm", scale=1, elem_id="rename-btn")
                            export_btn = gr.Button("Export", size="sm", scale=1, elem_id="export-btn")
                            place_btn = gr.Button("Place on canvas", size="sm", scale=1, variant="primary",
                                                  elem_id="place-btn")
                            delete_btn = gr.Button("Delete", size="sm", variant="stop", scale=1, elem_id="delete-btn")
                        with gr.Row():
                            export_file = gr.File(label="Exported subject (.safetensors)", interactive=False,
                                                  visible=False, elem_id="export-file")
                            import_btn = gr.UploadButton("Import a subject (.safetensors)", file_types=[".safetensors"],
                                                         size="sm", elem_id="import-btn")
                    with gr.Column(scale=2, elem_classes="tr-card"):
                        gr.Markdown("### New subject\nDrop 1–10 photos of one subject (more angles, plain "
                                    "backgrounds help). Give it a name you'll type as `<name>` in prompts.")
                        photos = gr.File(label="Photos", file_count="multiple", file_types=["image"],
                                         elem_id="subject-photos", height=140)
                        with gr.Row():
                            subject_name = gr.Textbox(label="Name", placeholder="rex", elem_id="subject-name")
                            subject_class = gr.Dropdown(list(CLASS_WORDS), value=None, allow_custom_value=True,
                                                        label="Class word", elem_id="subject-class",
                                                        info="what it is: dog, mug, toy…")
                        reg_preset = gr.Radio(list(PRESETS), value="standard", label="Preset", elem_id="reg-preset",
                                              info="quick: a first look · standard: default · thorough: hard subjects")
                        with gr.Row():
                            register_btn = gr.Button("Register", variant="primary", elem_id="register-btn", scale=3)
                            reg_stop = gr.Button("Cancel", variant="stop", elem_id="register-cancel", scale=1)
                        reg_status = gr.HTML(_idle_html("Registration takes one short GPU job."),
                                             elem_id="register-status")

            # ============================================================ Settings
            with gr.Tab("Model & settings", id="settings", elem_id="tab-settings"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=3, elem_classes="tr-card"):
                        model_source = gr.Textbox(value=studio.model_spec.source, label="Model source",
                                                  elem_id="model-source", interactive=allow_model_switch,
                                                  info="demo · a Hub id (stable-diffusion-v1-5/stable-diffusion-v1-5)"
                                                       " · a local diffusers folder or .safetensors file")
                        vram_preset = gr.Dropdown(list(vram), value=preset_of(studio.model_spec, vram),
                                                  label="Machine preset", elem_id="vram-preset",
                                                  interactive=allow_model_switch)
                        with gr.Row():
                            device = gr.Dropdown(list(DEVICES), value=studio.model_spec.device, label="Device",
                                                 elem_id="device", interactive=allow_model_switch)
                            dtype = gr.Dropdown(list(DTYPES), value=studio.model_spec.dtype, label="Precision",
                                                elem_id="dtype", interactive=allow_model_switch)
                            quant = gr.Dropdown(list(QUANTIZATIONS), value=studio.model_spec.quantization,
                                                label="Quantization", elem_id="quantization",
                                                interactive=allow_model_switch)
                            offload = gr.Dropdown(list(OFFLOADS), value=studio.model_spec.offload, label="Offload",
                                                  elem_id="offload", interactive=allow_model_switch)
                        load_btn = gr.Button("Load model", variant="primary", elem_id="load-model-btn",
                                             interactive=allow_model_switch)
                        load_status = gr.HTML(_idle_html("The model loads once; switching waits for running jobs."),
                                              elem_id="load-status")
                    with gr.Column(scale=2, elem_classes="tr-card"):
                        model_info = gr.Markdown(_model_markdown(info), elem_id="model-info")
                        gr.Markdown(_library_markdown(studio, per_user_library, sessions.outputs_dir),
                                    elem_id="library-info")
                        gr.Markdown(_vram_markdown(vram))

        # ================================================================ events: canvas & relation
        def refresh_choices(request: gr.Request):
            subs = subjects_of(request)
            names = suggestions(subs)
            return (gr.update(choices=names), gr.update(choices=names), gr.update(choices=names),
                    _cards(subs), gr.update(choices=[x.name for x in subs]))

        def refresh_canvas_suggestions(canvas_json: str, request: gr.Request) -> str:
            return canvas.with_suggestions(canvas_json, suggestions(subjects_of(request)))

        @guarded
        def on_relation(name: str, a: str | None, b: str | None, scene_text: str, canvas_json: str,
                        request: gr.Request):
            """Relation picked or slots changed: fill the prompt and propose boxes once every slot is filled."""
            rel = relations.get(name) if name else None
            b_visible = gr.update(visible=rel is None or rel.arity == 2)
            if rel is None:
                return b_visible, gr.skip(), gr.skip()
            parts = [a, b][: rel.arity]
            if not all(p and str(p).strip() for p in parts):
                return b_visible, gr.skip(), gr.skip()
            text, layout = apply_relation(rel, [str(p) for p in parts], scene_text or "", class_words(request))
            width, height = canvas.size_of(canvas_json)
            return b_visible, text, canvas.layout_to_canvas(layout, width, height, suggestions(subjects_of(request)))

        def on_relation_picked(name: str):
            rel = relations.get(name) if name else None
            return gr.update(value=rel.scene if rel else ""), gr.update(visible=rel is None or rel.arity == 2)

        relation_inputs = [relation, slot_a, slot_b, scene, canvas_box]
        relation.change(on_relation_picked, relation, [scene, slot_b], queue=False, api_visibility="undocumented", show_progress="hidden").then(
            on_relation, relation_inputs, [slot_b, prompt, canvas_box], api_name="apply_relation", show_progress="hidden")
        for widget in (slot_a, slot_b):
            widget.change(on_relation, relation_inputs, [slot_b, prompt, canvas_box], api_visibility="undocumented", show_progress="hidden")
        scene.submit(on_relation, relation_inputs, [slot_b, prompt, canvas_box], api_visibility="undocumented", show_progress="hidden")

        @guarded
        def on_add(canvas_json: str, label: str | None) -> tuple[str, Any]:
            return canvas.add_region(canvas_json, label or ""), gr.update(value=None)

        add_btn.click(on_add, [canvas_box, add_label], [canvas_box, add_label], api_name="add_region", show_progress="hidden")
        clear_btn.click(lambda c: canvas.dump({**canvas.load(c), "regions": []}), canvas_box, canvas_box,
                        api_visibility="undocumented", show_progress="hidden")

        @guarded
        def on_size(value: str, canvas_json: str) -> str:
            width, height = _parse_size(value, native_size())
            native_now = native_size()
            return canvas.with_size(canvas_json, width or native_now, height or native_now)

        size.change(on_size, [size, canvas_box], canvas_box, api_visibility="undocumented", show_progress="hidden")

        def native_size() -> int:
            try:
                return int(studio.model_info().get("native_size") or native)
            except Exception:  # noqa: BLE001
                return native

        # ================================================================ events: generate
        gen_widgets = {"prompt": prompt, "negative": negative, "canvas": canvas_box, "relation": relation,
                       "seed": seed, "randomize": randomize, "size": size, "steps": steps, "cfg": cfg,
                       "scheduler": scheduler, "num_images": num_images, "strength": strength,
                       "fit_boxes": fit_boxes}
        gen_keys = list(gen_widgets)

        def _request_from(values: dict[str, Any], request: gr.Request | None) -> GenerateRequest:
            """The one place where the generation widgets become a GenerateRequest."""
            layout = canvas.canvas_to_layout(values["canvas"], class_words(request))
            width, height = _parse_size(values["size"], native)
            seed_value = None if values["randomize"] else int(values["seed"] or 0)
            return GenerateRequest(
                prompt=values["prompt"] or "", negative_prompt=values["negative"] or "", layout=layout,
                relation=values["relation"] or None, seed=seed_value, steps=int(values["steps"]),
                cfg=float(values["cfg"]), scheduler=values["scheduler"], width=width, height=height,
                num_images=int(values["num_images"]), guidance=_guidance_from(values))

        def _guidance_from(values: dict[str, Any]) -> GuidanceConfig:
            guidance = GuidanceConfig(strength=float(values["strength"]))
            return guidance.fitted() if values["fit_boxes"] else guidance

        def generate(request: gr.Request, *values: Any):
            """Stream: (status, results: previews while running, then the PNGs). Bad input: a readable error, nothing changes."""
            try:
                req = _request_from(dict(zip(gen_keys, values)), request)
                target = sessions.studio_for(request)
                cancel = sessions.cancel_flag(request, "generate", fresh=True)
                yield _progress_html("Starting…", extra="waiting for the model"), gr.skip()
                for kind, item in _stream(lambda cb, ev: target.generate(req, cb, ev), cancel):
                    if kind == "progress":
                        preview_image = [item.preview] if item.preview is not None else gr.skip()
                        yield _progress_html("Generating", item), preview_image
                    else:
                        paths = _save_pngs(item.images, item.metadata, sessions.outputs(request))
                        seeds = ", ".join(str(s) for s in item.seeds)
                        took = item.timings.get("total", 0.0)
                        yield _progress_html("Done", extra=f"seed {seeds} · {took:.1f}s", state="done"), paths
            except Cancelled:
                yield _idle_html("Stopped — nothing was changed."), gr.skip()
            except Exception as error:  # noqa: BLE001
                raise _say(error) from None

        def generate_seconds(request: Any, *values: Any) -> float:
            v = dict(zip(gen_keys, values))
            fitting = 3.0 if v.get("fit_boxes") else 1.0  # box fitting: a forward and backward per early step
            return min(120.0, 10.0 + 0.6 * float(v.get("steps") or 20) * float(v.get("num_images") or 1) * fitting)

        gen_event = generate_btn.click(
            on_gpu(generate, generate_seconds), list(gen_widgets.values()), [gen_status, results],
            api_name="generate", show_progress="minimal", show_progress_on=gen_status,
            concurrency_id="gpu", concurrency_limit=1)
        prompt.submit(on_gpu(generate, generate_seconds), list(gen_widgets.values()), [gen_status, results],
                      api_visibility="undocumented", show_progress="minimal", show_progress_on=gen_status,
                      concurrency_id="gpu", concurrency_limit=1)

        def stop(request: gr.Request) -> None:
            sessions.cancel_flag(request, "generate").set()

        stop_btn.click(stop, None, None, queue=False, api_name="stop", show_progress="hidden")
        del gen_event

        # ================================================================ events: reuse / project
        def on_result_select(evt: gr.SelectData) -> str | None:
            value = evt.value or {}
            image = value.get("image") if isinstance(value, dict) else None
            return (image or {}).get("path") if isinstance(image, dict) else None

        results.select(on_result_select, None, selected_result, api_visibility="undocumented", show_progress="hidden")

        apply_outputs = [prompt, negative, canvas_box, relation, seed, randomize, size, steps, cfg, scheduler,
                         num_images, strength, fit_boxes]

        def apply_request(req: GenerateRequest, request: gr.Request | None, width: int | None = None,
                          height: int | None = None) -> tuple:
            """A GenerateRequest back into the widgets (same order as apply_outputs)."""
            subs = subjects_of(request)
            native_now = native_size()
            w, h = width or req.width or native_now, height or req.height or native_now
            size_value = "native" if req.width is None and req.height is None else f"{req.width}x{req.height}"
            size_update = gr.update(choices=_with_choice(_sizes(native_now), size_value), value=size_value)
            rel = req.relation if req.relation in relations else ""
            return (req.prompt, req.negative_prompt, canvas.layout_to_canvas(req.layout, w, h, suggestions(subs)),
                    gr.update(value=rel), req.seed if req.seed is not None else 0, req.seed is None, size_update,
                    req.steps, req.cfg, req.scheduler, req.num_images, req.guidance.strength,
                    req.guidance.fit_iterations > 0)

        @guarded
        def reuse(path: str | None, request: gr.Request):
            if not path:
                raise InputError("click a result first, then reuse its settings")
            return apply_request(sessions.studio_for(request).read_request(path), request)

        reuse_btn.click(reuse, selected_result, apply_outputs, api_visibility="undocumented", show_progress="hidden")

        @guarded
        def open_png(file: Any, request: gr.Request):
            path = getattr(file, "name", file)
            if not path or Path(path).suffix.lower() != ".png":
                raise InputError("open a PNG made by Troupe")
            return apply_request(sessions.studio_for(request).read_request(path), request)

        png_in.upload(open_png, png_in, apply_outputs, api_name="open_png", show_progress="hidden")

        @guarded
        def save_project(request: gr.Request, *values: Any):
            data = dict(zip(gen_keys, values))
            req = _request_from(data, request)
            width, height = canvas.size_of(data["canvas"])
            words = class_words(request)
            named = {r.subject for r in req.layout.regions if r.subject} | {
                n for n in words if f"<{n}>" in req.prompt}
            project = Project(request=req, width=width, height=height,
                              subjects={n: words[n] for n in sorted(named) if n in words},
                              model=sessions.studio.model_spec.source)
            path = project.save(sessions.outputs(request) / "projects")
            return gr.update(value=str(path), visible=True)

        save_btn.click(save_project, list(gen_widgets.values()), project_file, api_name="save_project", show_progress="hidden")

        @guarded
        def open_project(file: Any, request: gr.Request):
            path = getattr(file, "name", file)
            if not path:
                raise InputError("choose a project file (.json)")
            project = read_project(path)
            missing = sorted(set(project.subjects) - set(class_words(request)))
            if missing:
                gr.Warning("This project names subjects you have not registered: "
                           + ", ".join(f"<{m}>" for m in missing) + ". Import them before generating.")
            return apply_request(project.request, request, project.width, project.height)

        project_in.upload(open_project, project_in, apply_outputs, api_name="open_project", show_progress="hidden")

        # ================================================================ events: subjects
        def _register_from(values: dict[str, Any]) -> RegisterRequest:
            """The one place where the registration widgets become a RegisterRequest."""
            files = values["photos"] or []
            paths = [getattr(f, "name", f) for f in (files if isinstance(files, list) else [files])]
            return RegisterRequest(name=(values["name"] or "").strip(), class_word=(values["class_word"] or "").strip(),
                                   photos=_check_photos(paths), preset=values["preset"] or "standard")

        reg_keys = ["photos", "name", "class_word", "preset"]

        def register(request: gr.Request, *values: Any):
            """Stream: (status, subject gallery)."""
            try:
                req = _register_from(dict(zip(reg_keys, values)))
                target = sessions.studio_for(request)
                if req.name in {s.name for s in target.subjects()}:
                    raise InputError(f"there is already a subject named '{req.name}': pick another name or delete it")
                cancel = sessions.cancel_flag(request, "register", fresh=True)
                title = f"Registering <{req.name}>"
                yield _progress_html(title, extra="preparing photos"), gr.skip()
                for kind, item in _stream(lambda cb, ev: target.register(req, cb, ev), cancel):
                    if kind == "progress":
                        yield _progress_html(title, item), gr.skip()
                    else:
                        yield (_progress_html(f"<{item.name}> is ready", extra=f"{item.steps} steps", state="done"),
                               _cards(target.subjects()))
            except Cancelled:
                yield _idle_html("Registration cancelled — nothing was saved."), gr.skip()
            except Exception as error:  # noqa: BLE001
                raise _say(error) from None

        def register_seconds(request: Any, *values: Any) -> float:
            preset = dict(zip(reg_keys, values)).get("preset")
            return {"quick": 40.0, "standard": 90.0, "thorough": 180.0}.get(preset or "", 90.0)

        reg_event = register_btn.click(
            on_gpu(register, register_seconds), [photos, subject_name, subject_class, reg_preset],
            [reg_status, subject_gallery], api_name="register", show_progress="minimal", show_progress_on=reg_status,
            concurrency_id="gpu", concurrency_limit=1)
        reg_event.then(refresh_choices, None, [slot_a, slot_b, add_label, subject_gallery, subject_pick], api_visibility="undocumented", show_progress="hidden").then(
            refresh_canvas_suggestions, canvas_box, canvas_box, api_visibility="undocumented", show_progress="hidden")
        def stop_register(request: gr.Request) -> None:
            sessions.cancel_flag(request, "register").set()

        reg_stop.click(stop_register, None, None, queue=False, api_visibility="undocumented", show_progress="hidden")

        def on_subject_select(evt: gr.SelectData, request: gr.Request):
            subs = subjects_of(request)
            if evt.index is None or evt.index >= len(subs):
                return gr.skip()
            return gr.update(value=subs[evt.index].name)

        subject_gallery.select(on_subject_select, None, subject_pick, api_visibility="undocumented", show_progress="hidden")

        def on_subject_pick(name: str | None, request: gr.Request):
            s = next((x for x in subjects_of(request) if x.name == name), None)
            if s is None:
                return "Select a subject to rename, export or delete it.", gr.skip()
            curve = f" · final loss {s.loss_curve[-1]:.4f}" if s.loss_curve else ""
            if s.photo_loss:
                curve += f" · loss on its photos {s.photo_loss[0]:.4f} → {s.photo_loss[1]:.4f}"
            text = (f"**`<{s.name}>`** — a {s.class_word} · model family `{s.family}` · {s.steps} steps{curve} · "
                    f"registered {s.created[:16].replace('T', ' ')}")
            return text, s.name

        subject_pick.change(on_subject_pick, subject_pick, [subject_detail, rename_to], api_visibility="undocumented", show_progress="hidden")

        def subjects_changed(request: gr.Request):
            return refresh_choices(request)

        @guarded
        def rename(old: str | None, new: str, request: gr.Request):
            if not old:
                raise InputError("select a subject first")
            info_new = sessions.studio_for(request).rename_subject(old, (new or "").strip())
            names = [x.name for x in subjects_of(request)]
            return gr.update(choices=names, value=info_new.name), f"Renamed `<{old}>` to `<{info_new.name}>`. Prompts that use `<{old}>` need updating."

        def then_refresh_subjects(event):
            """After a change to the library: every subject picker, the gallery and the canvas suggestions."""
            return event.success(subjects_changed, None, [slot_a, slot_b, add_label, subject_gallery, subject_pick],
                                 api_visibility="undocumented", show_progress="hidden").then(
                refresh_canvas_suggestions, canvas_box, canvas_box, api_visibility="undocumented", show_progress="hidden")

        then_refresh_subjects(rename_btn.click(rename, [subject_pick, rename_to], [subject_pick, subject_detail],
                                               api_name="rename_subject", show_progress="hidden"))

        @guarded
        def delete(name: str | None, request: gr.Request):
            if not name:
                raise InputError("select a subject first")
            sessions.studio_for(request).delete_subject(name)
            return gr.update(choices=[x.name for x in subjects_of(request)], value=None), f"Deleted `<{name}>`."

        then_refresh_subjects(delete_btn.click(delete, subject_pick, [subject_pick, subject_detail],
                                               api_name="delete_subject", show_progress="hidden"))

        @guarded
        def export(name: str | None, request: gr.Request):
            if not name:
                raise InputError("select a subject first")
            folder = sessions.outputs(request) / "export"
            folder.mkdir(parents=True, exist_ok=True)
            path = sessions.studio_for(request).export_subject(name, folder / f"{name}.safetensors")
            return gr.update(value=str(path), visible=True)

        export_btn.click(export, subject_pick, export_file, api_name="export_subject", show_progress="hidden")

        @guarded
        def place(name: str | None, canvas_json: str, request: gr.Request):
            """Add a region for the picked subject and go to the canvas."""
            if not name:
                raise InputError("select a subject first")
            if name not in class_words(request):
                raise InputError(f"there is no subject named '{name}'")
            return canvas.add_region(canvas_json, f"<{name}>"), gr.Tabs(selected="compose")

        place_btn.click(place, [subject_pick, canvas_box], [canvas_box, tabs], api_visibility="undocumented",
                        show_progress="hidden")

        @guarded
        def import_subject(file: Any, request: gr.Request):
            path = getattr(file, "name", file)
            if not path or Path(path).suffix.lower() != ".safetensors":
                raise InputError("import a subject file exported by Troupe (.safetensors)")
            info_new = sessions.studio_for(request).import_subject(path)
            return f"Imported `<{info_new.name}>` (a {info_new.class_word})."

        then_refresh_subjects(import_btn.upload(import_subject, import_btn, subject_detail, api_name="import_subject",
                                                show_progress="hidden"))

        # ================================================================ events: settings
        def on_vram(name: str | None):
            preset = vram.get(name or "")
            if preset is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return preset.device, preset.dtype, preset.quantization, preset.offload

        vram_preset.change(on_vram, vram_preset, [device, dtype, quant, offload], queue=False, api_visibility="undocumented", show_progress="hidden")

        spec_keys = ["source", "device", "dtype", "quantization", "offload"]

        def _spec_from(values: dict[str, Any]) -> ModelSpec:
            """The one place where the settings widgets become a ModelSpec."""
            return ModelSpec(source=(values["source"] or "").strip(), device=values["device"], dtype=values["dtype"],
                             quantization=values["quantization"], offload=values["offload"])

        def load_model(*values: Any):
            try:
                if not allow_model_switch:
                    raise InputError("this studio's model is fixed (switching is off here)")
                spec = _spec_from(dict(zip(spec_keys, values)))
                yield _progress_html(f"Loading {spec.source}…", extra="other jobs wait their turn"), gr.skip(), \
                    gr.skip(), gr.skip()
                started = time.perf_counter()
                studio.load_model(spec)
                new_info = studio.model_info()
                new_native = int(new_info.get("native_size") or native)
                yield (_progress_html(f"Loaded {spec.source}", extra=f"{time.perf_counter() - started:.1f}s",
                                      state="done"),
                       _model_markdown(new_info), _model_badge(new_info),
                       gr.update(choices=_sizes(new_native), value="native"))
            except Exception as error:  # noqa: BLE001
                raise _say(error) from None

        load_btn.click(on_gpu(load_model, lambda *a, **k: 60.0), [model_source, device, dtype, quant, offload],
                       [load_status, model_info, model_badge, size], api_name="load_model", show_progress="minimal", show_progress_on=load_status,
            concurrency_id="gpu",
                       concurrency_limit=1)

        # every page load: fresh subject lists for this session (per-user libraries on a Space)
        demo.load(refresh_choices, None, [slot_a, slot_b, add_label, subject_gallery, subject_pick], api_visibility="undocumented", show_progress="hidden").then(
            refresh_canvas_suggestions, canvas_box, canvas_box, api_visibility="undocumented", show_progress="hidden")
        def on_unload(request: gr.Request) -> None:
            sessions.forget(request)

        demo.unload(on_unload)
        del reg_event
    return demo


# ------------------------------------------------------------------------------------------------ small views
def _with_choice(choices: list[tuple[str, str]], value: str) -> list[tuple[str, str]]:
    return choices if any(v == value for _, v in choices) else [*choices, (value.replace("x", "×"), value)]


def _relation_label(relation: Relation) -> str:
    return relation.template.format(a="A", b="B")


def _cards(subjects: list[SubjectInfo]) -> list[tuple[Any, str]]:
    cards = []
    for s in subjects:
        image: Any = s.thumbnail if s.thumbnail and Path(s.thumbnail).is_file() else _placeholder(s)
        cards.append((image, f"<{s.name}> · {s.class_word} · {s.family}"))
    return cards


def _model_badge(info: dict[str, Any]) -> str:
    native = info.get("native_size", "?")
    return (f'<div class="tr-badge"><span class="tr-dot"></span>{html.escape(str(info.get("source", "?")))}'
            f'<small>{html.escape(str(info.get("family", "?")))} · {native}px · '
            f'{html.escape(str(info.get("device", "?")))}</small></div>')


def _model_markdown(info: dict[str, Any]) -> str:
    rows = "\n".join(f"- **{k.replace('_', ' ')}**: `{v}`" for k, v in info.items())
    return f"### Loaded model\n{rows}"


def _library_markdown(studio: Studio, per_user: str | Path | None, outputs: Path | None) -> str:
    if per_user:
        return ("### Subject library\nOn this Space every visitor gets a private, temporary library: export your "
                "subjects (.safetensors) and download your images to keep them.")
    return (f"### Subject library\n`{studio.library_dir}`\n\nStart with `--library DIR` to use another folder."
            f"\n\n### Images and projects\n`{outputs or 'a temporary folder'}`")


def _vram_markdown(vram: dict) -> str:
    rows = "\n".join(f"- **{p.name}** — `{p.device} · {p.dtype} · {p.quantization} · offload {p.offload}`: {p.note}"
                     for p in vram.values())
    return f"### Machine presets\n{rows}"


# ------------------------------------------------------------------------------------------------ CLI
def add_parsers(subparsers: Any) -> None:
    parser = subparsers.add_parser("ui", help="open the studio in the browser (Gradio)")
    parser.add_argument("--model", default="demo", help="demo, a Hub id, a local diffusers folder or .safetensors")
    parser.add_argument("--library", default=None, help="subject library folder (default ~/.troupe/library)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--outputs", default="outputs", help="folder for generated images and projects")
    parser.add_argument("--share", action="store_true", help="a public gradio.live link")
    parser.add_argument("--vram", default=None, help="machine preset from presets/vram.json (CPU, 8 GB, 24 GB, A100)")
    parser.set_defaults(func=_run_ui)


def make_studio(model: str, library: str | None = None, vram: str | None = None) -> Studio:
    from engines.service import Studio

    spec = ModelSpec(source=model)
    if vram:
        presets = load_vram_presets()
        if vram not in presets:
            raise InputError(f"unknown machine preset '{vram}' (choose from {', '.join(presets)})")
        spec = presets[vram].spec(model)
    return Studio(spec, library)


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          **kwargs: Any) -> Any:
    """One GPU job at a time across the app (plus the shared "gpu" queue for generate/register/load)."""
    return demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                          **launch_options(), **kwargs)


def _run_ui(args: Any) -> int:
    studio = make_studio(args.model, args.library, args.vram)
    serve(build_ui(studio, outputs_dir=args.outputs), args.host, args.port, args.share)
    return 0
