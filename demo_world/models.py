"""The demo model's architecture: Stable Diffusion's three parts at a tiny size, and the folder they ship in.

The parts are the diffusers / transformers classes of SD 1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel),
so everything Troupe does to a real model (attention processors, residuals, layout guidance) runs on this one
unchanged. Why each size was chosen is in docs/demo-model.md.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from .scenes import SIZE

TEXT_HIDDEN = 128  # width of the text encoder, hence the UNet's cross-attention width
SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)  # SD 1.5's noise schedule


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        latent_channels=4,  # wide enough to keep stripes
        norm_num_groups=8,
        sample_size=SIZE,
        scaling_factor=1.0,  # the real factor is measured after training
        mid_block_add_attention=False,  # fully convolutional: trains on crops
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,  # diffusers' name for the number of heads in SD1.x-style UNets
        norm_num_groups=16,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPTextModel(cfg)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def export_pipeline(out: Path, vae_folder: Path, unet, text_encoder, tokenizer) -> None:
    """Write a diffusers StableDiffusionPipeline folder (fp16 safetensors, loads as fp32), replacing `out` whole."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    half = lambda m: copy.deepcopy(m).to("cpu", torch.float16)  # noqa: E731
    pipe = StableDiffusionPipeline(
        vae=half(AutoencoderKL.from_pretrained(vae_folder)),
        text_encoder=half(text_encoder),
        tokenizer=tokenizer,
        unet=half(unet),
        scheduler=DDIMScheduler(**SCHEDULER_KW),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    # transformers records the storage dtype; ask for fp32 at load time (CPU half is slow / unsupported)
    cfg_path = tmp / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k in ("torch_dtype", "dtype"):
        if k in cfg:
            cfg[k] = "float32"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    readme = out / "README.md"
    if readme.exists():  # the model card is written by hand; keep it
        (tmp / "README.md").write_text(readme.read_text())
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out)
