"""Tiny random Stable Diffusion 1.5- and SDXL-architecture pipelines, built in code (no network, no weights).

Each component is seeded just before it is built (as diffusers' own tests do), so adding one does not shift the
weights of the others. The tokenizer comes from the vocab kept in tests/fixtures/tiny_tokenizer: whole tokens for
common prompt words, single characters for everything else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny_tokenizer"
TEXT_WIDTH = 32


def tiny_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        sample_size=64,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd15() -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl() -> StableDiffusionXLPipeline:
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
        cross_attention_dim=2 * TEXT_WIDTH,
        norm_num_groups=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer))
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def save_tiny(kind: str, folder: Path) -> Path:
    """Write a tiny pipeline as a local diffusers folder (what a person passes as --model PATH)."""
    pipe = {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[kind]()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def subject_photos(folder: Path, stem: str, count: int = 3) -> list[str]:
    """A few photos of one "subject" (a red disc on grass, slightly different each time) as PNG paths."""
    paths = []
    for i in range(count):
        image = Image.new("RGB", (96, 96), (110, 170, 90))
        ImageDraw.Draw(image).ellipse((18 + 3 * i, 20, 78 - 3 * i, 78), fill=(215, 40, 40))
        paths.append(str(folder / f"{stem}{i}.png"))
        image.save(paths[-1])
    return paths
