"""Which model to load and how."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.checks import require
from engines.types.tables import DTYPES, FAMILIES, OFFLOADS, QUANTIZATIONS


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how. `source` is 'demo', a Hub id, a local diffusers folder or a .safetensors file."""

    source: str = "demo"
    family: str | None = None  # None: detected from the model's config
    dtype: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    quantization: str = "none"
    offload: str = "none"
    device: str = "auto"
    reference_adapter: str = "auto"  # a .safetensors LoRA for reference attention; auto: the demo model's own; none
    vae: str | None = None  # a diffusers VAE folder or a .safetensors VAE in place of the model's own
    embeddings: tuple[str, ...] = ()  # textual-inversion .safetensors files (engines/embeddings.py)
    compile: bool = False  # torch.compile the UNet for generation (engines/compiled_unet.py)

    def __post_init__(self) -> None:
        require(bool(self.source.strip()), "the model source is empty")
        adapter = self.reference_adapter
        require(
            adapter in ("auto", "none") or str(adapter).endswith(".safetensors"),
            f"reference adapter must be auto, none or a .safetensors file (got {adapter!r})",
        )
        require(self.vae is None or (isinstance(self.vae, str) and bool(self.vae.strip())), "the VAE path is empty")
        require(
            isinstance(self.embeddings, tuple) and all(isinstance(e, str) and e.strip() for e in self.embeddings),
            f"embeddings must be a tuple of file paths (got {self.embeddings!r})",
        )
        require(type(self.compile) is bool, f"compile must be true or false (got {self.compile!r})")
        for name, allowed in (
            ("family", FAMILIES + (None,)),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("offload", OFFLOADS),
        ):
            value = getattr(self, name)
            require(value in allowed, f"unknown {name} '{value}' ({', '.join(a for a in allowed if a)})")
