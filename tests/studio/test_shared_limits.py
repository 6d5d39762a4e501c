"""A shared studio (a Space) is fair to every visitor: one GPU job per visitor at a time, a cap on what one job may
cost, both refused before the job joins the queue (Gradio's validator); and a visitor with the page open in a tab
keeps its files however long it sits without a click (studio/ui/open_tabs.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.parse

import pytest

pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from evals.load_test import rest_visitor, session_folders  # noqa: E402
from tests.studio.test_ui_api import free_port, gen_args, two_regions  # noqa: E402

STARTED = (Status.PROCESSING, Status.ITERATING, Status.PROGRESS, Status.FINISHED)
PROMPT = "a red ball next to a blue box"


def wait_for(check, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


@pytest.fixture
def shared_app(tiny_sd15_dir, tmp_path, monkeypatch):
    """A Space-like studio whose "hold …" prompts keep the GPU queue busy until `release` is set."""
    from engines.service import Studio
    from engines.types import ModelSpec
    from studio.ui import build_ui, serve

    release, real = threading.Event(), Studio.generate

    def held(self, request, *args, **kwargs):
        if request.prompt.startswith("hold"):
            release.wait(60)
        return real(self, request, *args, **kwargs)

    monkeypatch.setattr(Studio, "generate", held)
    demo = build_ui(Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path / "shared"),
                    per_user_library=tmp_path / "troupe-libraries", allow_model_switch=False, outputs_dir=None,
                    idle_seconds=600)  # fmt: skip # the sweeper thread waits 60 s: the tests sweep by themselves
    _, url, _ = serve(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo, url, release
    finally:
        release.set()
        demo.close()


def refusal(job) -> str:
    """The one line a refused submission ends with ('' when the job was accepted and ran)."""
    try:
        job.result(timeout=120)
    except Exception as error:  # noqa: BLE001 - gradio_client raises its own types for a refused event
        return str(error)
    return ""


def test_one_job_per_visitor_and_a_cost_cap_before_the_queue(shared_app):
    demo, url, release = shared_app
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    holding = first.submit(*gen_args("hold " + PROMPT, two_regions()), api_name="/generate")
    assert wait_for(lambda: holding.status().code in STARTED)
    again = refusal(first.submit(*gen_args(PROMPT, two_regions()), api_name="/generate"))
    costly = refusal(second.submit(*gen_args(PROMPT, two_regions(), steps=50, images=4), api_name="/generate"))
    waiting = second.submit(*gen_args(PROMPT, two_regions()), api_name="/generate")  # another visitor: accepted
    assert wait_for(lambda: second.session_hash in {e.session_hash for e in demo.troupe_sessions.queue_events()})
    release.set()
    _, gallery = waiting.result(timeout=120)
    holding.result(timeout=120)
    for client in (first, second):
        client.close()
    assert "1 job waiting or running" in again and "press Stop" in again
    assert "image-steps" in costly and "160" in costly
    assert len(gallery) == 1
    after = Client(url, verbose=False)  # the first visitor's job has ended: it may submit again
    assert len(after.predict(*gen_args(PROMPT, two_regions()), api_name="/generate")[1]) == 1


def test_an_open_tab_keeps_its_files_past_the_idle_time(shared_app):
    demo, url, _ = shared_app
    sessions = demo.troupe_sessions
    # a REST call makes the files (gradio_client would hold a heartbeat of its own), then the tab is the raw request
    session, root = rest_visitor(url), sessions.per_user_root.parent
    with open_tab(url, session):
        assert wait_for(lambda: session in sessions.tabs.open_sessions())
        sessions.idle_seconds = 0.01  # long idle by the clock
        time.sleep(0.05)
        swept_while_open = sessions.sweep()
        kept = bool(session_folders(root, session))
    assert wait_for(lambda: session not in sessions.tabs.open_sessions())  # the tab closed
    assert swept_while_open == [] and kept
    assert wait_for(lambda: session_folders(root, session) == [])  # Gradio's unload, or the next sweep


@contextlib.contextmanager
def open_tab(url: str, session: str):
    """What a browser tab holds open: Gradio's heartbeat request (a raw socket, as a page's EventSource keeps it)."""
    address = urllib.parse.urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as tab:
        tab.sendall(f"GET /gradio_api/heartbeat/{session} HTTP/1.1\r\nHost: {address.hostname}\r\n"
                    "Accept: text/event-stream\r\n\r\n".encode())  # fmt: skip
        assert b"200 OK" in tab.recv(200)
        yield
