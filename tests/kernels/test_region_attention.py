"""kernels/region_attention.py against diffusers' own attention: with guidance switched on but nothing to add, the
rewritten attention path gives what AttnProcessor2_0 gives, for cross- and self-attention at SD 1.5 and SDXL widths."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from kernels.maps import ResolutionMaps
from kernels.region_attention import GuidanceState, RegionAttnProcessor

SIDE, TOKENS = 8, 77
SHAPES = {  # query width, heads, head width, text width: the published SD 1.5 and SDXL UNets' attention layers
    "sd15": (320, 8, 40, 768),
    "sdxl": (640, 10, 64, 2048),
}


def _refuse(*args, **kwargs):
    raise AssertionError("the guided path handed the call back to the original processor")


def zero_bias_state() -> GuidanceState:
    """Guidance on (η > 0) over a layout whose weights are all zero: the bias exists but adds nothing."""
    cells = SIDE * SIDE
    maps = ResolutionMaps(
        SIDE,
        SIDE,
        owner=torch.zeros(cells, dtype=torch.long),
        fit_weights=torch.ones(1, cells),
        token_weights=torch.zeros(cells, TOKENS),
        self_blocked=torch.zeros(cells, cells, dtype=torch.bool),
    )
    state = GuidanceState({cells: maps}, images=1)
    state.prepare(torch.device("cpu"), torch.float32)
    state.set_time_scale(0.5)
    return state


@pytest.mark.parametrize("family", sorted(SHAPES))
@pytest.mark.parametrize("cross", [True, False], ids=["cross-attention", "self-attention"])
def test_zero_bias_matches_attn_processor_2_0(family, cross):
    width, heads, head_width, text_width = SHAPES[family]
    torch.manual_seed(0)
    attn = Attention(
        width,
        cross_attention_dim=text_width if cross else None,
        heads=heads,
        dim_head=head_width,
        processor=AttnProcessor2_0(),
    ).eval()
    hidden = torch.randn(2, SIDE * SIDE, width)  # (B, N, C): CFG-batched, the second row conditional
    context = torch.randn(2, TOKENS, text_width) if cross else None
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(RegionAttnProcessor(zero_bias_state(), _refuse, is_cross=cross))
        guided = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(guided, expected, atol=2e-5, rtol=1e-4)


def test_a_nonzero_bias_changes_only_the_conditional_rows():
    width, heads, head_width, text_width = SHAPES["sd15"]
    torch.manual_seed(0)
    attn = Attention(
        width, cross_attention_dim=text_width, heads=heads, dim_head=head_width, processor=AttnProcessor2_0()
    ).eval()
    hidden, context = torch.randn(2, SIDE * SIDE, width), torch.randn(2, TOKENS, text_width)
    state = zero_bias_state()
    state.maps[SIDE * SIDE].token_weights[:, 3] = 2.5  # every cell favours token 3
    state.prepare(torch.device("cpu"), torch.float32)
    state.set_time_scale(0.5)
    with torch.no_grad():
        expected = attn(hidden, encoder_hidden_states=context)
        attn.set_processor(RegionAttnProcessor(state, _refuse, is_cross=True))
        guided = attn(hidden, encoder_hidden_states=context)
    torch.testing.assert_close(guided[0], expected[0], atol=2e-5, rtol=1e-4)  # unconditional: untouched
    assert not torch.allclose(guided[1], expected[1], atol=1e-3)
