"""--compile (engines/compiled_unet.py): a guided generation on the compiled UNet gives the eager one's pixels,
a second request with another layout reuses the graph, and box fitting (which backpropagates) still runs eagerly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo

import engines.compiled_unet as compiled_unet
from engines.generate import Generator
from engines.models import load_model
from engines.types import GenerateRequest, GuidanceConfig, Layout, ModelSpec, Region

PROMPT = "a photo of dog and cat on the beach"


def request(x0: float, fit: int = 0) -> GenerateRequest:
    layout = Layout((Region("dog", (x0, 0.1, 0.5, 0.9)), Region("cat", (0.5, 0.2, 1.0, 1.0), layer=1)))
    return GenerateRequest(PROMPT, layout=layout, seed=3, steps=3, guidance=GuidanceConfig(fit_iterations=fit))


@pytest.fixture(scope="module")
def bundles(tiny_sd15_dir):
    """An eager and a compiled copy of the tiny SD 1.5; aot_eager captures the same graph as inductor in seconds."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled_unet, "COMPILE_BACKEND", "aot_eager")
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        eager = load_model(ModelSpec(str(tiny_sd15_dir)))
        compiled = load_model(ModelSpec(str(tiny_sd15_dir), compile=True))  # the path --compile takes
        yield eager, compiled
    torch._dynamo.reset()


def pixels(bundle, req: GenerateRequest) -> np.ndarray:
    return np.asarray(Generator(bundle)(req).images[0]).astype(int)


def test_compiled_guided_generation_matches_eager_and_compiles_once(bundles):
    eager, compiled = bundles
    for x0 in (0.0, 0.2):  # two layouts: the second must not build a new graph
        assert np.abs(pixels(compiled, request(x0)) - pixels(eager, request(x0))).max() <= 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_box_fitting_runs_eagerly_on_a_compiled_unet(bundles):
    eager, compiled = bundles
    assert isinstance(compiled.pipe.unet.forward, compiled_unet.CompiledForward)
    assert np.abs(pixels(compiled, request(0.0, fit=1)) - pixels(eager, request(0.0, fit=1))).max() <= 1
