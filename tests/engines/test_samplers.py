"""The A1111 sampler set: every sampler runs (with layout guidance) and restores the model's scheduler, and an
image names the sampler that really ran, "Default" included."""

from __future__ import annotations

import numpy as np
import pytest

from engines.generate import Generator
from engines.types import SCHEDULERS, GenerateRequest, Layout, Region
from engines.types.tables import sampler_key, sampler_title

A1111_SET = (
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DPM++ SDE Karras",
    "DDIM",
    "UniPC",
    "LMS",
    "Heun",
    "LCM",
)
LAYOUT = Layout((Region("dog", (0.0, 0.2, 0.5, 0.8)), Region("cat", (0.4, 0.1, 1.0, 0.9), layer=1)))


def test_the_a1111_set_is_in_the_table_by_its_names():
    titles = {sampler.title for sampler in SCHEDULERS.values()}
    assert set(A1111_SET) <= titles
    for title in A1111_SET:
        assert SCHEDULERS[sampler_key(title)].title == title
        assert sampler_key(title.upper()) == sampler_key(title)  # typed in any case


def test_old_keys_keep_their_meaning():
    """Keys stored in PNGs made before the A1111 set: the same scheduler classes as then."""
    old = {
        "default": None,
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "lms": "LMSDiscreteScheduler",
        "pndm": "PNDMScheduler",
    }
    for key, scheduler in old.items():
        assert SCHEDULERS[key].scheduler == scheduler
        assert sampler_key(key) == key
    assert not SCHEDULERS["dpmpp_2m"].karras and SCHEDULERS["dpmpp_2m_karras"].karras


@pytest.mark.parametrize("key", [k for k in SCHEDULERS if k != "default"])
def test_every_sampler_generates_and_names_itself(sd15, key):
    scheduler = sd15.pipe.scheduler
    request = GenerateRequest("a photo of dog and cat", layout=LAYOUT, seed=3, steps=3, scheduler=key)
    result = Generator(sd15)(request)
    assert np.isfinite(np.asarray(result.images[0], float)).all()
    assert f"Sampler: {SCHEDULERS[key].title}," in result.images[0].info["parameters"]
    assert sd15.pipe.scheduler is scheduler


def test_default_names_the_models_own_scheduler(sd15):
    """The tiny model ships DDIM: "Default" runs it, so the image says DDIM (not "Default")."""
    assert type(sd15.pipe.scheduler).__name__ == "DDIMScheduler"
    result = Generator(sd15)(GenerateRequest("a photo of dog", seed=1, steps=1))
    assert "Sampler: DDIM," in result.images[0].info["parameters"]


@pytest.mark.parametrize(
    "scheduler, config, title",
    [
        ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),  # SD 1.5's own
        ("EulerDiscreteScheduler", {}, "Euler"),  # SDXL's own
        ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, "DPM++ 2M"),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
            "DPM++ 2M Karras",
        ),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, "DPMSolverMultistep"),
        ("DPMSolverSinglestepScheduler", {}, "DPMSolverSinglestep"),  # not in the table: named by its class
    ],
)
def test_a_models_own_scheduler_is_named_by_its_class_and_options(scheduler, config, title):
    assert sampler_title("default", scheduler, config) == title


def test_box_fitting_with_a_second_order_sampler(sd15):
    """Heun and DPM++ SDE call the UNet twice per step: fitting and guidance must still run to the end."""
    request = GenerateRequest("a photo of dog and cat", layout=LAYOUT, seed=3, steps=3, scheduler="heun")
    fitted = GenerateRequest(**{**request.__dict__, "guidance": request.guidance.fitted(1)})
    image = Generator(sd15)(fitted).images[0]
    assert np.isfinite(np.asarray(image, float)).all()
