"""What one job costs and a shared studio's cap on it (engines/job_cost.py): the issue's job that held a Space is
refused in one line naming its limit, an ordinary one passes, and fitting and references count as the extra UNet
calls they are."""

from __future__ import annotations

import pytest

from engines.job_cost import check_generation, check_relation_training, generation_work
from engines.types import (
    JOB_CAPS,
    GenerateRequest,
    GuidanceConfig,
    InputError,
    Layout,
    ReferenceConfig,
    Region,
    RelationTrainRequest,
)

SHARED = JOB_CAPS["shared"]
BOXES = Layout((Region("dog", (0.0, 0.0, 0.5, 1.0)),))


def request(**fields) -> GenerateRequest:
    return GenerateRequest("a photo of a dog", seed=1, **fields)


def refusal(wanted: GenerateRequest, native: int = 512) -> str:
    with pytest.raises(InputError) as error:
        check_generation(wanted, native, SHARED)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_the_job_that_held_a_space_is_refused_before_any_work():
    assert "up to 50 steps" in refusal(request(steps=150, num_images=8, width=4096, height=4096))
    assert "up to 4 images" in refusal(request(steps=20, num_images=8))
    assert "larger than this studio makes" in refusal(request(steps=20, width=4096, height=4096))
    assert "image-steps" in refusal(request(steps=50, num_images=4))  # 200 > 160


def test_ordinary_jobs_pass():
    check_generation(request(steps=20, num_images=4), 512, SHARED)  # 80 image-steps
    check_generation(request(steps=30, width=1024, height=1024), 512, SHARED)  # twice the side: 120
    check_generation(request(steps=40, width=2048, height=2048), 1024, SHARED)  # SDXL's native is larger


def test_fitting_and_references_cost_their_extra_unet_calls():
    plain = generation_work(request(steps=20, layout=BOXES), 512)
    fitted = generation_work(request(steps=20, layout=BOXES, guidance=GuidanceConfig().with_fit("full")), 512)
    quick = generation_work(request(steps=20, layout=BOXES, guidance=GuidanceConfig().with_fit("quick")), 512)
    subject = GenerateRequest("a photo of <rex>", seed=1, steps=20)
    assert plain == 20 and plain < quick < fitted
    assert fitted == pytest.approx(20 * 2.875)  # the speed bench's ×2.88 for full fitting
    assert generation_work(subject, 512) == pytest.approx(20 * 2.55)  # and ×2.55 for references
    off = GenerateRequest("a photo of <rex>", seed=1, steps=20, references=ReferenceConfig(enabled=False))
    assert generation_work(off, 512) == 20


def test_relation_training_steps_are_capped():
    check_relation_training(RelationTrainRequest("leaning", "folder", steps=600), SHARED)
    with pytest.raises(InputError, match="up to 1000 steps"):
        check_relation_training(RelationTrainRequest("leaning", "folder", steps=5000), SHARED)
