"""Test scaffolding: a diffusers SD 1.5 / SDXL pipeline's weights in the original single-file (ldm) key layout, as
A1111 and ComfyUI save checkpoints. It is the inverse of diffusers' single-file converters
(diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), written from their key rules and checked by round trip:
tests/engines/test_model_sources.py loads the file back with diffusers and compares every weight.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET = "model.diffusion_model."
VAE = "first_stage_model."
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))  # fmt: skip
VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)
OPEN_CLIP = (("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
             ("layer_norm2", "ln_2"), (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn.", ".attn."))  # fmt: skip


def ldm_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """Every weight of the pipeline under its original key (UNet, VAE and text encoders in one file)."""
    out = {UNET + _unet_key(k, pipe.unet.config): v for k, v in pipe.unet.state_dict().items()}
    out |= {VAE + k: v for k, v in ldm_vae(pipe.vae).items()}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out |= _clip(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        out |= _open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    else:
        out |= _clip(pipe.text_encoder, "cond_stage_model.transformer.")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def _resnet(rest: str) -> str:
    for new, old in RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _unet_key(key: str, config) -> str:
    flat = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"], **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}
    if key in flat:
        return flat[key]
    per = config.layers_per_block + 1  # ldm numbers every layer of every block in one sequence
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks.{per * block + j + 1}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks.{per * block + j}." + ("0." + _resnet(rest) if kind == "resnets" else "1." + rest)
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        slot = 2 if config.up_block_types[block].startswith("CrossAttn") else 1  # after the attention, if any
        return f"output_blocks.{per * block + per - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no ldm key for UNet weight {key}")


def ldm_vae(vae) -> dict[str, torch.Tensor]:
    """The VAE alone in the original layout without a prefix: what A1111's VAE files hold."""
    flat = DIFFUSERS_TO_LDM_MAPPING["vae"]
    ups = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        if key in flat:
            out[flat[key]] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"] = value
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
            rest = next((old + m[2][len(new) :] for new, old in VAE_ATTENTION if m[2].startswith(new)), m[2])
            conv = value[:, :, None, None] if value.dim() == 2 and not rest.startswith("norm.") else value  # 1×1 conv
            out[f"{m[1]}.mid.attn_1.{rest}"] = conv
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            rest = m[3].replace("conv_shortcut", "nin_shortcut")
            out[f"decoder.up.{ups - 1 - int(m[1])}.block.{m[2]}.{rest}"] = value
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            out[f"decoder.up.{ups - 1 - int(m[1])}.upsample.conv.{m[2]}"] = value
        else:
            raise KeyError(f"no ldm key for VAE weight {key}")
    return out


def _clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenAI CLIP in the original checkpoints keeps transformers' own names under `text_model.`."""
    return {
        prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in encoder.state_dict().items()
    }


def _open_clip(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's names: fused q/k/v (`in_proj`), resblocks, and the projection as a matrix applied as x @ P."""
    state = {("" if k.startswith(("text_model.", "text_projection")) else "text_model.") + k: v
             for k, v in encoder.state_dict().items()}  # fmt: skip
    flat = {v: k for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    out = {}
    for ldm, diffusers in flat.items():
        if diffusers in state:
            value = state.pop(diffusers)
            out[prefix + ldm] = value.T if ldm == "text_projection" else value
    for layer in range(encoder.config.num_hidden_layers):
        attn = f"text_model.encoder.layers.{layer}.self_attn."
        for part in ("weight", "bias"):
            fused = [state.pop(f"{attn}{p}_proj.{part}") for p in "qkv"]
            out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{part}"] = torch.cat(fused)
    for key, value in state.items():
        for new, old in OPEN_CLIP:
            key = key.replace(new, old)
        out[prefix + key] = value
    return out
