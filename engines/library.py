"""The subject library on disk: one folder per registered subject, written atomically.

    <root>/<name>/residuals.safetensors   Δ per text encoder, float32 (n_class_tokens, width) — Cones 2 Eq. 5
                  subject.json            name, class word, family, fingerprint, steps, loss curve, created, version
                  photo_00.png, mask_00.png ...   the cropped photos and their foreground masks
                  thumbnail.png
    <root>/.work/<name>/                  resumable registration checkpoints (engines/register/)
    <root>/.tmp-*/ .old-*/ .trash-*/      transient: a subject is built under .tmp-* and renamed into place (engines/atomic.py)
    <root>/.broken/                       entries `subjects check --repair` moved aside (never deleted)

Names are validated with check_subject_name (so a name can never leave the root) and compared without case: on the
file systems of macOS and Windows `stripy` and `Stripy` are one folder, so the second is refused as a duplicate. In
prompts a name is exact (`<Stripy>` is not `<stripy>`; the error says which one was meant). subject.json is validated
on load: unknown keys or bad values are a clear error; `list()` skips (with a warning) a folder that fails validation,
and `python -m studio subjects check` reports it (engines/library_check.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from engines.atomic import place_folder, remove_folder, sweep, write_error
from engines.faults import fault_point
from engines.subject_files import (
    EXPORT_KEY,
    FORMAT_VERSION,
    META,
    RESIDUALS,
    THUMBNAIL,
    THUMBNAIL_SIDE,
    check_residuals,
    downsample_curve,
    export_path,
    image_tensors,
    pack_export,
    photo_loss,
    read_export,
    validate_meta,
)
from engines.types import InputError, SubjectInfo, check_subject_name

log = logging.getLogger(__name__)


def default_library_dir() -> Path:
    """$TROUPE_LIBRARY, else ~/.troupe/library."""
    return Path(os.environ.get("TROUPE_LIBRARY") or "~/.troupe/library").expanduser()


class SubjectLibrary:
    """The subjects registered on this machine (or Space), one folder each under `root`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root).expanduser() if root is not None else default_library_dir()
        self._swept = False  # the first listing finishes what a killed process left (engines/atomic.py)

    # ----------------------------------------------------------------- paths
    def folder(self, name: str) -> Path:
        return self.root / check_subject_name(name)

    def work_dir(self, name: str) -> Path:
        """Where engines/register/ keeps the resumable checkpoint of a registration in progress."""
        return self.root / ".work" / check_subject_name(name)

    def existing(self, name: str) -> Path | None:
        """The subject folder whose name equals `name` up to case, if there is one."""
        check_subject_name(name)
        if not self.root.is_dir():
            return None
        wanted = name.lower()
        return next((p for p in self.root.iterdir() if p.name.lower() == wanted and not p.name.startswith(".")), None)

    def check_free(self, name: str) -> None:
        """The one check that a new subject does not take an existing subject's name (in any case)."""
        found = self.existing(name)
        if found is not None:
            same = "" if found.name == name else " (names are compared without case)"
            raise InputError(
                f"a subject named '{found.name}' already exists{same}: pick another name, or delete or rename the old one"
            )

    def clear_work(self, name: str) -> None:
        shutil.rmtree(self.work_dir(name), ignore_errors=True)

    # ----------------------------------------------------------------- reading
    def _read_meta(self, folder: Path) -> dict[str, Any]:
        where = f"subject folder {folder.name}"
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{where}: {META} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise InputError(f"{where}: {META} is not valid JSON ({type(error).__name__})") from None
        except OSError as error:  # a folder or a fifo named subject.json, no permission...
            raise InputError(f"{where}: {META} is unreadable ({error.strerror})") from None
        meta = validate_meta(meta, where, strict=False)
        if meta["name"] != folder.name:
            raise InputError(f"{where}: {META} names '{meta['name']}'")
        if meta.get("residual", True) and not (folder / RESIDUALS).is_file():
            raise InputError(f"{where}: {RESIDUALS} is missing")
        return meta

    def _info(self, folder: Path, meta: dict[str, Any]) -> SubjectInfo:
        thumbnail = folder / THUMBNAIL
        return SubjectInfo(
            name=meta["name"],
            class_word=meta["class_word"],
            family=meta["family"],
            fingerprint=meta["fingerprint"],
            created=meta["created"],
            steps=meta["steps"],
            loss_curve=tuple(float(v) for v in meta.get("loss_curve", [])),
            thumbnail=str(thumbnail) if thumbnail.is_file() else None,
            photos=tuple(str(folder / p) for p in meta.get("photos", [])),
            photo_loss=photo_loss(meta.get("stats", {})),
            has_residual=meta.get("residual", True),
        )

    def list(self) -> list[SubjectInfo]:
        if not self.root.is_dir():
            return []
        if not self._swept:
            self._swept = True
            sweep(self.root)
        subjects = []
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                check_subject_name(folder.name)
                if folder.is_symlink():  # a subject's files never live outside the library
                    raise InputError("a symbolic link, not a subject folder")
                subjects.append(self._info(folder, self._read_meta(folder)))
            except InputError as error:
                log.warning("skipping subject folder %s: %s (python -m studio subjects check)", folder, error)
        return sorted(subjects, key=lambda s: s.name)

    def names(self) -> list[str]:
        return [s.name for s in self.list()]

    def get(self, name: str) -> SubjectInfo:
        folder = self.existing(name)
        if folder is not None and folder.name != name:
            raise InputError(f"no subject named '{name}': did you mean '{folder.name}'? (names are exact)")
        if folder is None or not folder.is_dir():
            registered = ", ".join(self.names()) or "none"
            raise InputError(f"no subject named '{name}' (registered: {registered})")
        return self._info(folder, self._read_meta(folder))

    def meta(self, name: str) -> dict[str, Any]:
        """The validated subject.json of a subject (with training stats)."""
        self.get(name)
        return self._read_meta(self.folder(name))

    def residuals(self, name: str) -> dict[str, torch.Tensor]:
        """Δ per text encoder ('text_encoder', and 'text_encoder_2' for SDXL): float32 (n_class_tokens, width)."""
        if not self.get(name).has_residual:
            raise InputError(f"subject '{name}' is an instant subject: it has photos, not a trained residual")
        return self.read_residuals(self.folder(name))

    @staticmethod
    def read_residuals(folder: Path) -> dict[str, torch.Tensor]:
        """The checked residuals file of the subject folder `folder` (its name unchecked)."""
        name, path = folder.name, folder / RESIDUALS
        try:
            with safe_open(str(path), framework="pt") as file:
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error types
            raise InputError(f"subject '{name}': {RESIDUALS} is unreadable ({error})") from error
        return check_residuals(tensors, f"subject '{name}'")

    def reference_photos(self, name: str) -> list[tuple[Image.Image, Image.Image]]:
        """The subject's (photo, foreground mask) pairs whose files are still there, loaded (RGB, L)."""
        meta, folder = self.meta(name), self.folder(name)
        pairs = []
        for photo, mask in zip(meta.get("photos", []), meta.get("masks", [])):
            if (folder / photo).is_file() and (folder / mask).is_file():
                with Image.open(folder / photo) as image, Image.open(folder / mask) as alpha:
                    pairs.append((image.convert("RGB"), alpha.convert("L")))
        return pairs

    def check_compatible(self, name: str, family: str, fingerprint: str) -> None:
        """A residual only means something to the text encoder it was trained against (photos fit any model)."""
        info = self.get(name)
        if not info.has_residual:
            return
        if info.family != family:
            raise InputError(
                f"subject '{name}' was trained on a {info.family} model; the loaded model is {family}: "
                f"register it again with this model"
            )
        if info.fingerprint != fingerprint:
            raise InputError(
                f"subject '{name}' was trained on a different {info.family} model (text encoder "
                f"{info.fingerprint}, loaded {fingerprint}): register it again with this model"
            )

    # ----------------------------------------------------------------- writing
    def add(
        self,
        info: SubjectInfo,
        residuals: dict[str, torch.Tensor] | None,
        photos: list[Image.Image],
        masks: list[Image.Image],
        overwrite: bool = False,
        stats: dict[str, Any] | None = None,
    ) -> SubjectInfo:
        """Build the whole subject folder under a temporary name inside root, then rename it into place. Without
        residuals (an instant subject) the photos are all it has."""
        name = check_subject_name(info.name)
        if residuals is not None:
            residuals = check_residuals(residuals, f"subject '{name}'")
        if len(photos) != len(masks):
            raise InputError(f"subject '{name}': {len(photos)} photos but {len(masks)} masks")
        target = self.root / name
        if not overwrite:
            self.check_free(name)
        elif (found := self.existing(name)) is not None and found.name != name:
            raise InputError(f"'{name}' would replace '{found.name}' (names are compared without case): rename it")
        meta = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "class_word": info.class_word,
            "family": info.family,
            "fingerprint": info.fingerprint,
            "created": info.created or datetime.now(timezone.utc).isoformat(),
            "steps": int(info.steps),
            "loss_curve": downsample_curve(info.loss_curve),
            "photos": [f"photo_{i:02d}.png" for i in range(len(photos))],
            "masks": [f"mask_{i:02d}.png" for i in range(len(masks))],
            "stats": dict(stats or {}),
            "residual": residuals is not None,
        }
        validate_meta(meta, f"subject '{name}'")
        self.root.mkdir(parents=True, exist_ok=True)
        sweep(self.root)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.root))
        try:
            if residuals is not None:
                save_file(residuals, str(temp / RESIDUALS))
            for file_name, image in zip(meta["photos"], photos):
                image.convert("RGB").save(temp / file_name)
            fault_point("library.add.writing")  # part of the files written
            for file_name, image in zip(meta["masks"], masks):
                image.convert("L").save(temp / file_name)
            if photos:
                thumb = photos[0].convert("RGB").copy()
                thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                thumb.save(temp / THUMBNAIL)
            (temp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            place_folder(temp, target, "library.add")
        except BaseException as error:
            shutil.rmtree(temp, ignore_errors=True)
            if isinstance(error, OSError):  # a full disk: the library is as it was, say so in one line
                raise write_error(f"subject '{name}'", error) from None
            raise
        return self.get(name)

    def rename(self, old: str, new: str) -> SubjectInfo:
        self.get(old)
        check_subject_name(new)
        if old == new:
            return self.get(old)
        case_only = old.lower() == new.lower()  # on macOS and Windows the new name is the old folder
        if not case_only:
            self.check_free(new)
        source = self.folder(old)
        temp = Path(tempfile.mkdtemp(prefix=f".tmp-{new}-", dir=self.root))
        try:  # rewrite subject.json in a copy, then swap: the old subject stays whole until the last rename
            shutil.copytree(source, temp, dirs_exist_ok=True)
            meta = self._read_meta(source)
            meta["name"] = new
            (temp / META).write_text(json.dumps(meta, indent=1, ensure_ascii=False), encoding="utf-8")
            if case_only:  # the old folder goes aside first, and comes back if the new one cannot take its place
                trash = self.root / f".old-{old}-{uuid.uuid4().hex[:8]}"  # a kill before the swap: sweep() restores it
                os.rename(source, trash)
                try:
                    os.rename(temp, self.root / new)
                except BaseException:
                    os.rename(trash, source)
                    raise
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(temp, self.root / new)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        if not case_only:
            self.delete(old)
        return self.get(new)

    def delete(self, name: str) -> None:
        self.get(name)
        remove_folder(self.folder(name))  # atomic disappearance, then the slow part
        self.clear_work(name)

    # ----------------------------------------------------------------- sharing
    def export(self, name: str, dest: str | Path, include_photos: bool = True) -> Path:
        """One .safetensors: residuals + thumbnail/photos/masks as uint8 tensors, metadata JSON in the header."""
        meta = self.meta(name)
        folder = self.folder(name)
        has_residual = self.get(name).has_residual
        if not has_residual and not include_photos:
            raise InputError(f"'{name}' is an instant subject: its photos are all it has, so export them too")
        dest = export_path(dest, name, self.root)  # checked before anything is read or written
        residuals = dict(self.residuals(name)) if has_residual else {}
        images = [("thumbnail", THUMBNAIL)] if (folder / THUMBNAIL).is_file() else []
        if include_photos:
            images += [(f"photo.{i}", p) for i, p in enumerate(meta.get("photos", []))]
            images += [(f"mask.{i}", p) for i, p in enumerate(meta.get("masks", []))]
        images_out = image_tensors(folder, images, f"subject '{name}'")
        if not include_photos:
            meta = {**meta, "photos": [], "masks": []}
        partial = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            save_file(pack_export(residuals, images_out), str(partial), metadata={EXPORT_KEY: json.dumps(meta)})
            os.replace(partial, dest)
        except OSError as error:
            partial.unlink(missing_ok=True)
            raise InputError(f"cannot write {dest}: {error.strerror or error}") from None
        return dest

    def import_file(self, path: str | Path, name: str | None = None, overwrite: bool = False) -> SubjectInfo:
        path = Path(path).expanduser()
        if path.is_dir():
            raise InputError(f"{path.name}: is a folder; import a subject from a .safetensors file exported by Troupe")
        if path.suffix != ".safetensors" or not path.is_file():
            raise InputError(f"{path.name}: import a subject from a .safetensors file exported by Troupe")
        meta, residuals, photos, masks = read_export(path)
        info = SubjectInfo(
            name=check_subject_name(name or meta["name"]),
            class_word=meta["class_word"],
            family=meta["family"],
            fingerprint=meta["fingerprint"],
            created=meta["created"],
            steps=meta["steps"],
            loss_curve=tuple(meta.get("loss_curve", [])),
        )
        return self.add(info, residuals, photos, masks, overwrite=overwrite, stats=meta.get("stats"))

    def push(self, name: str, repo_id: str, token: str | None = None, path_in_repo: str | None = None) -> str:
        """Upload the exported subject to a Hub repo; returns the file's path in the repo."""
        import huggingface_hub

        path_in_repo = path_in_repo or f"{name}.safetensors"
        with tempfile.TemporaryDirectory() as folder:
            exported = self.export(name, Path(folder) / f"{name}.safetensors")
            huggingface_hub.upload_file(
                path_or_fileobj=str(exported),
                path_in_repo=path_in_repo,
                repo_id=repo_id,
                token=token,
                commit_message=f"Troupe subject {name}",
            )
        return path_in_repo

    def pull(
        self,
        repo_id: str,
        filename: str,
        name: str | None = None,
        token: str | None = None,
        revision: str | None = None,
        overwrite: bool = False,
    ) -> SubjectInfo:
        import huggingface_hub

        if not filename.endswith(".safetensors"):
            raise InputError(f"{filename}: subjects are shared as .safetensors files")
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, token=token, revision=revision)
        return self.import_file(Path(local), name=name, overwrite=overwrite)
