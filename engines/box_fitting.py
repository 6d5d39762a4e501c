"""Box fitting: backward layout guidance (Chen, Laina & Vedaldi, "Training-free layout control with cross-attention
guidance", WACV 2024) on top of the forward guidance of kernels/region_attention.py.

Forward guidance decides which cells may read a region's words, but not how large the model draws the object. Box
fitting moves the latent itself: before each early denoising step it takes a few gradient steps on an energy over the
cross-attention probabilities A, read without the bias (the model attends to an object's words where it draws it):

    E(z_t) = mean over layers of Σ_r (1 − Σ_u w_{u,r} A_{u,r} / Σ_u A_{u,r})²        (their loss, by area)
    z_t ← z_t − s · (1 − ᾱ_t) · ∇_{z_t} E                                             (their update)
    z_t ← z_t · ‖z_t⁰‖ / ‖z_t‖, per image, after the step's iterations                  (ours)

A_{u,r} is the attention of cell u to r's tokens, averaged over heads and tokens. w_{u,r} = v_{u,r} / max_u v_{u,r},
with v_{u,r} the exact fraction of cell u where r's box is the front-most one (engines/layout.py): a cell the box
half covers counts half, which is where the model draws an object's rim, and dividing by the best-covered cell lets
E reach 0 at every resolution, as theirs can. The public code scales the step by σ_t² on k-diffusion latents, which
are √(1 + σ_t²) times the UNet's input; on the UNet's input that is σ_t² / (1 + σ_t²) = 1 − ᾱ_t. Unlike the public
code, every fitted step runs all its iterations (no early stop at E < 0.2: that threshold belongs to its own
normalisation of E). The rescale keeps the latent at the norm of a latent at this noise level: the update may move
objects, not add noise the UNet has never seen. Why each of these choices, with the numbers: docs/layout.md.

Cost: one UNet forward and backward on the conditional rows per iteration, with the attention maps materialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engines.layout import sigma_at
from engines.types import GuidanceConfig
from kernels.attention_record import inside_energy
from kernels.maps import ResolutionMaps
from kernels.region_attention import GuidanceState


def layout_energy(
    recorded: Sequence[tuple[torch.Tensor, ResolutionMaps]], region_positions: Sequence[Sequence[int]]
) -> torch.Tensor:
    """E summed over the images of the batch. recorded: per cross-attention layer, (probabilities (B, N, T), maps)."""
    terms = []
    for probabilities, maps in recorded:
        weight = maps.fit_weights.to(probabilities.device)  # (R, N): w, computed once per request
        for index, positions in enumerate(region_positions):
            attention = probabilities[:, :, list(positions)].mean(dim=-1)  # (B, N)
            terms.append(inside_energy(attention, weight[index]).sum())
    return torch.stack(terms).sum() / len(recorded)


@dataclass(frozen=True)
class BoxFitter:
    """Refits the pipeline's latent between steps; the generator calls it from its step callback."""

    unet: Any
    guidance: GuidanceState  # the installed region processors record into its AttentionRecord
    region_positions: tuple[tuple[int, ...], ...]
    config: GuidanceConfig

    def wants(self, scheduler, timestep: float) -> bool:
        return float(timestep) >= (1 - self.config.fit_fraction) * scheduler.config.num_train_timesteps

    def __call__(self, scheduler, latents: torch.Tensor, timestep, conditioning: dict) -> torch.Tensor:
        """The latent the step at `timestep` should start from. conditioning: the UNet's keyword arguments for the
        conditional rows (encoder_hidden_states, and SDXL's added_cond_kwargs)."""
        sigma = sigma_at(scheduler.alphas_cumprod.cpu(), float(timestep))
        step = self.config.fit_scale * sigma**2 / (1 + sigma**2)  # s · (1 − ᾱ_t)
        # The UNet sees a fixed multiple of the latent: 1 for DDIM, 1/√(1 + σ²) for Euler-type schedulers.
        factor = float(scheduler.scale_model_input(torch.ones(1, device=latents.device), timestep)[0])
        model_input = latents * factor
        for _ in range(self.config.fit_iterations):
            with torch.enable_grad():
                model_input = model_input.detach().requires_grad_(True)
                with self.guidance.record.capture() as recorded:
                    self._attend(model_input, timestep, conditioning)
                energy = layout_energy(recorded, self.region_positions)
                (gradient,) = torch.autograd.grad(energy, model_input)
            model_input = model_input.detach() - step * gradient
        return with_norm_of(latents, model_input / factor).to(latents.dtype)

    def _attend(self, model_input: torch.Tensor, timestep, conditioning: dict) -> None:
        """Run the UNet as far as the energy reads: to its end (depth "full"), up to its middle block ("coarse"), to
        the last down block with cross-attention ("down"), or by the number of regions ("crowd"). Objects are placed
        and sized on the way down; what follows the last layer read is neither run forward nor backward."""
        last = _last_layer_read(self.unet, self.config.fit_depth, len(self.region_positions))
        if last is None:
            self.unet(model_input, timestep, **conditioning)
            return
        hook = last.register_forward_hook(self._stop_forward)
        try:
            self.unet(model_input, timestep, **conditioning)
        except _StopForward:
            pass
        finally:
            hook.remove()

    def _stop_forward(self, *_) -> None:
        """Not while the guidance is suspended: the reference pass (engines/references.py) runs its own UNet forward
        from inside this one's pre-hook, through the same blocks, and must run to its end."""
        if not self.guidance.suspended:
            raise _StopForward()


def _last_layer_read(unet, depth: str, regions: int):
    """The UNet block after which box fitting's forward may stop (None: it runs to the end). "crowd": the down blocks
    for one or two regions, the middle block too for more — on the demo bench it kept crowded layouts' shapes."""
    if depth == "crowd":
        depth = "down" if regions <= 2 else "coarse"
    if depth == "coarse":
        return unet.mid_block
    if depth == "down":
        return [block for block in unet.down_blocks if getattr(block, "has_cross_attention", False)][-1]
    return None


class _StopForward(Exception):
    """Raised after the last UNet block that box fitting reads, so the rest of the forward never runs."""


def with_norm_of(reference: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """`latents` (B, C, h, w) rescaled, image by image, to the norm of `reference`."""
    dims = tuple(range(1, reference.dim()))
    norms = torch.linalg.vector_norm(latents.float(), dim=dims, keepdim=True).clamp(min=1e-12)  # (B, 1, 1, 1)
    return latents.float() * (torch.linalg.vector_norm(reference.float(), dim=dims, keepdim=True) / norms)
