"""What the UNet is conditioned on during registration (papers/cones2.txt Eq. 2 and Eq. 6).

"Output of the encoder" is exactly what the diffusers pipeline feeds the UNet: `last_hidden_state` (after the final
layer norm) for SD 1.5 / 2.x / demo, and `hidden_states[-2]` (penultimate layer, no final norm) of both encoders for
SDXL, concatenated along the feature axis (encoder 1 first). Δ is measured and added on these outputs, so training,
Eq. 5 and generation all read the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.register.bank import TokenizedBank


def encoder_output(
    encoder: torch.nn.Module, ids: torch.Tensor, xl: bool, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exactly what the pipeline feeds the UNet from one encoder: (B, 77, width)."""
    mask = attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
    if xl:
        return encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]  # penultimate, no norm
    return encoder(ids, attention_mask=mask)[0]  # last_hidden_state, after the final layer norm


def unet_condition(encoders: list[torch.nn.Module], ids: list[torch.Tensor], xl: bool) -> torch.Tensor:
    """(B, 77, Σ widths): the encoders' outputs concatenated along features (encoder 1 first), as in SDXL."""
    return torch.cat([encoder_output(e, i, xl) for e, i in zip(encoders, ids)], dim=-1)


def class_rows(
    encoders, bank: TokenizedBank, n_class: tuple[int, ...], device: torch.device, xl: bool
) -> list[torch.Tensor]:
    """Per encoder (N, n_cls, width): fp32 outputs at the class tokens, the terms of Eq. 5's mean (no autocast: Δ is
    stored in fp32)."""
    rows: list[list[torch.Tensor]] = [[] for _ in encoders]
    for i in range(0, len(bank.sentences), 64):
        for k, encoder in enumerate(encoders):
            out = encoder_output(encoder, bank.ids[k][i : i + 64].to(device), xl).float()  # (b, L, W)
            pos = bank.class_pos[k][i : i + 64].to(device)  # (b,)
            index = pos[:, None] + torch.arange(n_class[k], device=device)[None]  # (b, n_cls)
            rows[k].append(torch.gather(out, 1, index[..., None].expand(-1, -1, out.shape[-1])))  # (b, n_cls, W)
    return [torch.cat(r) for r in rows]


def sdxl_added_condition(
    encoders, prompt_ids: tuple[torch.Tensor, ...], size: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """SDXL's pooled text embedding (from the frozen encoder 2: Δ never touches it) and size time ids."""
    pooled = encoders[1](prompt_ids[1], output_hidden_states=True)[0].float()  # (1, proj)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)  # (1, 6)
    return {"text_embeds": pooled, "time_ids": time_ids}


@dataclass(frozen=True)
class SplicedCondition:
    """The UNet condition for L_sub, built the way generation builds it (Eq. 6): the frozen encoder's outputs of the
    training prompt, with only the class-word positions taken from the encoder being tuned.

    Eq. 2 read literally feeds the tuned encoder's whole output, which lets the photos' look settle in the BOS, EOS
    and padding outputs of "a photo of {class}". Δ (Eq. 5) keeps only the class-word shift, so that part of the
    subject would be lost at generation. Splicing is the public code's pinning of the instance prompt's BOS/EOS
    outputs taken to its limit: the denoising loss can only be lowered where Δ will carry the subject. What this
    changed on the demo world is in docs/registration.md."""

    frozen: torch.Tensor  # (1, L, D) fp32
    is_class: torch.Tensor  # (1, L) bool

    def __call__(self, tuned: torch.Tensor) -> torch.Tensor:
        """(1, L, D) tuned outputs of the training prompt → (1, L, D), in the tuned outputs' dtype."""
        return torch.where(self.is_class[..., None], tuned, self.frozen.to(tuned.dtype))
