"""One speed benchmark beside vanilla diffusers: python -m studio bench --speed.

    python -m studio bench --speed                                             # the demo model
    python -m studio bench --speed --random-arch sd15 --size 256 --steps 4 --json out.json
    python -m studio bench --speed --random-arch sdxl --quantization nf4        # on a GPU; evals/gpu_speed.sh runs all

In one process, the cases taking turns after a warm-up of each (evals/guidance_speed.time_calls): vanilla diffusers
(the pipeline's own call with the same components, seed and scheduler: Troupe without regions is bit-identical to
it), Troupe without regions, Troupe with two regions (forward guidance, bounded self-attention, box fitting, quick box
fitting), references from an instant subject's photos, then registration per preset (--register-steps steps each,
extrapolated to the preset's). Seconds per image, the ratio to vanilla and the peak memory of each case (CUDA memory
allocated on a GPU, the process's RSS on a CPU), and the aten operators each guided attention call adds over a plain
one, counted with torch.profiler.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engines.compiled_unet import compile_unet
from engines.generate import Generator
from engines.library import SubjectLibrary
from engines.models import ModelBundle, load_model, resolve_device
from engines.prompt_subjects import gather_subjects
from engines.register import register_subject
from engines.types import (
    GUIDANCE_MODES,
    REGISTER_PRESETS,
    GenerateRequest,
    GuidanceConfig,
    ModelSpec,
    RegisterRequest,
)
from evals.guidance_speed import LAYOUT, PROMPT, peak_memory_mb, reset_peak_memory, time_calls
from evals.random_models import random_bundle
from evals.register_speed import make_photos, time_preset

GUIDED = {  # case → the guidance of a Troupe request with guidance_speed's two regions
    "Troupe, 2 regions, forward guidance": GuidanceConfig(),
    "Troupe, 2 regions, + bounded self-attention": GuidanceConfig(bound_self_attention=True),
    "Troupe, 2 regions, + box fitting": GUIDANCE_MODES["troupe-fitted"].config,
    "Troupe, 2 regions, + quick box fitting": GUIDANCE_MODES["troupe-quick-fit"].config,
}
VANILLA, UNGUIDED, REFERENCES = "vanilla diffusers", "Troupe, no regions", "Troupe, references (1 subject, 4 photos)"
CASES = dict(  # --cases: short name → the case's title in the report
    zip(("vanilla", "unguided", "guided", "bounded", "fitted", "quick-fit", "references"),
        (VANILLA, UNGUIDED, *GUIDED, REFERENCES), strict=True)
)  # fmt: skip
# Full-size shapes on a CPU (one SD 1.5 CFG step at 256 px: ~14 s on one core): what fits in a few minutes. Box
# fitting backpropagates through the UNet, references read four photos at 512 px each step, registration trains at
# 512 px: each is tens of minutes there, so they run when asked for (--cases all, --register-presets).
CPU_FULL_SIZE_CASES = ("vanilla", "unguided", "guided", "bounded", "quick-fit")


@dataclass(frozen=True)
class SpeedOptions:
    model: str = "demo"  # a model source when random_arch is None
    random_arch: str | None = None  # "sd15", "sdxl" (full-size shapes, random weights) or "demo"
    size: int | None = None  # image side; the model's native size if None
    steps: int = 20
    cfg: float = 7.5
    repeats: int = 2
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    register_presets: tuple[str, ...] = ("quick", "standard", "thorough")
    register_steps: int | None = 2  # steps timed per preset (None: all); the rest is extrapolated
    compile: bool = False  # every case on the torch.compile'd UNet (engines/compiled_unet.py), vanilla's included
    cases: tuple[str, ...] = tuple(CASES)  # keys of CASES; vanilla is always timed (the ratios' denominator)
    warm_up: bool = True  # an untimed run of each case first (lazy allocations, CUDA kernels, compilation)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} torch threads)"


def bench_bundle(options: SpeedOptions, folder: Path) -> ModelBundle:
    """The model to time, compiled when asked (the same UNet for every case, vanilla diffusers' included)."""
    bundle = _load_bench_model(options, folder)
    if options.compile:
        compile_unet(bundle.pipe.unet)
    return bundle


def _load_bench_model(options: SpeedOptions, folder: Path) -> ModelBundle:
    """Random shapes are saved and loaded again when quantized: the preset's own load path."""
    arch = options.random_arch
    spec = ModelSpec(options.model, dtype=options.dtype, quantization=options.quantization, device=options.device)
    if arch in (None, "demo"):
        return load_model(replace(spec, source="demo" if arch == "demo" else options.model, reference_adapter="none"))
    bundle = random_bundle(arch, resolve_device(options.device), options.size)
    if options.quantization == "none" and options.dtype == "auto":
        return bundle
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # saving's progress bars are not this bench's output
    transformers_logging.disable_progress_bar()
    bundle.pipe.save_pretrained(folder / arch)
    del bundle
    return load_model(replace(spec, source=str(folder / arch), family=arch, reference_adapter="none"))


def generation_calls(bundle: ModelBundle, options: SpeedOptions, library: SubjectLibrary | None) -> dict:
    """The cases as calls of one image each, all with seed 0 and the pipeline's default scheduler."""
    size = options.size or bundle.native_size
    base = GenerateRequest(PROMPT, seed=0, steps=options.steps, cfg=options.cfg, width=size, height=size)
    generator = Generator(bundle)

    def vanilla():
        seed = torch.Generator("cpu").manual_seed(0)
        return bundle.pipe(PROMPT, num_inference_steps=options.steps, guidance_scale=options.cfg, generator=seed,
                           width=size, height=size).images  # fmt: skip

    calls = {VANILLA: vanilla, UNGUIDED: lambda: generator(base)}
    for name, guidance in GUIDED.items():
        calls[name] = (lambda r: lambda: generator(r))(replace(base, layout=LAYOUT, guidance=guidance))
    if library is not None:
        request = replace(base, prompt="a photo of <ref> and cat on the beach")
        subjects = gather_subjects(request.prompt, library, bundle.family, bundle.fingerprint)
        calls[REFERENCES] = lambda: generator(request, subjects)
    chosen = {VANILLA, *(CASES[key] for key in options.cases)}
    return {name: call for name, call in calls.items() if name in chosen}


def reference_library(bundle: ModelBundle, folder: Path) -> SubjectLibrary | None:
    """An instant subject (photos and masks, no training) whose photos the references case reads."""
    photos = make_photos(folder, bundle.native_size)
    library = SubjectLibrary(folder / "references")
    register_subject(bundle, RegisterRequest("ref", "dog", photos, preset="instant"), library)
    return library


def attention_operators(bundle: ModelBundle, options: SpeedOptions) -> dict[str, float]:
    """aten operators per attention call (one step, torch.profiler): plain, guided (cross-attention) and bounded
    (self-attention), and what guidance adds over the plain call."""
    size = options.size or bundle.native_size
    base = GenerateRequest(PROMPT, seed=0, steps=1, cfg=options.cfg, width=size, height=size)
    plain = _operators_per_call(bundle, base)
    guided = _operators_per_call(bundle, replace(base, layout=LAYOUT))
    bounded = _operators_per_call(
        bundle, replace(base, layout=LAYOUT, guidance=GuidanceConfig(bound_self_attention=True))
    )
    return {
        "plain_cross_attention": plain["attn2"],
        "guided_cross_attention": guided["attn2"],
        "added_per_guided_cross_attention_call": guided["attn2"] - plain["attn2"],
        "plain_self_attention": plain["attn1"],
        "bounded_self_attention": bounded["attn1"],
        "added_per_bounded_self_attention_call": bounded["attn1"] - plain["attn1"],
    }


def _operators_per_call(bundle: ModelBundle, request: GenerateRequest) -> dict[str, float]:
    """Mean aten operators called inside each attn1 (self) and attn2 (cross) module call of one request. Each call is
    wrapped in a profiler label by module hooks; the operators counted are the label's direct aten children (what
    the processor's Python code dispatches; each launches one or a few kernels on a GPU)."""
    labels, handles = [], []

    def enter(kind):
        def hook(_module, _args):
            labels.append(torch.profiler.record_function(f"troupe::{kind}"))
            labels[-1].__enter__()

        return hook

    def leave(_module, _args, _output):
        labels.pop().__exit__(None, None, None)

    for name, module in bundle.pipe.unet.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("attn1", "attn2"):
            handles += [module.register_forward_pre_hook(enter(kind)), module.register_forward_hook(leave)]
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    try:
        with _quiet_stderr():
            profile.start()
        Generator(bundle)(request)
    finally:
        with _quiet_stderr():
            profile.stop()
        for handle in handles:
            handle.remove()
    counts: dict[str, list[int]] = {"attn1": [], "attn2": []}
    for event in profile.events():
        if event.name.startswith("troupe::"):
            counts[event.name.removeprefix("troupe::")].append(
                sum(child.name.startswith("aten::") for child in event.cpu_children)
            )
    return {kind: sum(values) / max(len(values), 1) for kind, values in counts.items()}


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints a line to stderr at each start and stop (Kineto's USDT probes)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def registration(bundle: ModelBundle, options: SpeedOptions, folder: Path) -> dict[str, dict]:
    """Per preset: wall seconds of --register-steps steps, s/step, the full preset's estimate and the peak memory."""
    photos = make_photos(folder, bundle.native_size)
    args = argparse.Namespace(max_steps=options.register_steps, class_word="dog")
    rows = {}
    for name in options.register_presets:
        if REGISTER_PRESETS[name].steps == 0:
            continue  # instant: nothing is trained
        reset_peak_memory()
        row = time_preset(bundle, name, photos, folder, args)
        rows[name] = {
            "steps_timed": row["steps"],
            "steps": row["of"],
            "seconds": round(row["seconds"], 3),
            "seconds_per_step": round(row["per_step"], 3),
            "estimated_seconds": round(row["estimate"], 1),
            "peak_memory_mb": round(peak_memory_mb(), 1),
        }
    return rows


def run_speed_bench(options: SpeedOptions, on_line=print) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundle = bench_bundle(options, folder)
        size = options.size or bundle.native_size
        report = {
            "model": {None: options.model, "demo": "demo"}.get(options.random_arch, f"random {options.random_arch}"),
            "family": bundle.family,
            "device": device_name(bundle.device),
            "dtype": str(bundle.dtype).removeprefix("torch."),
            "quantization": options.quantization,
            "size": size,
            "steps": options.steps,
            "cfg": options.cfg,
            "repeats": options.repeats,
            "warm_up": options.warm_up,
            "compiled": options.compile,
        }
        on_line(f"{report['model']} ({bundle.family}), {size}x{size}, {options.steps} steps, CFG {options.cfg}, "
                f"{report['dtype']}, quantization {options.quantization}{', compiled' * options.compile}, on {report['device']}")  # fmt: skip
        # first: its one-step requests also bring every code path in before anything is timed
        operators = attention_operators(bundle, options)
        library = reference_library(bundle, folder) if "references" in options.cases else None
        timings = time_calls(generation_calls(bundle, options, library), options.repeats, options.warm_up)
        vanilla = timings[VANILLA].seconds
        report["cases"] = {
            name: {
                "seconds_per_image": round(t.seconds, 4),
                "ratio_to_vanilla": round(t.seconds / vanilla, 4),
                "peak_memory_mb": round(t.peak_mb, 1),
            }
            for name, t in timings.items()
        }
        report["operators"] = operators
        report["registration"] = registration(bundle, options, folder) if options.register_presets else {}
    return report


def speed_tables(report: dict) -> str:
    """The report as the README's two tables."""
    lines = ["| case | s/image | ratio to vanilla | peak memory MiB |", "|---|---|---|---|"]
    for name, case in report["cases"].items():
        lines.append(f"| {name} | {case['seconds_per_image']:.3f} | {case['ratio_to_vanilla']:.3f} "
                     f"| {case['peak_memory_mb']:.0f} |")  # fmt: skip
    ops = report["operators"]
    lines += [
        "",
        f"aten operators per attention call: cross-attention {ops['plain_cross_attention']:.0f} plain, "
        f"{ops['guided_cross_attention']:.0f} guided (+{ops['added_per_guided_cross_attention_call']:.0f}); "
        f"self-attention {ops['plain_self_attention']:.0f} plain, {ops['bounded_self_attention']:.0f} bounded "
        f"(+{ops['added_per_bounded_self_attention_call']:.0f})",
    ]
    if report["registration"]:
        lines += ["", "| registration preset | steps timed / preset | s/step | est. full s | peak memory MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, row in report["registration"].items():
            lines.append(f"| {name} | {row['steps_timed']} / {row['steps']} | {row['seconds_per_step']:.2f} "
                         f"| {row['estimated_seconds']:.0f} | {row['peak_memory_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines)
