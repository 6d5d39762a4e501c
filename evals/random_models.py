"""Full-size SD 1.5 / SDXL architectures with random weights, for timing on machines that cannot download models.

The configs are the published ones, written out here; nothing is downloaded. Speed and memory depend on the
shapes, not on the weights, so these stand in for the real models in the benchmarks.
"""

from __future__ import annotations

import torch

from engines.models import DEMO_MODEL_DIR, ModelBundle, text_encoder_fingerprint
from engines.types import ModelSpec

CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
OPENCLIP_BIG_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    vocab_size=49408,
    max_position_embeddings=77,
    projection_dim=1280,
    hidden_act="gelu",
)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    clip_sample=False,
)
VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
)
UNETS = {
    "sd15": dict(
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        attention_head_dim=8,
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ),
    "sdxl": dict(
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        cross_attention_dim=2048,
    ),
}
NATIVE = {"sd15": 512, "sdxl": 1024}


def random_pipeline(arch: str, device: torch.device, dtype: torch.dtype, resolution: int | None = None):
    """The pipeline of `arch` ("sd15" or "sdxl") with seeded random weights, on `device` in `dtype`."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(DEMO_MODEL_DIR / "tokenizer")  # a small vocab: its ids fit any CLIP table
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(sample_size=(resolution or NATIVE[arch]) // 8, **UNETS[arch])
        parts = dict(
            unet=unet,
            scheduler=DDPMScheduler(**SCHEDULER),
            tokenizer=tokenizer,
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        )
        if arch == "sd15":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(sample_size=512, **VAE),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                **parts,
            )
        else:
            vae = AutoencoderKL(sample_size=1024, scaling_factor=0.13025, force_upcast=True, **VAE)
            second = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIG_G))
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder_2=second, tokenizer_2=tokenizer, **parts)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_bundle(arch: str, device: torch.device, resolution: int | None = None) -> ModelBundle:
    """A ModelBundle around `random_pipeline`: fp16 on CUDA, fp32 on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = random_pipeline(arch, device, dtype, resolution)
    return ModelBundle(pipe, ModelSpec(f"random-{arch}"), arch, device, dtype, text_encoder_fingerprint(pipe))
