"""Several visitors at once on the studio in Space mode (per-visitor libraries), in-process on the tiny SD 1.5:
every job finishes, no visitor reaches another's subjects or files (API and file routes), closed sessions and idle
REST sessions leave nothing behind. evals/load_test.py runs the same on the demo model with 8 visitors."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

pytest.importorskip("gradio_client")

from evals.load_test import isolation, run_visitors, session_end, summary  # noqa: E402
from tests.tiny_models import subject_photos  # noqa: E402

VISITORS, IDLE = 3, 30.0  # visitors done with their jobs ask every 10 s (load_test); shortened for the REST check


def sweep_often(sessions, done) -> None:
    """The app's sweeper looks every IDLE/4 s; the REST check needs no waiting that long."""
    while not done.wait(0.1):
        sessions.sweep()


def test_three_visitors_at_once_are_served_and_kept_apart(tiny_sd15_dir, tmp_path, monkeypatch):
    from gradio import utils

    import engines.register as register
    from engines.service import Studio
    from engines.types import ModelSpec
    from studio.ui import build_ui, serve
    from tests.studio.test_ui_api import free_port

    quick = replace(register.PRESETS["quick"], steps=2, reg_pool=16, delta_sentences=16, reg_batch=2)
    monkeypatch.setitem(register.PRESETS, "quick", quick)
    studio = Studio(ModelSpec(str(tiny_sd15_dir)), tmp_path / "shared")
    demo = build_ui(studio, per_user_library=tmp_path / "troupe-libraries", allow_model_switch=False,
                    outputs_dir=None, idle_seconds=IDLE)  # fmt: skip
    _, url, _ = serve(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    done = threading.Event()
    try:
        photo = subject_photos(tmp_path, "photo", 1)[0]
        people, clients = run_visitors(url, VISITORS, photo, 2, "quick")
        report = summary(people, 1.0)
        report["isolation"] = isolation(url, tmp_path, utils.get_cache_folder(), people, clients, ring=True)
        demo.troupe_sessions.idle_seconds = 0.5  # idle REST sessions now go at the next sweep
        threading.Thread(target=sweep_often, args=(demo.troupe_sessions, done), daemon=True).start()
        report["session_end"] = session_end(url, tmp_path, people, clients, 8.0)
    finally:
        done.set()
        demo.close()
    assert report["errors"] == [] and report["visitors_finished"] == VISITORS, report["errors"]
    assert report["jobs"] == 6 * VISITORS  # generate, register, generate with the subject, reuse, project, export
    assert report["wait_p95_s"] >= 0 and report["latency_p95_s"] > 0
    probed = report["isolation"]
    assert probed["cross_visitor_reads"] == 0, probed["leaks"]
    assert probed["api_probes"] == 4 * VISITORS and probed["file_probes"] > 50  # each probes the next by name
    assert probed["own_results_served"] == VISITORS  # the route works: each visitor gets its own results
    assert probed["own_subjects_listed"] == VISITORS  # and still lists its own subject
    ended = report["session_end"]
    assert ended["closed_sessions_cleaned"] and ended["rest_folders_made"] and ended["rest_folders_swept"]
    assert demo.troupe_sessions.studios == {} and demo.troupe_sessions.touched == {}  # memory freed too
    assert studio.subjects() == []  # nothing reached the shared library
