"""Studio: the one object the UI and the CLI call. Owns the loaded model, the subject library and the GPU lock."""

from __future__ import annotations

import copy
import dataclasses
import gc
import threading
from collections.abc import Callable
from pathlib import Path

from engines.types import (
    GenerateRequest,
    GenerateResult,
    InputError,
    JobCap,
    Layout,
    LoraRef,
    ModelSpec,
    ProgressCallback,
    RegisterRequest,
    RelationInfo,
    RelationTrainRequest,
    SubjectInfo,
    with_default_fit,
)
from engines.types.batch import BatchOptions, BatchProgress, BatchSummary, JobFile

OUT_OF_MEMORY = (
    "out of memory while {what}: nothing was saved and the model is still loaded — try a smaller size, fewer images "
    "or steps, or a machine preset that offloads (--vram)"
)


class out_of_memory:  # noqa: N801 - used as a `with` statement, like contextlib's helpers
    """A job that runs out of (GPU) memory becomes one line, after what it held is freed, so the next job runs.

    The error's traceback holds the frames of the failed step and with them every activation; it is cut before the
    one-line error is raised (which keeps the memory error as its context)."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if error is None or not _is_out_of_memory(error):
            return False
        error.__traceback__ = None
        del error, trace
        gc.collect()
        import torch  # loaded already: a job ran

        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the cached blocks back, so the next job (or process) can have them
        raise InputError(OUT_OF_MEMORY.format(what=self.what)) from None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()  # MPS and older CUDA messages
    )


class Studio:
    """Loads its model lazily on first use; one GPU job at a time (generation, registration or a model switch)."""

    def __init__(self, model: ModelSpec | None = None, library_dir: Path | str | None = None) -> None:
        self.model_spec = model or ModelSpec()
        if library_dir is None:
            from engines.library import default_library_dir

            library_dir = default_library_dir()
        self.library_dir = Path(library_dir).expanduser()
        self._bundle = None
        self._library = None
        self._gpu = threading.RLock()
        # A request's LoRA path → where this studio reads that file instead. Set only on a Ray batch worker, whose
        # copies of the driver's files live in a private folder: the request, and so the PNG, keeps the person's path.
        self.lora_copies: dict[str, str] = {}
        # What one job may cost when many people share this studio's queue (a Space): engines/job_cost.py. None on a
        # desktop, whose owner may ask for anything the request limits allow.
        self.job_cap: JobCap | None = None

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
        if self._bundle is None:  # loaded: no need to wait for a running job's lock
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
        return {
            "source": self.model_spec.source,
            "family": bundle.family,
            "native_size": bundle.native_size,
            "device": str(bundle.device),
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "fingerprint": bundle.fingerprint,
        }

    def with_default_fit(self, request: GenerateRequest) -> GenerateRequest:
        """`request` with the box fitting this model's family uses when boxes are drawn and none was chosen (the UI's
        and the CLI's "auto"; engines.types.DEFAULT_BOX_FIT). Loads the model to know its family."""
        bundle = self._bundle if self._bundle is not None else self.bundle  # loaded: no wait for a running job's lock
        guidance = with_default_fit(request.guidance, request.layout, bundle.family)
        return request if guidance == request.guidance else dataclasses.replace(request, guidance=guidance)

    # Generation -----------------------------------------------------------------------------------------------
    def generate(
        self,
        request: GenerateRequest,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerateResult:
        from engines.faults import on_steps
        from engines.generate import Generator
        from engines.loras import applied, lora_updates
        from engines.prompt_subjects import gather_subjects

        with self._gpu, out_of_memory("generating"):
            bundle = self.bundle
            self.check_cost(request)  # before any work: one line
            subjects = gather_subjects(request.prompt, self.library, bundle.family, bundle.fingerprint)
            loras = lora_updates(bundle, self.request_loras(request))  # every file checked before any work
            with applied(bundle, loras):  # and taken out again afterwards, bit for bit
                return Generator(bundle)(request, subjects, on_steps("generate.step", on_progress), cancel)

    def check_cost(self, request: GenerateRequest) -> None:
        """Refuse, in one line, a generation above this studio's cap (a shared studio's: engines/job_cost.py). Never
        waits for a running job: a Space asks this when a job is submitted, before it joins the queue."""
        bundle = self._bundle
        if self.job_cap is not None and bundle is not None:
            from engines.job_cost import check_generation

            check_generation(request, bundle.native_size, self.job_cap)

    def request_loras(self, request: GenerateRequest) -> list[LoraRef]:
        """The person's LoRAs, then the relation's own at the relation's scale (a preset without one adds none)."""
        loras = [dataclasses.replace(lora, path=self.lora_copies.get(lora.path, lora.path)) for lora in request.loras]
        if request.relation:
            from engines.relations import get_relation

            relation = get_relation(request.relation, self.relations())
            if relation.lora is not None:
                loras.append(LoraRef(str(relation.lora), request.relation_scale))
        return loras

    def vae_roundtrip(self, image):
        """An RGB image (H, W, 3) uint8 through the model's VAE and back: what the model could show at best."""
        with self._gpu:
            return self.bundle.vae_roundtrip(image)

    @staticmethod
    def save_png(image, path: str | Path) -> Path:
        """Write a generated image as PNG with the settings it carries (`image.info`)."""
        from engines.metadata import save_png

        return save_png(image, Path(path))

    def read_request(self, png_path: str | Path) -> GenerateRequest:
        from engines.metadata import read_request

        return read_request(png_path)

    def open_png(self, png_path: str | Path):
        """The settings of a Troupe, A1111 or ComfyUI PNG as an engines.types.opened.OpenedImage (the request and
        what of another tool's settings could not be carried over, and the VAE and embeddings it was made with that
        this studio's model does not load)."""
        from engines.png_import import open_png, unloaded_files

        return unloaded_files(open_png(png_path), self.model_spec)

    # Batches --------------------------------------------------------------------------------------------------
    def read_jobs(self, path: str | Path) -> JobFile:
        """A job file read, expanded and checked against this studio's subjects, relations and LoRA files (the model
        is not loaded): every bad line comes back as a problem with its line number."""
        from engines.batch import read_jobs
        from engines.batch.render import check_request

        return read_jobs(path, check_request(self))

    def run_batch(self, jobs: JobFile, options: BatchOptions,
                  on_progress: Callable[[BatchProgress], None] | None = None) -> BatchSummary:  # fmt: skip
        """Render the jobs `options.out` does not hold yet: here, through generate, or on Ray workers that each load
        this studio's model (engines/batch/)."""
        from engines.batch import run_batch

        return run_batch(self, jobs, options, on_progress)

    # Subjects -------------------------------------------------------------------------------------------------
    @property
    def library(self):
        if self._library is None:
            from engines.library import SubjectLibrary

            self._library = SubjectLibrary(self.library_dir)
        return self._library

    def register(
        self,
        request: RegisterRequest,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> SubjectInfo:
        from engines.images import check_photos
        from engines.register import register_subject
        from engines.subject_files import check_class_tokens

        self.library.check_free(request.name)
        check_photos(request.photos)  # a bad photo is one line before the model loads, not after
        with self._gpu, out_of_memory("registering"):
            check_class_tokens(self.bundle.tokenizers, request.class_word)
            return register_subject(self.bundle, request, self.library, on_progress, cancel)

    def subjects(self) -> list[SubjectInfo]:
        return self.library.list()

    def check_library(self, repair: bool = False) -> list:
        """The library's broken or foreign entries (engines.types.subjects.LibraryProblem), moved aside with
        `repair` (engines/library_check.py)."""
        from engines.library_check import check_library

        return check_library(self.library, repair)

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

    def pull_subject(
        self, repo_id: str, filename: str, name: str | None = None, token: str | None = None
    ) -> SubjectInfo:
        return self.library.pull(repo_id, filename, name=name, token=token)

    # Relations ------------------------------------------------------------------------------------------------
    @property
    def relation_library(self):
        from engines.relations.library import RelationLibrary

        return RelationLibrary(self.library_dir)

    def relations(self) -> dict:
        """The picker's relations (engines.relations.Relation by name): the presets, then the learned ones (a learned
        relation takes the place of a preset of the same name)."""
        from engines.relations import load_relations

        return {**load_relations(), **self.relation_library.presets()}

    def learned_relations(self) -> list[RelationInfo]:
        return self.relation_library.list()

    def teach_relation(self, request: RelationTrainRequest, on_progress: ProgressCallback | None = None,
                       cancel: threading.Event | None = None) -> RelationInfo:  # fmt: skip
        from engines.relations.examples import read_examples
        from engines.relations.training import teach_relation

        if self.job_cap is not None:
            from engines.job_cost import check_relation_training

            check_relation_training(request, self.job_cap)
        self.relation_library.check_free(request.name)
        examples = read_examples(request.exemplars, request.name)  # every check before the model loads
        with self._gpu, out_of_memory("teaching a relation"):
            return teach_relation(self.bundle, request, self.relation_library, on_progress, cancel, examples=examples)

    def relation_uploads_dir(self, name: str) -> Path:
        """Where the studio writes the examples of a relation drawn in the browser."""
        return self.relation_library.uploads_dir(name)

    def rename_relation(self, old: str, new: str) -> RelationInfo:
        return self.relation_library.rename(old, new)

    def delete_relation(self, name: str) -> None:
        self.relation_library.delete(name)

    def export_relation(self, name: str, dest: str | Path, fmt: str = "diffusers") -> Path:
        return self.relation_library.export(name, dest, fmt)

    def import_relation(self, path: str | Path, name: str | None = None) -> RelationInfo:
        return self.relation_library.import_file(path, name)

    # Projects and machine presets: torch-free, read by the UI through here ----------------------------------------

    def apply_relation(self, relation: str, participants: list[str], scene: str = "") -> tuple[str, Layout]:
        """A relation's prompt and proposed regions for these participants (`<name>` subjects or phrases)."""
        from engines.relations import apply_relation, get_relation

        class_words = {info.name: info.class_word for info in self.subjects()}
        return apply_relation(get_relation(relation, self.relations()), participants, scene, class_words)

    @staticmethod
    def vram_presets() -> dict:
        """The machine presets of presets/vram.json (engines.presets.VramPreset by name)."""
        from engines.presets import load_vram_presets

        return load_vram_presets()

    def save_project(self, request: GenerateRequest, width: int, height: int, folder: str | Path) -> Path:
        """Write the composition as a .troupe.json in `folder`, naming the subjects it uses with their class words."""
        from engines.project import Project

        words = {info.name: info.class_word for info in self.subjects()}
        named = {r.subject for r in request.layout.regions if r.subject} | {
            n for n in words if f"<{n}>" in request.prompt
        }
        project = Project(
            request=request,
            width=width,
            height=height,
            subjects={n: words[n] for n in sorted(named) if n in words},
            model=self.model_spec.source,
        )
        return project.save(Path(folder))

    @staticmethod
    def read_project(path: str | Path):
        """The engines.project.Project in a .troupe.json file, validated."""
        from engines.project import read_project

        return read_project(path)
