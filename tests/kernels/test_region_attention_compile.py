"""Guidance that a compiler can fuse (issue 18): the guided UNet traces into one graph with no breaks, and the
compiled UNet gives what the eager one gives; the bias equals Eq. 7 computed the slow way."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from engines.layout import build_maps
from engines.types import GuidanceConfig, Layout, Region
from kernels.region_attention import GuidanceState, RegionAttnProcessor, install, score_spread
from tests.tiny_models import TEXT_WIDTH, tiny_sd15

TOKENS = 77


def guided_unet(bound_self_attention: bool):
    """The tiny SD 1.5 UNet with region processors on, two overlapping regions, η's time factor 0.3, CFG rows."""
    unet = tiny_sd15().unet.eval()
    layout = Layout((Region("cat", (0.0, 0.1, 0.6, 0.9)), Region("dog", (0.4, 0.2, 1.0, 1.0), layer=1)))
    config = GuidanceConfig(bound_self_attention=bound_self_attention)
    maps = build_maps(layout, [[2], [5, 6]], TOKENS, (16, 16), len(unet.config.block_out_channels), config)
    state = GuidanceState(maps, images=1)
    state.prepare(torch.device("cpu"), torch.float32)
    state.set_time_scale(0.3)
    install(unet, state, bound_self_attention)
    return unet, state


def unet_inputs() -> tuple:
    torch.manual_seed(1)
    return torch.randn(2, 4, 16, 16), torch.tensor(500), torch.randn(2, TOKENS, TEXT_WIDTH)  # CFG: 2 rows


def test_guided_unet_traces_without_graph_breaks():
    unet, _ = guided_unet(bound_self_attention=True)  # both processors: cross-attention and the self bound
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(unet)(*unet_inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_a_new_time_factor_is_read_without_recompiling():
    unet, state = guided_unet(bound_self_attention=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    sample, timestep, context = unet_inputs()
    with torch.no_grad():
        for scale in (0.3, 0.2, 0.1):  # η's time factor changes every step of a generation
            state.set_time_scale(scale)
            eager = unet(sample, timestep, context).sample
            torch.testing.assert_close(compiled(sample, timestep, context).sample, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow  # inductor's C++ build of the kernels: 150 s on one core (RUN_SLOW=1)
def test_inductor_compiled_unet_agrees_with_eager():
    unet, _ = guided_unet(bound_self_attention=True)
    torch._dynamo.reset()
    compiled = torch.compile(unet, fullgraph=True)  # inductor: what --compile uses
    with torch.no_grad():
        eager = unet(*unet_inputs()).sample
        fused = compiled(*unet_inputs()).sample
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_score_spread_is_the_std_of_the_scores():
    torch.manual_seed(0)
    query, key = torch.randn(3, 4, 64, 8) * 2 + 0.5, torch.randn(3, 4, 77, 8) - 0.3  # (B, H, N, d), (B, H, T, d)
    scores = (query @ key.transpose(-1, -2)).flatten(1).double()  # (B, K)
    expected = scores.std(dim=1, unbiased=False) * scores.shape[1] ** 0.5
    torch.testing.assert_close(score_spread(query, key).double(), expected, rtol=1e-4, atol=1e-3)


def test_cross_bias_is_eq_7_on_the_conditional_rows_only():
    _, state = guided_unet(bound_self_attention=False)
    cells = 64
    torch.manual_seed(0)
    query, key = torch.randn(2, 2, cells, 8), torch.randn(2, 2, TOKENS, 8)
    processor = RegionAttnProcessor(state, None, is_cross=True)
    bias = processor._cross_bias(query, key, state.tensors[cells])  # (B, 1, N, T)
    std = (query @ key.transpose(-1, -2))[1].flatten().std(unbiased=False)
    eta = 0.3 * std * 8**-0.5  # time factor · std(QKᵀ), in SDPA's post-scale units
    expected = (eta * state.maps[cells].token_weights).clamp(min=-1e4)  # the pre-issue-18 formula
    torch.testing.assert_close(bias[1, 0], expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(bias[0], torch.zeros_like(bias[0]))  # unconditional row: no bias
