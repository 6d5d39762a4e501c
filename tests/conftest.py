"""Shared fixtures: tiny SD1.5/SDXL model folders (built once per session) and their loaded bundles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: set RUN_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("RUN_SLOW") != "1":
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny

    return save_tiny("sd15", tmp_path_factory.mktemp("tiny_sd15"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_tiny

    return save_tiny("sdxl", tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def sd15(tiny_sd15_dir):
    from engines.models import load_model
    from engines.types import ModelSpec

    return load_model(ModelSpec(str(tiny_sd15_dir)))


@pytest.fixture(scope="session")
def sdxl(tiny_sdxl_dir):
    from engines.models import load_model
    from engines.types import ModelSpec

    return load_model(ModelSpec(str(tiny_sdxl_dir)))


@pytest.fixture(scope="module")
def served_studio(tiny_sd15_dir, tmp_path_factory):
    """The studio UI served on a free local port over a tiny SD 1.5 (one per test module): (studio, url)."""
    import socket
    from dataclasses import replace

    import engines.register as register
    from engines.service import Studio
    from engines.types import ModelSpec
    from studio.ui import build_ui, serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        # the real registration path, shortened: these tests cover the studio's plumbing, not training quality
        quick = replace(register.PRESETS["quick"], steps=6, reg_pool=16, delta_sentences=16, reg_batch=2)
        mp.setitem(register.PRESETS, "quick", quick)
        studio = Studio(ModelSpec(source=str(tiny_sd15_dir)), tmp_path_factory.mktemp("library"))
        demo = build_ui(studio, outputs_dir=tmp_path_factory.mktemp("outputs"))
        _, url, _ = serve(demo, port=port, prevent_thread_lock=True, quiet=True)
        yield studio, url
        demo.close()
