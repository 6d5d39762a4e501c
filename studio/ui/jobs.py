"""How the studio's handlers run: readable errors, streamed jobs with cancel, per-session state, ZeroGPU.

- A handler's bad input is an InputError; `guarded` shows it as one readable line and nothing changes. A real bug
  shows its type and message, and its traceback goes to the server log only.
- `stream` runs a GPU job (generation, registration) in a thread and yields its progress, coalesced to the latest
  step, so a slow browser never lags behind the job; the job is cancelled between two steps when asked (Stop) or
  when the browser goes away.
- `Sessions` keeps what cannot live in gr.State: cancel flags and, on a Space, every visitor's own library and
  outputs, removed when the browser tab closes or, for clients that never say goodbye (REST, gradio_client left
  open), once the session has been idle for `idle_seconds` ($TROUPE_IDLE_MINUTES, 30 by default): a session with
  a tab open (studio/ui/open_tabs.py) or a job in the queue or running is never idle, and its clock starts again
  when the tab closes or the job ends.
- `on_gpu` wraps a GPU handler with ZeroGPU's `spaces.GPU` and a duration computed from the same inputs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gradio as gr

from engines.types import InputError, StepProgress, SubjectInfo
from studio.ui.open_tabs import TabCount

if TYPE_CHECKING:
    from engines.service import Studio

log = logging.getLogger(__name__)
# (handler, seconds(*handler args)) -> the handler run on a GPU: spaces.GPU(duration=seconds) on a ZeroGPU Space
GpuWrapper = Callable[[Callable, Callable[..., float]], Callable]
GPU_QUEUE = "gpu"
ON_GPU = {"concurrency_id": GPU_QUEUE, "concurrency_limit": 1}  # generate, register and load share one GPU queue
QUIET = {"api_visibility": "undocumented", "show_progress": "hidden"}  # events that are UI plumbing, not the API
Work = Callable[[Callable[[StepProgress], None], threading.Event], Any]  # work(on_progress, cancel) -> result


# ------------------------------------------------------------------------------------------------ errors
def readable(error: BaseException) -> gr.Error:
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
    """Every error of `fn` (a plain or a streaming handler) becomes one readable message.

    functools.wraps keeps `__wrapped__`, through which Gradio reads the signature: the parameter names (the API's)
    and the gr.Request annotation it fills in."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - every error becomes one readable line
                raise readable(error) from None

        return streaming

    @functools.wraps(fn)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - every error becomes one readable line
            raise readable(error) from None

    return plain


def on_gpu(gpu: GpuWrapper | None, handler: Callable, seconds: Callable[..., float]) -> Callable:
    """The handler as a ZeroGPU job (outside a Space, `gpu` is None and the handler runs as it is)."""
    return gpu(handler, seconds) if gpu else handler


# ------------------------------------------------------------------------------------------------ streaming
def stream(work: Work, cancel: threading.Event) -> Iterator[tuple[str, Any]]:
    """Run `work(on_progress, cancel)` in a thread; yield ("progress", StepProgress) … then ("done", result).

    Progress is coalesced to the latest step. If the consumer goes away (the tab closes, Gradio stops iterating),
    the `finally` sets `cancel`, and the job stops between two steps."""
    events: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            events.put(("done", work(lambda progress: events.put(("progress", progress)), cancel)))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            events.put(("error", error))

    thread = threading.Thread(target=run, name="troupe-job", daemon=True)
    cancel.job = thread  # type: ignore[attr-defined] # Sessions spares a session whose job still runs
    thread.start()
    try:
        while True:
            kind, item = events.get()
            while kind == "progress" and not events.empty():  # skip to the latest step, but never past the end
                newer = events.get()
                if newer[0] != "progress":
                    yield kind, item
                kind, item = newer
            if kind == "error":
                raise item
            yield kind, item
            if kind == "done":
                return
    finally:
        if thread.is_alive():
            cancel.set()


# ------------------------------------------------------------------------------------------------ sessions
IDLE_ENV = "TROUPE_IDLE_MINUTES"


def idle_seconds_from_env(default_minutes: float = 30.0) -> float:
    """How long a Space keeps an idle visitor's files: $TROUPE_IDLE_MINUTES (a positive number), else 30 minutes."""
    text = os.environ.get(IDLE_ENV, "").strip()
    try:
        minutes = float(text) if text else default_minutes
    except ValueError:
        raise InputError(f"{IDLE_ENV} must be a number of minutes, not {text!r}") from None
    if not 0 < minutes < 1e6:
        raise InputError(f"{IDLE_ENV} must be a positive number of minutes, not {text}")
    return minutes * 60


def session_of(request: gr.Request | None) -> str:
    """The browser session's id ("local" for calls without one)."""
    return (getattr(request, "session_hash", None) or "local") if request is not None else "local"


def _folder_name(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()[:24]  # never the raw id in a path


@dataclass
class Sessions:
    """Per-browser-session state that cannot live in gr.State: cancel flags and (on a Space) subject libraries."""

    studio: Studio
    per_user_root: Path | None = None  # set on a Space: every session gets a private library under it
    outputs_dir: Path | None = None  # where a desktop keeps images and projects
    idle_seconds: float | None = None  # per-user mode: forget a session untouched this long (None: only on unload)
    cancels: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    studios: dict[str, Studio] = field(default_factory=dict)
    touched: dict[str, float] = field(default_factory=dict)  # session -> time.monotonic() of its last request
    lock: threading.Lock = field(default_factory=threading.Lock)
    # the events waiting in or taken from the app's queue (build_ui reads Gradio's): a queued visitor makes no request
    # while it waits, so without this its clock would run out in a long queue; and it is how many jobs a visitor has
    queue_events: Callable[[], list] = field(default=lambda: [])
    tabs: TabCount = field(default_factory=TabCount)  # sessions with a browser tab open (studio/ui/open_tabs.py)

    def __post_init__(self) -> None:
        if self.per_user_root is not None and self.idle_seconds:
            interval = min(60.0, max(0.2, self.idle_seconds / 4))
            threading.Thread(
                target=_sweeper, args=(weakref.ref(self), interval), name="troupe-idle", daemon=True
            ).start()

    def studio_for(self, request: gr.Request | None) -> Studio:
        """The shared studio, or (per-user mode) a view of it whose library is this session's own folder."""
        if self.per_user_root is None:
            return self.studio
        session = session_of(request)
        with self.lock:
            self.touched[session] = time.monotonic()
            if session not in self.studios:
                self.studios[session] = self.studio.with_library(self.per_user_root / _folder_name(session))
            return self.studios[session]

    def subjects(self, request: gr.Request | None) -> list[SubjectInfo]:
        return self.studio_for(request).subjects()

    def class_words(self, request: gr.Request | None) -> dict[str, str]:
        return {s.name: s.class_word for s in self.subjects(request)}

    def cancel_flag(self, request: gr.Request | None, kind: str, fresh: bool = False) -> threading.Event:
        """The flag that stops this session's job of `kind` ("generate", "register"); `fresh` for a new job."""
        key = (session_of(request), kind)
        with self.lock:
            self.touched[key[0]] = time.monotonic()
            if fresh or key not in self.cancels:
                self.cancels[key] = threading.Event()
            return self.cancels[key]

    def forget(self, request: gr.Request | None) -> None:
        """The tab closed: stop its jobs, drop its outputs and (per-user mode) its private library."""
        self.forget_session(session_of(request))

    def forget_session(self, session: str) -> None:
        with self.lock:
            for key in [k for k in self.cancels if k[0] == session]:
                self.cancels.pop(key).set()
            self.studios.pop(session, None)
            self.touched.pop(session, None)
        if self.per_user_root is None:
            return  # a desktop keeps its outputs
        for folder in (self._outputs_root() / _folder_name(session), self.per_user_root / _folder_name(session)):
            shutil.rmtree(folder, ignore_errors=True)

    def sweep(self) -> list[str]:
        """Forget every session idle for longer than `idle_seconds` whose job (if any) has ended, and remove the
        folders of sessions this process does not know (left by an earlier run) that are as old; the forgotten ids."""
        if self.per_user_root is None or not self.idle_seconds:
            return []
        now, present = time.monotonic(), {e.session_hash for e in self.queue_events()} | self.tabs.open_sessions()
        with self.lock:
            for session in self.touched:
                if session in present or self._busy(session):  # open in a tab, queued, or its job running
                    self.touched[session] = now  # the idle clock starts again when the tab closes or the job ends
            stale = [s for s, t in self.touched.items() if now - t > self.idle_seconds]
            known = {_folder_name(s) for s in self.touched if s not in stale}
        for session in stale:
            self.forget_session(session)
        cutoff = time.time() - self.idle_seconds
        for root in (self.per_user_root, self._outputs_root()):
            for folder in root.iterdir() if root.is_dir() else ():
                if folder.name not in known and _modified(folder) < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
        return stale

    def queue_problem(self, request: gr.Request | None) -> str | None:
        """Why this visitor may not add another GPU job now (a shared studio's JobCap.jobs_per_visitor), or None."""
        cap = self.studio.job_cap
        if cap is None:
            return None
        session = session_of(request)
        jobs = sum(1 for e in self.queue_events() if e.session_hash == session and e.concurrency_id == GPU_QUEUE)
        if jobs < cap.jobs_per_visitor:
            return None
        return (
            f"you already have {jobs} job{'s' * (jobs > 1)} waiting or running, and this studio takes "
            f"{cap.jobs_per_visitor} per visitor at a time: wait for it, or press Stop"
        )

    def _busy(self, session: str) -> bool:
        """A job of the session still runs (stream() records its thread on the cancel flag)."""
        jobs = [getattr(flag, "job", None) for key, flag in self.cancels.items() if key[0] == session]
        return any(job is not None and job.is_alive() for job in jobs)

    def outputs(self, request: gr.Request | None) -> Path:
        """Where this session's images, projects and exports go: a persistent folder on a desktop, a private
        temporary one per visitor on a Space."""
        if self.per_user_root is None and self.outputs_dir is not None:
            return self.outputs_dir
        session = session_of(request)
        with self.lock:
            self.touched[session] = time.monotonic()
        return self._outputs_root() / _folder_name(session)

    def _outputs_root(self) -> Path:
        """Beside the per-user libraries on a Space (the system's temporary folder for app.py)."""
        root = self.per_user_root.parent if self.per_user_root is not None else Path(tempfile.gettempdir())
        return root / "troupe-outputs"

    def native_size(self, fallback: int = 512) -> int:
        """The loaded model's native image side; `fallback` while it cannot load (the Settings tab says why)."""
        try:
            return int(self.studio.model_info().get("native_size") or fallback)
        except Exception:  # noqa: BLE001 - a size picker must not fail because the model is missing
            return fallback


def queued_events(blocks: gr.Blocks) -> list:
    """The events waiting in `blocks`' queue or running now (each has `session_hash` and `concurrency_id`). Gradio has
    no public call for this, so it reads the queue's own lists (copied first: the server's event loop changes them);
    if a Gradio release renames them, the answer is empty: the sweeper falls back to the clock alone (restarted when
    a job of ours ends), and the per-visitor limit to the cost cap and the button's one click at a time."""
    queue = getattr(blocks, "_queue", None)
    try:
        waiting = [e for line in list(queue.event_queue_per_concurrency_id.values()) for e in list(line.queue)]
        running = [e for job in list(queue.active_jobs) if job for e in list(job)]
    except (AttributeError, TypeError):
        return []
    return waiting + running


def gpu_gate(sessions: Sessions, handler: Callable, check: Callable[..., str | None] | None = None) -> Callable:
    """Gradio's validator for a GPU event whose handler takes `(request: gr.Request, *values)` (studio/ui/forms.py
    form_handler): it runs when a job is submitted, before the job joins the queue, with the handler's arguments. It
    refuses a visitor's job beyond the studio's per-visitor limit and, with `check`, a job that `check(request,
    *values)` names a problem of (its cost), so a refused job never waits in the queue; the page shows the line at
    the first input (Gradio wants one verdict per input), and an API client gets it with HTTP 422."""
    signature = inspect.signature(handler)  # the parameters' names, for the API; Gradio fills gr.Request by annotation
    inputs = len(signature.parameters) - 1

    def validator(request: gr.Request, *values: Any) -> list[dict]:
        problem = sessions.queue_problem(request) or (check(request, *values) if check else None)
        return [gr.validate(problem is None, problem or "")] + [gr.validate(True, "")] * (inputs - 1)

    validator.__signature__ = signature  # type: ignore[attr-defined]
    return validator


def _modified(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:
        return float("inf")  # gone already


def _sweeper(sessions: weakref.ref, interval: float) -> None:
    """Sweep idle sessions every `interval` seconds for as long as the app (its Sessions) lives."""
    while True:
        time.sleep(interval)
        alive = sessions()
        if alive is None:
            return
        try:
            alive.sweep()
        except Exception:  # noqa: BLE001 - a failed sweep is tried again next time; the app keeps serving
            log.exception("sweeping idle sessions failed")
        del alive
