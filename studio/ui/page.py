"""The studio page: a header, the four tabs and what ties them together; and serving it.

`build_ui(studio)` is a factory, so tests pass a tiny-model Studio. The tabs talk to the engines only through
engines.service.Studio and the dataclasses of engines.types.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from engines.types import JOB_CAPS, InputError, JobCap, ModelSpec, SubjectInfo
from studio.ui.compose import ComposeTab
from studio.ui.jobs import QUIET, GpuWrapper, Sessions, idle_seconds_from_env, queued_events
from studio.ui.open_tabs import OpenTabs
from studio.ui.relations import RelationsTab
from studio.ui.settings import SettingsTab
from studio.ui.subjects import SubjectsTab
from studio.ui.views import model_badge

if TYPE_CHECKING:
    from engines.service import Studio

log = logging.getLogger(__name__)
# Jobs waiting at once, for everyone: a client that makes a new session for every call is held back by this and by
# the cost cap of one job, not by the per-visitor limit; past it, Gradio answers "queue is full" (HTTP 503)
QUEUE_SIZE = 64
STATIC = Path(__file__).resolve().parent / "static"


def launch_options() -> dict[str, Any]:
    """Theme and CSS: in Gradio 6 they are arguments of `launch()`."""
    theme = gr.themes.Soft(
        primary_hue="orange",
        secondary_hue="slate",
        neutral_hue="slate",
        font=["Inter", "ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
    )
    return {"theme": theme, "css": (STATIC / "studio.css").read_text()}


def build_ui(
    studio: Studio,
    *,
    per_user_library: str | Path | None = None,
    gpu: GpuWrapper | None = None,
    allow_model_switch: bool = True,
    outputs_dir: str | Path | None = "outputs",
    title: str = "Troupe Studio",
    idle_seconds: float | None = None,
    job_cap: JobCap | None = None,
) -> gr.Blocks:
    """The whole studio as a gr.Blocks. `per_user_library`: a root folder under which every browser session gets
    its own subject library (Spaces), removed when the tab closes or after `idle_seconds` without a request
    (default $TROUPE_IDLE_MINUTES, else 30 min). `gpu`: wraps the GPU handlers (spaces.GPU) with a duration from
    the inputs. `job_cap`: what one visitor's job may cost (JOB_CAPS["shared"] by default with per-user libraries,
    none otherwise)."""
    if per_user_library and idle_seconds is None:
        idle_seconds = idle_seconds_from_env()
    studio.job_cap = job_cap or studio.job_cap or (JOB_CAPS["shared"] if per_user_library else None)
    sessions = Sessions(
        studio,
        Path(per_user_library) if per_user_library else None,
        Path(outputs_dir).expanduser().resolve() if outputs_dir else None,
        idle_seconds if per_user_library else None,
    )
    allow_model_switch = allow_model_switch and not per_user_library  # the visitors' views share one model
    info = _model_info(studio)
    native = int(info.get("native_size") or 512)
    subjects = [] if per_user_library else studio.subjects()  # per-visitor lists arrive with the page load
    learned = [] if per_user_library else studio.learned_relations()
    # on a Space, Gradio's cached copies of uploads and results go too: by age, not by session (a copy can be shared
    # by several visitors and a queued job still needs its upload), so they are kept at least an hour
    expiry = (max(60, round(idle_seconds)), max(3600, round(2 * idle_seconds))) if sessions.idle_seconds else None
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=expiry) as demo:
        with gr.Row(elem_classes="tr-header"):
            gr.HTML(
                '<div class="tr-title"><span class="tr-logo">◐</span> Troupe Studio'
                "<small>your subjects, together — layout, layers, relations</small></div>"
            )
            badge = gr.HTML(model_badge(info), elem_classes="tr-badge-wrap")
        with gr.Tabs(elem_id="tabs") as tabs:
            compose = ComposeTab(sessions, gpu, native, subjects)
            library = SubjectsTab(sessions, gpu, subjects)
            relations = RelationsTab(sessions, gpu, learned)
            settings = SettingsTab(sessions, gpu, info, allow_model_switch)
        subject_lists = SubjectLists(sessions, compose, library)
        relation_lists = RelationLists(sessions, compose, relations)
        compose.wire()
        library.wire(subject_lists.refresh_after, compose.canvas, tabs)
        relations.wire(relation_lists.refresh_after)
        settings.wire(badge, compose.size)
        subject_lists.refresh_after(demo.load)  # every page load: this session's subjects (a Space's are private)
        relation_lists.refresh_after(demo.load)  # and its relations
        demo.unload(sessions.forget)
    sessions.queue_events = lambda: queued_events(demo)  # a queued visitor is not idle; jobs per visitor
    demo.troupe_sessions = sessions  # who the app remembers: the load test checks that closed sessions are freed
    return demo


def _model_info(studio: Studio) -> dict[str, Any]:
    """What the header and the Settings tab show; the UI still opens when the model cannot load, and says why."""
    try:
        return studio.model_info()
    except Exception as error:  # noqa: BLE001 - shown in the Settings tab instead
        log.warning("model not loaded yet: %s", error)
        return {
            "source": studio.model_spec.source,
            "family": "?",
            "native_size": 512,
            "device": "?",
            "status": f"not loaded: {error}",
        }


class SubjectLists:
    """Every widget that lists subjects, in both tabs, refreshed together for this browser session."""

    def __init__(self, sessions: Sessions, compose: ComposeTab, library: SubjectsTab):
        self.sessions, self.compose, self.library = sessions, compose, library

    def refresh(self, canvas: str, request: gr.Request) -> dict[Any, Any]:
        subjects: list[SubjectInfo] = self.sessions.subjects(request)
        return {**self.compose.show_subjects(subjects, canvas), **self.library.show_subjects(subjects)}

    def refresh_after(self, chain: Any) -> Any:
        """`chain` is an event's `.then`/`.success` (after a library change) or `demo.load`."""
        outputs = {*self.compose.subject_widgets(), *self.library.subject_widgets()}
        return chain(self.refresh, self.compose.canvas, outputs, **QUIET)


