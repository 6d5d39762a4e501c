"""Studio: the one object the UI and the CLI call. Owns the loaded model, the subject library and the GPU lock."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from engines.types import (
    GenerateRequest,
    GenerateResult,
    InputError,
    ModelSpec,
    ProgressCallback,
    RegisterRequest,
    SubjectInfo,
)

DEFAULT_LIBRARY = Path(os.environ.get("TROUPE_LIBRARY", "~/.troupe/library")).expanduser()


class Studio:
    """Loads its model lazily on first use; one GPU job at a time (generation, registration or a model switch)."""

    def __init__(self, model: ModelSpec | None = None, library_dir: Path | str | None = None) -> None:
        self.model_spec = model or ModelSpec()
        self.library_dir = Path(library_dir).expanduser() if library_dir else DEFAULT_LIBRARY
        self._bundle = None
        self._library = None
        self._gpu = threading.RLock()

    # Model ----------------------------------------------------------------------------------------------------
    @property
    def bundle(self):
        with self._gpu:
            if self._bundle is None:
                from engines.models import load_model

                self._bundle = load_model(self.model_spec)
            return self._bundle

    def with_library(self, library_dir: Path | str) -> Studio:
        """A view with its own subject library (one per visitor of a Space) that shares this studio's model and
        GPU lock. The model is loaded first, so every view uses the same one."""
        with self._gpu:
            self.bundle  # noqa: B018 - load once, before the views share it
        view = copy.copy(self)
        view.library_dir, view._library = Path(library_dir).expanduser(), None
        return view

    def load_model(self, spec: ModelSpec) -> None:
        """Switch models; the old one stays loaded if the new one fails."""
        from engines.models import load_model

        with self._gpu:
            bundle = load_model(spec)
            self._bundle, self.model_spec = bundle, spec

    def model_info(self) -> dict:
        bundle = self.bundle
        return {"source": self.model_spec.source, "family": bundle.family, "native_size": bundle.native_size,
                "device": str(bundle.device), "dtype": str(bundle.dtype).removeprefix("torch."),
                "fingerprint": bundle.fingerprint}

    # Generation -----------------------------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, on_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> GenerateResult:
        from engines.generate import Generator

        with self._gpu:
            bundle = self.bundle
            class_words = self._class_words_for(request.prompt, bundle)
            residuals = self.library.residuals if class_words else None
            return Generator(bundle)(request, class_words, residuals, on_progress, cancel)

    def bench(self, quick: bool = False, steps: int = 20, cfg: float = 5.0, subjects: bool = True,
              held_out: bool = False, layouts: int | None = None, first_seed: int | None = None,
              modes: Sequence[str] | None = None, on_progress: ProgressCallback | None = None) -> dict:
        """The demo-world quality benchmark (engines/bench.py) on the loaded model: a JSON-able report. `modes`:
        the guidance modes to score (all of them when None)."""
        from engines.bench import GUIDANCE_MODES, run_bench

        with self._gpu:
            return run_bench(self.bundle, quick=quick, steps=steps, cfg=cfg, subjects=subjects, held_out=held_out,
                             layouts=layouts, first_seed=first_seed, modes=tuple(modes or GUIDANCE_MODES),
                             on_progress=on_progress)

    def read_request(self, png_path: str | Path) -> GenerateRequest:
        from engines.metadata import read_request

        return read_request(png_path)

    def _class_words_for(self, prompt: str, bundle) -> dict[str, str]:
        """Class words of the subjects the prompt names, each checked against the loaded model."""
        from engines.prompts import SUBJECT_PATTERN

        names = sorted({m.group(1) for m in SUBJECT_PATTERN.finditer(prompt)})
        if not names:
            return {}
        known = {info.name: info for info in self.library.list()}
        for name in names:
            if name not in known:
                raise InputError(f"the prompt names <{name}>, but there is no subject of that name "
                                 f"(registered: {', '.join(sorted(known)) or 'none yet'})")
            self.library.check_compatible(name, bundle.family, bundle.fingerprint)
        return {name: known[name].class_word for name in names}

    # Subjects -------------------------------------------------------------------------------------------------
    @property
    def library(self):
        if self._library is None:
            from engines.library import SubjectLibrary

            self._library = SubjectLibrary(self.library_dir)
        return self._library

    def register(self, request: RegisterRequest, on_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None) -> SubjectInfo:
        from engines.register import register_subject

        with self._gpu:
            return register_subject(self.bundle, request, self.library, on_progress, cancel)

    def subjects(self) -> list[SubjectInfo]:
        return self.library.list()

    def rename_subject(self, old: str, new: str) -> SubjectInfo:
        return self.library.rename(old, new)

    def delete_subject(self, name: str) -> None:
        self.library.delete(name)

    def export_subject(self, name: str, dest: str | Path, include_photos: bool = True) -> Path:
        return self.library.export(name, Path(dest), include_photos=include_photos)

    def import_subject(self, path: str | Path, name: str | None = None) -> SubjectInfo:
        return self.library.import_file(Path(path), name)

    def push_subject(self, name: str, repo_id: str, token: str | None = None) -> str:
        return self.library.push(name, repo_id, token=token)

    def pull_subject(self, repo_id: str, filename: str, name: str | None = None, token: str | None = None
                     ) -> SubjectInfo:
        return self.library.pull(repo_id, filename, name=name, token=token)
