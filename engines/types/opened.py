"""What "Open a PNG" gives back: the request read from the image and what of it could not be carried over."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.generation import GenerateRequest

MAKERS = ("Troupe", "A1111", "ComfyUI")  # whose settings a PNG carries (engines/png_import.py reads each)
FILE_KINDS = ("VAE", "embedding")


@dataclass(frozen=True)
class ModelFile:
    """A file beside the checkpoint that an image was made with: a VAE override or a textual inversion."""

    kind: str  # one of FILE_KINDS
    name: str  # the VAE's file name; the embedding's word (its file's stem, as A1111 names it)
    hash: str | None = None  # A1111's short sha256 (10 hex digits for a VAE, 12 for an embedding), when written

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.hash})" if self.hash else "")


@dataclass(frozen=True)
class OpenedImage:
    request: GenerateRequest  # Troupe's own request, or a starting request from another tool's settings
    maker: str  # one of MAKERS
    dropped: tuple[str, ...] = ()  # what the image's settings ask for that a Troupe request cannot (yet) hold
    files: tuple[ModelFile, ...] = ()  # the VAE and embeddings the image was made with
    unloaded: tuple[ModelFile, ...] = ()  # those of `files` that the studio's model does not load now

    @property
    def note(self) -> str:
        """One line for the person ('' when everything was carried over and the same files are loaded)."""
        parts = []
        if self.unloaded:
            made = " and ".join(str(f) for f in self.unloaded)
            flags = " and ".join(f"--{'vae' if k == 'VAE' else 'embedding'}" for k in FILE_KINDS
                                 if any(f.kind == k for f in self.unloaded))  # fmt: skip
            parts.append(f"This PNG was made with {made}, not loaded now: the picture will differ unless the model "
                         f"is loaded with {flags}")  # fmt: skip
        if self.dropped:
            parts.append(f"Not carried over from the {self.maker} settings: " + "; ".join(self.dropped))
        return ". ".join(parts)
