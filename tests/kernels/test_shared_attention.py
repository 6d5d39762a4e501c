"""kernels/shared_attention.py against diffusers' own attention: sharing off (or a view with no foreground to give)
is plain self-attention; sharing on couples the views of one group and never two groups; the recorder changes
nothing and records the class word's map."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from kernels.shared_attention import ClassAttentionRecorder, SharedAttentionState, SharedSelfAttnProcessor

SIDE, WIDTH, TEXT, TOKENS = 4, 16, 12, 7


def _attention(cross: bool = False) -> Attention:
    torch.manual_seed(0)
    return Attention(WIDTH, cross_attention_dim=TEXT if cross else None, heads=2, dim_head=8).eval()


def _state(views: int = 2, **kwargs) -> SharedAttentionState:
    return SharedAttentionState(views, (SIDE, SIDE), class_positions=(2, 3), **kwargs)


def _run(attn: Attention, processor, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return processor(attn, hidden, context)


def test_sharing_off_is_plain_self_attention():
    attn, hidden = _attention(), torch.randn(2, SIDE * SIDE, WIDTH)  # (V, N, C)
    plain = _run(attn, AttnProcessor2_0(), hidden)
    shared = _run(attn, SharedSelfAttnProcessor(_state(shared=False), AttnProcessor2_0()), hidden)
    assert torch.equal(plain, shared)


def test_a_view_sees_only_the_others_foreground():
    attn, hidden = _attention(), torch.randn(2, SIDE * SIDE, WIDTH)  # (V, N, C)
    plain = _run(attn, AttnProcessor2_0(), hidden)
    state = _state()
    everything = _run(attn, SharedSelfAttnProcessor(state, AttnProcessor2_0()), hidden)
    assert not torch.allclose(everything[0], plain[0], atol=1e-4)  # first step: view 0 reads all of view 1

    foreground = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    foreground[0, 1:3, 1:3] = True  # view 1 has nothing to give; view 0 has four cells
    state.set_foreground(foreground)
    masked = _run(attn, SharedSelfAttnProcessor(state, AttnProcessor2_0()), hidden)
    torch.testing.assert_close(masked[0], plain[0], atol=1e-5, rtol=1e-5)  # view 0 reads only itself
    assert not torch.allclose(masked[1], plain[1], atol=1e-4)  # view 1 reads view 0's foreground
    bias = state.bias(SIDE * SIDE, hidden.device, hidden.dtype)  # (V, 1, 1, V·N)
    assert int((bias[1, 0, 0, : SIDE * SIDE] == 0).sum()) == 4 and bool((bias[1, 0, 0, SIDE * SIDE :] == 0).all())


def test_views_share_within_their_branch_only():
    """With classifier-free guidance the batch is [uncond views, cond views]: the two groups never mix."""
    attn, hidden = _attention(), torch.randn(4, SIDE * SIDE, WIDTH)  # (2·V, N, C)
    processor = SharedSelfAttnProcessor(_state(), AttnProcessor2_0())
    both = _run(attn, processor, hidden)
    torch.testing.assert_close(both[:2], _run(attn, processor, hidden[:2]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[2:], _run(attn, processor, hidden[2:]), atol=1e-5, rtol=1e-5)


def test_coarse_layers_keep_small_objects():
    state = _state()
    foreground = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    foreground[1, 3, 3] = True  # one latent cell
    state.set_foreground(foreground)
    bias = state.bias(1, torch.device("cpu"), torch.float32)  # the 1×1 layer: (V, 1, 1, V)
    assert bias[0, 0, 0].tolist() == [0.0, 0.0]  # view 1's only cell is still foreground there


def test_recorder_changes_nothing_and_records_the_class_word():
    attn = _attention(cross=True)
    hidden, context = torch.randn(4, SIDE * SIDE, WIDTH), torch.randn(4, TOKENS, TEXT)  # (2·V, N, C), (2·V, T, D)
    state = _state()
    recorded = _run(attn, ClassAttentionRecorder(state, AttnProcessor2_0()), hidden, context)
    torch.testing.assert_close(recorded, _run(attn, AttnProcessor2_0(), hidden, context))
    assert state.map_count == 1
    with torch.no_grad():  # the conditional rows' attention, heads averaged, on the class word's two tokens
        query = attn.to_q(hidden[2:]).view(2, -1, 2, 8).transpose(1, 2)  # (V, H, N, d)
        key = attn.to_k(context[2:]).view(2, -1, 2, 8).transpose(1, 2)  # (V, H, T, d)
        expected = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1).mean(1)[..., 2:4].sum(-1)  # (V, N)
    torch.testing.assert_close(state.mean_map(), expected.reshape(2, SIDE, SIDE), atol=1e-5, rtol=1e-5)
