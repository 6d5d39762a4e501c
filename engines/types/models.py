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

    def __post_init__(self) -> None:
        require(bool(self.source.strip()), "the model source is empty")
        adapter = self.reference_adapter
        require(
            adapter in ("auto", "none") or str(adapter).endswith(".safetensors"),
            f"reference adapter must be auto, none or a .safetensors file (got {adapter!r})",
        )
        for name, allowed in (
            ("family", FAMILIES + (None,)),
            ("dtype", DTYPES),
            ("quantization", QUANTIZATIONS),
            ("offload", OFFLOADS),
        ):
            value = getattr(self, name)
            require(value in allowed, f"unknown {name} '{value}' ({', '.join(a for a in allowed if a)})")
