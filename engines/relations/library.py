"""Learned relations on disk, beside the subjects: one folder per relation, written atomically.

    <subjects root>/.relations/<name>/lora.safetensors   the LoRA in diffusers' format ("unet.<module>.lora_A.weight"),
                                                          its card (a RelationInfo without the path) in the metadata
                                      relation.json      the same card, readable by people
    <subjects root>/.relations/.work/<name>/             a training's resumable checkpoint (engines/checkpoint.py)

A relation folder appears whole or not at all (built under .tmp-*, renamed into place), so a killed training leaves
no half relation. Exports are single safetensors files: diffusers' format, which `load_lora_weights` reads, or
kohya's (A1111, ComfyUI); both carry the card, so importing either gives the relation back with its template and
boxes. Names are checked with check_relation_name and compared without case: on the file systems of macOS and
Windows "Leaning on" and "leaning on" are one folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engines.atomic import place_folder, remove_folder, sweep, write_error
from engines.relations.lora_checks import check_relation_lora
from engines.relations.presets import Relation
from engines.types import InputError, RelationInfo
from engines.types import check_relation_name as _check_name
from engines.types.checks import finite, require, reserved_name, whole
from engines.types.tables import FAMILIES


def check_relation_name(name: str) -> str:
    """The relation name rule, and no Windows device name (CON, NUL, COM1...): the name is a folder."""
    _check_name(name)
    require(not reserved_name(name), f"relation name {name!r} is a device name on Windows: pick another")
    return name


LORA, CARD, CARD_KEY = "lora.safetensors", "relation.json", "troupe_relation"
FORMATS = ("diffusers", "kohya")


class RelationLibrary:
    def __init__(self, subjects_root: str | Path) -> None:
        self.root = Path(subjects_root).expanduser() / ".relations"

    def folder(self, name: str) -> Path:
        return self.root / check_relation_name(name)

    def work_dir(self, name: str) -> Path:
        return self.root / ".work" / check_relation_name(name)

    def uploads_dir(self, name: str) -> Path:
        """Where the studio writes a relation's examples drawn in the browser (a Space visitor's stay private)."""
        return self.root / ".uploads" / check_relation_name(name)

    def _existing(self, name: str) -> Path | None:
        """The folder of a relation whose name equals `name` up to case."""
        check_relation_name(name)
        if not self.root.is_dir():
            return None
        return next((p for p in self.root.iterdir() if p.name.lower() == name.lower() and p.is_dir()), None)

    def check_free(self, name: str) -> None:
        found = self._existing(name)
        if found is not None:
            raise InputError(f"a relation named '{found.name}' already exists: pick another name, or delete or "
                             "rename the old one")  # fmt: skip

    # ----------------------------------------------------------------- reading
    def list(self) -> list[RelationInfo]:
        if not self.root.is_dir():
            return []
        found = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and not folder.name.startswith("."):
                try:
                    found.append(self._read(folder))
                except InputError:
                    continue  # a damaged folder is skipped, as the subject library does
        return found

    def get(self, name: str) -> RelationInfo:
        folder = self._existing(name)
        if folder is None or folder.name != name:
            known = ", ".join(r.name for r in self.list()) or "none yet"
            raise InputError(f"no learned relation named '{name}' (learned: {known})")
        return self._read(folder)

    def _read(self, folder: Path) -> RelationInfo:
        try:
            card = json.loads((folder / CARD).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise InputError(f"relation folder {folder.name}: {CARD} is unreadable ({error})") from None
        if not (folder / LORA).is_file():
            raise InputError(f"relation folder {folder.name}: {LORA} is missing")
        return card_to_info(card, str(folder / LORA), f"relation folder {folder.name}")

    def presets(self) -> dict[str, Relation]:
        """The learned relations as picker entries: template, boxes, layers and their LoRA."""
        return {info.name: as_relation(info) for info in self.list()}

    # ----------------------------------------------------------------- writing
    def add(self, info: RelationInfo, weights: dict[str, torch.Tensor], overwrite: bool = False) -> RelationInfo:
        if not overwrite:
            self.check_free(info.name)
        card = info_to_card(info)
        state = {f"unet.{key}": value.detach().float().cpu().contiguous() for key, value in weights.items()}
        return self._place(info.name, lambda temp: save_file(state, str(temp / LORA), {CARD_KEY: json.dumps(card)}),
                           card)  # fmt: skip

    def _place(self, name: str, write_lora, card: dict) -> RelationInfo:
        """Build the folder under a temporary name, then rename it into place (replacing an old one): a kill at any
        moment leaves the old relation or the new one (engines/atomic.py)."""
        self.root.mkdir(parents=True, exist_ok=True)
        sweep(self.root)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            write_lora(temp)
            (temp / CARD).write_text(json.dumps(card, indent=1), encoding="utf-8")
            old = self._existing(name)
            if old is not None and old.name != name:  # the same relation in another case: the new name replaces it
                remove_folder(old)
            place_folder(temp, self.folder(name), "relations.add")
        except BaseException as error:
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(error, OSError):  # a full disk: the library is as it was, say so in one line
                raise write_error(f"relation '{name}'", error) from None
            raise
        return self.get(name)

    def rename(self, old: str, new: str) -> RelationInfo:
        info = self.get(old)
        if old.lower() != new.lower():
            self.check_free(new)
        card = {**info_to_card(info), "name": check_relation_name(new)}
        temp = self.root / f".tmp-rename-{os.getpid()}"
        os.rename(self.folder(old), temp)
        (temp / CARD).write_text(json.dumps(card, indent=1), encoding="utf-8")
        os.rename(temp, self.folder(new))
        return self.get(new)

    def delete(self, name: str) -> None:
        self.get(name)
        remove_folder(self.folder(name))  # gone in one step: a kill mid-delete leaves no half relation
        shutil.rmtree(self.work_dir(name), ignore_errors=True)

    def clear_work(self, name: str) -> None:
        shutil.rmtree(self.work_dir(name), ignore_errors=True)

    def export(self, name: str, dest: str | Path, fmt: str = "diffusers") -> Path:
        """One safetensors file in diffusers' or kohya's format, carrying the relation's card."""
        info = self.get(name)
        if fmt not in FORMATS:
            raise InputError(f"unknown LoRA format {fmt!r} (choose from {', '.join(FORMATS)})")
        dest = Path(dest).expanduser()
        if dest.suffix != ".safetensors" or dest.is_dir():
            raise InputError(f"{dest}: export to a .safetensors file")
        state = load_file(info.lora)
        metadata = {CARD_KEY: json.dumps(info_to_card(info))}
        if fmt == "kohya":
            from diffusers.utils import convert_state_dict_to_kohya

            state = convert_state_dict_to_kohya(state)  # adds each module's α (= r: our LoRAs are trained at α = r)
            metadata.update(
                ss_network_dim=str(info.rank), ss_network_alpha=str(info.rank), ss_network_module="networks.lora"
            )
        partial = dest.with_name(dest.name + ".partial")
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(partial), metadata)
            os.replace(partial, dest)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise InputError(f"cannot write {dest}: {error.strerror}") from None
        return dest

    def import_file(self, path: str | Path, name: str | None = None) -> RelationInfo:
        """A relation exported by Troupe (either format); the file is kept as it is, read through diffusers. Its
        card and its weights are checked first (lora_checks.py): what is taken in, a generation can merge."""
        path = Path(path).expanduser()
        try:
            with safe_open(str(path), "pt") as handle:
                keys = list(handle.keys())
                info = _card_of(handle.metadata() or {}, keys, path.name)
                check_relation_lora(handle, keys, info.rank, path.name)
        except (SafetensorError, OSError) as error:
            raise InputError(f"{path.name}: not a readable safetensors file ({error})") from None
        info = dataclasses.replace(info, name=check_relation_name(name or info.name))
        self.check_free(info.name)
        return self._place(info.name, lambda temp: shutil.copyfile(path, temp / LORA), info_to_card(info))