class RelationLists:
    """Every widget that lists relations: Compose's picker (presets and learned) and the Relations tab's list."""

    def __init__(self, sessions: Sessions, compose: ComposeTab, library: RelationsTab):
        self.sessions, self.compose, self.library = sessions, compose, library

    def refresh(self, picked: str | None, request: gr.Request) -> dict[Any, Any]:
        studio = self.sessions.studio_for(request)
        return {**self.compose.show_relations(studio.relations(), picked),
                **self.library.show_relations(studio.learned_relations())}  # fmt: skip

    def refresh_after(self, chain: Any) -> Any:
        """`chain` is an event's `.then`/`.success` (after a relation library change) or `demo.load`."""
        outputs = {*self.compose.relation_widgets(), *self.library.relation_widgets()}
        return chain(self.refresh, self.compose.form["relation"], outputs, **QUIET)


def make_studio(model: str, library: str | None = None, vram: str | None = None) -> Studio:
    """The Studio for `--model`, `--library` and `--vram` (a machine preset of presets/vram.json)."""
    from engines.service import Studio  # torch-free to import; the model loads on first use

    spec = ModelSpec(source=model)
    if vram:
        presets = Studio.vram_presets()
        if vram not in presets:
            raise InputError(f"unknown machine preset '{vram}' (choose from {', '.join(presets)})")
        spec = presets[vram].spec(model)
    return Studio(spec, library)


def serve(
    demo: gr.Blocks, host: str | None = "127.0.0.1", port: int | None = 7860, share: bool = False, **kwargs: Any
) -> Any:
    """One GPU job at a time across the app (plus the shared "gpu" queue for generate/register/load), at most
    QUEUE_SIZE jobs waiting; the middleware tells the idle sweeper which visitors have a tab open."""
    sessions = getattr(demo, "troupe_sessions", None)
    if sessions is not None:
        from starlette.middleware import Middleware

        app_kwargs = kwargs.pop("app_kwargs", None) or {}
        middleware = [*app_kwargs.get("middleware", []), Middleware(OpenTabs, tabs=sessions.tabs)]
        kwargs["app_kwargs"] = {**app_kwargs, "middleware": middleware}
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE).launch(
        server_name=host, server_port=port, share=share, **launch_options(), **kwargs
    )
