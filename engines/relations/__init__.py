"""Relations (DreamRelation): presets the picker fills, and relations learned from a few example images.

    presets.py        the prompt template, default boxes and layers of each relation (torch-free; the UI reads it)
    examples.py       a folder of examples (relation.json + images) read and validated, masks and keypoints filled in
    keypoint_loss.py  the keypoint matching loss (DreamRelation Eq. 5–7) and the cross-attention loss
    training.py       the relation LoRA on the UNet's cross-attention, trained from the examples, resumable
    library.py        learned relations on disk: list, rename, delete, export (diffusers / kohya), import

This package's own import stays torch-free, like presets.py: the modules that need torch are imported by name.
"""

from engines.relations.presets import (
    DEFAULT_PATH,
    KINDS,
    SLOTS,
    Relation,
    apply_relation,
    get_relation,
    load_relations,
    parse_relations,
)

__all__ = [
    "DEFAULT_PATH",
    "KINDS",
    "SLOTS",
    "Relation",
    "apply_relation",
    "get_relation",
    "load_relations",
    "parse_relations",
]