def _card_of(metadata: dict, keys: list[str], where: str) -> RelationInfo:
    if CARD_KEY not in metadata:
        raise InputError(f"{where} is a LoRA, not a Troupe relation (it has no relation card): add it to a "
                         "request's LoRAs instead")  # fmt: skip
    if not any("lora" in k for k in keys):
        raise InputError(f"{where}: holds no LoRA weights")
    try:
        card = json.loads(metadata[CARD_KEY])
    except (json.JSONDecodeError, RecursionError):
        raise InputError(f"{where}: its relation card is not valid JSON") from None
    return card_to_info(card, "", where)


def info_to_card(info: RelationInfo) -> dict:
    card = dataclasses.asdict(info)
    card.pop("lora")
    return card


def card_to_info(card: object, lora: str, where: str) -> RelationInfo:
    fields = [f.name for f in dataclasses.fields(RelationInfo) if f.name != "lora"]
    if not isinstance(card, dict) or set(card) != set(fields):
        raise InputError(f"{where}: its relation card does not have the fields {', '.join(fields)}")
    check_relation_name(card["name"])  # first: the lines below name the relation
    try:
        card = {**card, "boxes": tuple(tuple(float(v) for v in b) for b in card["boxes"]),
                "layers": tuple(card["layers"]), "loss_curve": tuple(card["loss_curve"])}  # fmt: skip
        info = RelationInfo(**card, lora=lora)
        as_relation(info)  # the template, boxes and layers are checked as a preset's are
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: bad relation card ({error})") from None
    _check_card_values(info, where)
    return info


def _check_card_values(info: RelationInfo, where: str) -> None:
    """The card's other fields as training writes them: the library and the UI show them, the rank sizes the LoRA."""
    texts = (info.relation, info.fingerprint, info.created)
    require(all(isinstance(t, str) and len(t) <= 200 for t in texts), f"{where}: relation, fingerprint and created "
            "must be short strings")  # fmt: skip
    require(info.family in FAMILIES, f"{where}: family must be one of {', '.join(FAMILIES)} (got {info.family!r})")
    require(whole(info.rank, 1, 128), f"{where}: rank must be an integer in 1..128 (got {info.rank!r})")
    require(whole(info.steps, 0, 10**6) and whole(info.examples, 0, 10**6), f"{where}: steps and examples must be "
            "whole numbers ≥ 0")  # fmt: skip
    require(finite(info.keypoint_weight) and 0 <= info.keypoint_weight <= 100, f"{where}: keypoint weight must be a "
            "number in 0..100")  # fmt: skip
    require(finite(info.seconds) and 0 <= info.seconds < 1e9, f"{where}: seconds must be a finite number ≥ 0")
    require(all(finite(v) and abs(v) < 1e12 for v in info.loss_curve), f"{where}: the loss curve must hold finite "
            "numbers")  # fmt: skip


def as_relation(info: RelationInfo) -> Relation:
    return Relation(name=info.name, template=info.template, arity=2, boxes=info.boxes, layers=info.layers,
                    kind="interaction", lora=Path(info.lora) if info.lora else None)  # fmt: skip
