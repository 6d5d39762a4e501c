"""The demo model's grounding loss: captions know where each object's words are, the loss is zero exactly when
each object's words are attended on its own pixels, and recording attention does not change the UNet."""

import numpy as np
import pytest
import torch

from demo_world.grounding import content_word_positions, grounding_loss, grounding_targets
from demo_world.scenes import random_scene
from demo_world.tokenizer import load_tokenizer, write_tokenizer
from kernels.attention_record import AttentionRecord, RecordingAttnProcessor


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok")))


def test_caption_spans_point_at_each_objects_phrase():
    for seed in range(200):
        scene = random_scene(seed)
        assert len(scene.phrase_spans) == len(scene.objects)
        for obj, (start, end) in zip(scene.objects, scene.phrase_spans):
            phrase = scene.caption[start:end]
            assert phrase.split()[0] in ("a", "an") and obj.category in phrase.split()
            assert obj.colour in phrase.split() or phrase.split()[1:] == [obj.category]
        ends = sorted(scene.phrase_spans)
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), "phrases overlap"


def test_content_words_skip_articles_and_with(tokenizer):
    caption = "a photo of a red ring with blue dots next to a box"
    offsets = tokenizer(caption, return_offsets_mapping=True).offset_mapping
    ids = tokenizer(caption).input_ids
    start = caption.index("a red")
    positions = content_word_positions(caption, start, start + len("a red ring with blue dots"), offsets)
    words = [tokenizer.convert_ids_to_tokens(ids[p]).removesuffix("</w>") for p in positions]
    assert words == ["red", "ring", "blue", "dots"]


def test_targets_hold_each_objects_words_and_visible_mask(tokenizer):
    scenes = [random_scene(s) for s in range(20)]
    targets = grounding_targets(scenes, tokenizer)
    for n, scene in enumerate(scenes):
        ids = tokenizer(scene.caption).input_ids
        for o, obj in enumerate(scene.objects):
            words = [
                tokenizer.convert_ids_to_tokens(ids[p]).removesuffix("</w>")
                for p in targets.positions[n, o].tolist()
                if p >= 0
            ]
            assert obj.category in words
            assert float(targets.masks[n, o].float().sum()) == pytest.approx(obj.mask.sum() / 16, abs=0.5)
        assert (targets.positions[n, len(scene.objects) :] == -1).all()


def _attention_on(masks: torch.Tensor, positions: torch.Tensor, tokens: int = 10) -> torch.Tensor:
    """[B, HW, T]: each object's pixels attend only to its first word; other pixels to token 0."""
    batch, objects, side, _ = masks.shape
    attention = torch.zeros(batch, side * side, tokens)
    attention[:, :, 0] = 1.0
    for b in range(batch):
        for o in range(objects):
            pixels = masks[b, o].flatten() > 0
            attention[b, pixels, 0] = 0.0
            attention[b, pixels, positions[b, o, 0]] = 1.0
    return attention


def test_loss_is_lowest_when_words_are_attended_on_their_own_pixels():
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, 2:8, 2:8] = 1.0
    masks[0, 1, 9:15, 9:15] = 1.0
    positions = torch.tensor([[[2, -1], [5, -1]]])
    right = grounding_loss([_attention_on(masks, positions)], positions, masks)
    swapped = grounding_loss([_attention_on(masks.flip(1), positions)], positions, masks)
    nowhere = grounding_loss([torch.full((1, 256, 10), 0.1)], positions, masks)
    assert right.item() < 0.01
    assert swapped.item() > 1.0 and nowhere.item() > 0.3


def test_objects_without_words_or_pixels_are_skipped():
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, 2:8, 2:8] = 1.0
    positions = torch.tensor([[[2, -1], [-1, -1]]])  # the second object has no words (an empty caption)
    attention = _attention_on(masks[:, :1], positions[:, :1])
    assert grounding_loss([attention], positions, masks).item() < 0.01
    assert grounding_loss([attention], torch.full_like(positions, -1), masks).item() == 0.0


def test_recording_attention_leaves_the_unet_output_unchanged():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=8,
    ).eval()
    sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = unet(sample, 10, encoder_hidden_states=context).sample
        record = AttentionRecord()
        unet.set_attn_processor(RecordingAttnProcessor(record))
        with record.capture() as recorded:
            got = unet(sample, 10, encoder_hidden_states=context).sample
    maps = [probabilities for probabilities, _ in recorded]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert maps and all(m.shape[0] == 2 and m.shape[-1] == 7 for m in maps)
    assert all(np.allclose(m.sum(-1).numpy(), 1.0, atol=1e-5) for m in maps)
