"""On a Space, a visitor whose job waits in the queue is not idle: it makes no request while it waits, and its files
must still be there when its turn comes (studio/ui/jobs.py reads Gradio's queue); once its last job has ended and
its connection is gone (or it has none and the idle time has passed), they go. The sweeps are called directly, so the test needs no sleeping to a clock."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from evals.load_test import session_folders  # noqa: E402
from tests.studio.test_ui_api import free_port, gen_args, two_regions  # noqa: E402

STARTED = (Status.PROCESSING, Status.ITERATING, Status.PROGRESS, Status.FINISHED)
PROMPT = "a red ball next to a blue box"


def wait_for(check, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_visitor_waiting_in_the_queue_keeps_its_files_until_idle_after_its_job(tiny_sd15_dir, tmp_path,
                                                                                  monkeypatch):  # fmt: skip
    from engines.service import Studio
    from engines.types import ModelSpec
    from studio.ui import build_ui, serve

    release, real = threading.Event(), Studio.generate

    def held(self, request, *args, **kwargs):  # "hold ..." keeps the GPU queue busy until released
        if request.prompt.startswith("hold"):
            release.wait(60)
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(Studio, "generate", held)
    demo = build_ui(Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path / "shared"),
                    per_user_library=tmp_path / "troupe-libraries", allow_model_switch=False, outputs_dir=None,
                    idle_seconds=600)  # fmt: skip # the sweeper thread waits 60 s: this test sweeps by itself
    sessions = demo.troupe_sessions
    _, url, _ = serve(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        holding = first.submit(*gen_args("hold " + PROMPT, two_regions()), api_name="/generate")
        wait_for(lambda: holding.status().code in STARTED)  # the first visitor holds the GPU queue
        second.predict(*gen_args(PROMPT, two_regions()), api_name="/save_project")
        waiting = second.submit(*gen_args(PROMPT, two_regions()), api_name="/generate")
        wait_for(lambda: second.session_hash in {e.session_hash for e in sessions.queue_events()})
        queued = waiting.status().code not in STARTED
        sessions.idle_seconds = 0.01  # every session is now long idle by the clock
        time.sleep(0.05)
        swept_while_queued = sessions.sweep()
        kept = bool(session_folders(tmp_path, second.session_hash))
        release.set()
        holding.result(timeout=120)
        _, gallery = waiting.result(timeout=120)
        time.sleep(0.05)
        swept_while_connected = sessions.sweep()  # gradio_client holds a heartbeat, as an open tab does
        for client in (first, second):
            client.close()  # the heartbeats end: Gradio's unload (or the next sweep) removes the files
        wait_for(lambda: not session_folders(tmp_path, second.session_hash) or bool(sessions.sweep()))
    finally:
        demo.close()
    assert queued, "the second visitor's job should have waited behind the first one's"
    assert swept_while_queued == [] and kept and len(gallery) == 1  # neither the queued nor the running one
    assert swept_while_connected == []
    assert session_folders(tmp_path, second.session_hash) == []
