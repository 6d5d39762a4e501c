"""What "Open a PNG" gives back: the request read from the image and what of it could not be carried over."""

from __future__ import annotations

from dataclasses import dataclass

from engines.types.generation import GenerateRequest

MAKERS = ("Troupe", "A1111", "ComfyUI")  # whose settings a PNG carries (engines/png_import.py reads each)


@dataclass(frozen=True)
class OpenedImage:
    request: GenerateRequest  # Troupe's own request, or a starting request from another tool's settings
    maker: str  # one of MAKERS
    dropped: tuple[str, ...] = ()  # what the image's settings ask for that a Troupe request cannot (yet) hold

    @property
    def note(self) -> str:
        """One line for the person ('' when everything was carried over)."""
        if not self.dropped:
            return ""
        return f"Not carried over from the {self.maker} settings: " + "; ".join(self.dropped)
