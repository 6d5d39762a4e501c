"""What one job asks of the GPU, and the caps a shared studio puts on it (engines/types/tables.py JOB_CAPS).

A generation's work is counted in image-steps at the model's native size: steps × images × (area / native area),
times the UNet calls each step makes. The extra calls are the demo speed bench's ratios over an image without
boxes (docs/speed.md, README "Measured"): references ×2.55, box fitting on every layer (3 iterations over half the
steps) ×2.88, so 1.25 per iteration and fitted share of the steps, about half of that when it reads only the coarse
layers (its forward stops after the middle block). The count is checked before the model does anything, so a refused
job costs the queue nothing and the line says which limit it passed.
"""

from __future__ import annotations

from engines.prompts import SUBJECT_PATTERN
from engines.types import GenerateRequest, InputError, JobCap, RelationTrainRequest

REFERENCE_PASS = 1.55  # the reference pass and its routing, over one UNet call per step
FIT_ITERATION = 1.25  # one fitting iteration (forward and backward) over the share of the steps it fits
SHALLOW_FIT = 0.5  # fitting that reads only the coarse layers runs half the UNet


def generation_work(request: GenerateRequest, native: int) -> float:
    """Image-steps at the native size, counting the reference pass and box fitting as the extra UNet calls they are."""
    width, height = request.width or native, request.height or native
    per_step = request.num_images * width * height / native**2
    calls = 1.0
    if request.references.enabled is not False and request.references.strength > 0:
        if SUBJECT_PATTERN.search(request.prompt):  # references run only for a subject the prompt names
            calls += REFERENCE_PASS
    guidance = request.guidance
    if guidance.fit_iterations and request.layout.regions:
        depth = 1.0 if guidance.fit_depth == "full" else SHALLOW_FIT
        calls += FIT_ITERATION * guidance.fit_iterations * guidance.fit_fraction * depth
    steps = request.steps * (request.references.start_strength if request.references.start == "collage" else 1.0)
    return steps * per_step * calls


def check_generation(request: GenerateRequest, native: int, cap: JobCap) -> None:
    """One line naming the first limit `request` passes; nothing when it fits."""
    if request.steps > cap.steps:
        raise InputError(f"this studio allows up to {cap.steps} steps per image (asked for {request.steps})")
    if request.num_images > cap.images:
        raise InputError(f"this studio makes up to {cap.images} images per job (asked for {request.num_images})")
    width, height = request.width or native, request.height or native
    if width * height > cap.area * native**2:
        side = round(native * cap.area**0.5)
        raise InputError(
            f"{width}×{height} is larger than this studio makes: up to {side}×{side} pixels in area for this model"
        )
    work = generation_work(request, native)
    if work > cap.work:
        raise InputError(
            f"this job is {work:.0f} image-steps at {native}×{native}, more than the {cap.work:.0f} this studio "
            "allows per job: ask for fewer steps or images, a smaller size, or less box fitting"
        )


def check_relation_training(request: RelationTrainRequest, cap: JobCap) -> None:
    if request.steps > cap.relation_steps:
        raise InputError(
            f"this studio trains a relation for up to {cap.relation_steps} steps (asked for {request.steps})"
        )
