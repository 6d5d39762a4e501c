"""Region ownership per attention resolution (exact area, z-order), Eq. 7 weights, the η(t) schedule and the
moment-based std used inside the attention processor."""

import math

import pytest
import torch

from engines.layout import (
    BACKGROUND,
    attention_resolutions,
    box_coverage,
    build_maps,
    guidance_scale_at,
    region_owners,
    sigma_at,
    visible_coverage,
)
from engines.types import GuidanceConfig, InputError, Layout, Region


def test_coverage_is_exact_area():
    coverage = box_coverage([(0.0, 0.0, 0.375, 1.0)], 1, 4)  # 1.5 of 4 cells
    assert coverage[0, 0].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])


def test_visible_coverage_is_the_exact_area_each_region_shows_in_front():
    back = Region("dog", (0.1, 0.1, 0.6, 0.6), layer=0)
    front = Region("cat", (0.4, 0.3, 0.9, 0.8), layer=1)
    for regions, (b, f) in (((back, front), (0, 1)), ((front, back), (1, 0))):
        visible = visible_coverage(Layout(regions), 4, 8)  # (2, 4, 8), in cells
        cells = 4 * 8
        assert float(visible[f].sum()) / cells == pytest.approx(0.5 * 0.5)  # all of the front box shows
        assert float(visible[b].sum()) / cells == pytest.approx(0.5 * 0.5 - 0.2 * 0.3)  # less what the front hides
        assert float(visible.sum(0).max()) <= 1.0 + 1e-9  # no cell is shared out more than once
    alone = visible_coverage(Layout((back,)), 4, 8)[0]
    assert torch.allclose(alone, box_coverage([back.box], 4, 8)[0])
    # a cell half inside the box counts half: (0, 0.375) covers 1.5 of 4 cells
    assert visible_coverage(Layout((Region("dog", (0.0, 0.0, 0.375, 1.0)),)), 1, 4)[0, 0].tolist() == pytest.approx(
        [1.0, 0.5, 0.0, 0.0]
    )


def test_front_layer_owns_the_overlap_whatever_the_list_order():
    back, front = Region("dog", (0.0, 0.0, 0.75, 1.0), layer=0), Region("cat", (0.25, 0.0, 1.0, 1.0), layer=1)
    for regions, front_index in (((back, front), 1), ((front, back), 0)):
        owner = region_owners(Layout(regions), 4, 4)
        assert (owner[:, 1:3] == front_index).all()
        assert (owner[:, 0] == 1 - front_index).all()


def test_equal_layers_later_region_in_front():
    a, b = Region("dog", (0.0, 0.0, 1.0, 1.0)), Region("cat", (0.0, 0.0, 1.0, 1.0))
    assert (region_owners(Layout((a, b)), 2, 2) == 1).all()


def test_small_box_keeps_one_cell_unless_hidden_in_front():
    tiny = Region("dog", (0.1, 0.1, 0.2, 0.2))
    owner = region_owners(Layout((tiny,)), 4, 4)
    assert (owner == 0).sum() == 1 and owner[0, 0] == 0
    cover = Region("cat", (0.0, 0.0, 1.0, 1.0), layer=1)
    assert (region_owners(Layout((tiny, cover)), 4, 4) == 1).all()


def test_background_is_unowned():
    owner = region_owners(Layout((Region("dog", (0.0, 0.0, 0.5, 0.5)),)), 4, 4)
    assert (owner[2:, :] == BACKGROUND).all() and (owner[:2, :2] == 0).all()


def test_resolutions_follow_the_unet_downsampling():
    assert attention_resolutions(13, 20, 3) == [(13, 20), (7, 10), (4, 5)]


def test_weight_matrix_and_self_bound():
    layout = Layout((Region("dog", (0.0, 0.0, 0.5, 1.0)), Region("cat", (0.5, 0.0, 1.0, 0.5))))
    config = GuidanceConfig(bound_self_attention=True)
    maps = build_maps(layout, [(4,), (6,)], 77, (2, 2), levels=1, config=config)[4]
    # cells row-major: (0,0) dog, (0,1) cat, (1,0) dog, (1,1) background
    assert maps.token_weights[:, 4].tolist() == [2.5, -1e8, 2.5, 0.0]
    assert maps.token_weights[:, 6].tolist() == [-1e8, 2.5, -1e8, 0.0]
    assert maps.token_weights[:, 5].abs().sum() == 0
    assert maps.self_blocked[0].tolist() == [False, True, False, False]
    assert not maps.self_blocked[3].any()


def test_eta_schedule_fades_and_respects_the_guided_fraction():
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    assert sigma_at(alphas, 999) == pytest.approx(14.6, abs=0.1)  # the public code's first σ
    early, late = guidance_scale_at(GuidanceConfig(), alphas, 999), guidance_scale_at(GuidanceConfig(), alphas, 20)
    assert early == pytest.approx(0.08 * math.log1p(14.6**2), rel=0.01) and late < early / 10
    half = GuidanceConfig(guided_fraction=0.5)
    assert guidance_scale_at(half, alphas, 600) > 0 and guidance_scale_at(half, alphas, 400) == 0


@pytest.mark.parametrize("box", [(0.5, 0.0, 0.5, 1.0), (-0.1, 0, 1, 1), (0, 0, 1, 1.2), (0.6, 0, 0.4, 1)])
def test_bad_boxes_are_refused(box):
    with pytest.raises(InputError):
        Region("dog", box)
