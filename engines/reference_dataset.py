"""A synthetic customization dataset (SynCD §3): several images of the same object, each with its foreground mask.

On disk, one folder:

    dataset.json            {"format": "troupe-reference-dataset", "version": 1, "source": ..., "size": 64,
                             "objects": [{"class_word": "ball", "images": [...], "masks": [...], "captions": [...]}]}
    000000/0.png 0_mask.png 1.png 1_mask.png ...

Images are RGB at the model's native size; masks are L (255 = the object). A caption names the object by its class
word only ("a ball next to a red box on grass"): the adapter must learn to take the object's look from the other
images, not from the words. The index is rewritten after every object (atomically), so a run that stops keeps
everything it finished and continues from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from engines.types import InputError

INDEX = "dataset.json"
FORMAT = "troupe-reference-dataset"
VERSION = 1


@dataclass(frozen=True)
class DatasetObject:
    class_word: str
    images: tuple[str, ...]  # paths relative to the dataset folder
    masks: tuple[str, ...]
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceDataset:
    root: Path
    source: str  # what made it: "demo world", or the model it was generated with
    size: int  # the images' side in pixels
    objects: tuple[DatasetObject, ...]

    def image(self, index: int, view: int) -> tuple[Image.Image, Image.Image]:
        """The view's image (RGB) and mask (L)."""
        item = self.objects[index]
        return Image.open(self.root / item.images[view]).convert("RGB"), Image.open(
            self.root / item.masks[view]
        ).convert("L")


def load_dataset(root: str | Path) -> ReferenceDataset:
    """Read a dataset folder; a missing or foreign index is a clear error."""
    root = Path(root)
    index = root / INDEX
    if not index.is_file():
        raise InputError(f"{root} is not a reference dataset: {INDEX} is missing (make one with `references dataset`)")
    data = json.loads(index.read_text())
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise InputError(f"{index} is not a version-{VERSION} {FORMAT} index")
    objects = tuple(
        DatasetObject(o["class_word"], tuple(o["images"]), tuple(o["masks"]), tuple(o["captions"]))
        for o in data["objects"]
    )
    if any(len(o.images) < 2 or len(o.images) != len(o.masks) or len(o.images) != len(o.captions) for o in objects):
        raise InputError(f"{index}: every object needs at least two images, each with a mask and a caption")
    return ReferenceDataset(root, data["source"], int(data["size"]), objects)


class DatasetWriter:
    """Appends objects to a dataset folder, resuming one that a previous run started with the same source."""

    def __init__(self, root: str | Path, source: str, size: int) -> None:
        self.root, self.source, self.size = Path(root), source, size
        self.objects: list[DatasetObject] = []
        if (self.root / INDEX).is_file():
            existing = load_dataset(self.root)
            if (existing.source, existing.size) != (source, size):
                raise InputError(f"{self.root} holds a dataset of {existing.source} at {existing.size} px: "
                                 "choose another folder")  # fmt: skip
            self.objects = list(existing.objects)

    def __len__(self) -> int:
        return len(self.objects)

    def add(self, class_word: str, images: Sequence[Image.Image], masks: Sequence[Image.Image],
            captions: Sequence[str]) -> None:  # fmt: skip
        folder = f"{len(self.objects):06d}"
        (self.root / folder).mkdir(parents=True, exist_ok=True)
        names, mask_names = [], []
        for view, (image, mask) in enumerate(zip(images, masks)):
            names.append(f"{folder}/{view}.png")
            mask_names.append(f"{folder}/{view}_mask.png")
            image.convert("RGB").save(self.root / names[-1])
            mask.convert("L").save(self.root / mask_names[-1])
        self.objects.append(DatasetObject(class_word, tuple(names), tuple(mask_names), tuple(captions)))
        self._write_index()

    def _write_index(self) -> None:
        data = {"format": FORMAT, "version": VERSION, "source": self.source, "size": self.size,
                "objects": [o.__dict__ for o in self.objects]}  # fmt: skip
        partial = self.root / (INDEX + ".partial")
        partial.write_text(json.dumps(data, indent=1))
        os.replace(partial, self.root / INDEX)
