"""python -m studio generate: one picture (or a batch) from a prompt and a layout of boxes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from engines.types import (
    BOX_FITS,
    DEFAULT_BOX_FIT,
    GUIDANCE_MODES,
    LIMITS,
    REFERENCE_SWITCHES,
    SCHEDULERS,
    START_MODES,
    GenerateRequest,
    InputError,
    Layout,
    LoraRef,
    ReferenceConfig,
    Region,
)
from engines.types.tables import sampler_key
from studio.cli.common import add_library_argument, add_model_arguments, print_progress, studio_for


def add_parsers(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a prompt and boxes",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--reuse",
        default=None,
        metavar="PNG",
        help="start from the settings of a PNG made by Troupe, A1111 or ComfyUI; --prompt, --negative, --seed, --steps, "
        "--cfg, --scheduler, --width, --height, --num-images and --box override them when given",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        action=Given,
        help="the picture; <name> stands for a registered subject, (words:1.3) weighs words as in A1111, and past 75 "
        "tokens it is read in windows (with --pair: the scene around them)",
    )
    parser.add_argument("--negative", default="", action=Given, help="negative prompt (weights work here too)")
    parser.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="WORDS=x0,y0,x1,y1[@layer]",
        help="a region: words of the prompt (or <name>) and a box in [0,1]; later boxes are in front "
        "unless @layer says otherwise",
    )
    parser.add_argument("--seed", type=int, default=None, action=Given, help="random if omitted (it is printed)")
    parser.add_argument("--steps", type=int, default=20, action=Given, help=f"1..{LIMITS.steps}")
    parser.add_argument("--cfg", type=float, default=7.5, action=Given, help=f"0..{LIMITS.cfg:g}")
    parser.add_argument(
        "--scheduler",
        "--sampler",
        type=scheduler_choice,
        default="default",
        action=Given,
        metavar="NAME",
        help="A1111's sampler names: " + ", ".join(f"'{s.title}'" for s in SCHEDULERS.values())
        + " (Default: the model's own); the keys (" + ", ".join(SCHEDULERS) + ") work too",
    )  # fmt: skip
    parser.add_argument("--width", type=int, default=None, action=Given, help="the model's native size if omitted")
    parser.add_argument("--height", type=int, default=None, action=Given)
    parser.add_argument("--num-images", type=int, default=1, action=Given, help=f"1..{LIMITS.images}")
    parser.add_argument(
        "--guidance",
        choices=list(GUIDANCE_MODES),
        default="troupe",
        # argparse expands %-formats in help: a mode's "35%" would crash --help
        help="; ".join(f"{name}: {mode.about}" for name, mode in GUIDANCE_MODES.items()).replace("%", "%%"),
    )
    parser.add_argument("--strength", type=float, default=None, help="override the guidance strength")
    parser.add_argument("--bound-self-attention", action="store_true", help="keep regions apart in self-attention too")
    parser.add_argument(
        "--fit",
        choices=("auto", *BOX_FITS),
        default="auto",
        help=("box fitting, which draws objects at their boxes' size: "
        + "; ".join(f"{name}: {fit.about}" for name, fit in BOX_FITS.items())
        + "; auto (default): "
        + ", ".join(f"{name} on {family}" for family, name in DEFAULT_BOX_FIT.items())
        + " models when boxes are drawn").replace("%", "%%"),
    )  # fmt: skip
    parser.add_argument("--fit-boxes", action="store_true", help="the same as --fit full")
    add_relation_arguments(parser)
    add_reference_arguments(parser)
    add_library_argument(parser)
    parser.add_argument("--out", default="outputs/troupe.png", help="PNG path; a batch gets -1, -2, ... suffixes")
    parser.set_defaults(func=run)


def add_relation_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("relations and LoRAs")
    group.add_argument("--relation", default=None, metavar="NAME",
                       help="a relation of the picker; a learned one (relations train) applies its LoRA")  # fmt: skip
    group.add_argument("--relation-scale", type=float, default=1.0, help="the learned relation's LoRA scale")
    group.add_argument("--pair", nargs=2, metavar=("A", "B"), default=None,
                       help="with --relation: fill its template with A and B (words or <name>) and use its boxes "
                       "and layers (unless --box is given); --prompt then adds the scene")  # fmt: skip
    group.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="a LoRA file (diffusers' or kohya's format, .safetensors) at SCALE (default 1); repeatable")  # fmt: skip


def add_reference_arguments(parser: argparse.ArgumentParser, switches: bool = True) -> None:
    """Reference identity (SynCD) and the collage start (MS-CustomNet): the fields of ReferenceConfig (without
    `switches`, the on/off and adapter choices are left to the caller, as the bench's modes set them).
    Ranges are left to ReferenceConfig, so a bad value gets the same one-line message as in the UI."""
    defaults = ReferenceConfig()
    group = parser.add_argument_group("references (the subjects' photos)")
    if switches:
        group.add_argument(
            "--references",
            choices=list(REFERENCE_SWITCHES),
            default="auto",
            help="let the picture read the subjects' photos; auto: on whenever a subject in the prompt has photos",
        )
        group.add_argument(
            "--no-reference-adapter",
            action="store_true",
            help="do not use the model's reference adapter even when it has one",
        )
    group.add_argument(
        "--reference-strength",
        type=float,
        default=defaults.strength,
        help="weight of the photos in self-attention, 0..8",
    )
    group.add_argument(
        "--image-guidance",
        type=float,
        default=defaults.image_guidance,
        help="λ_I of SynCD's normalized guidance, 0..30 (0: plain CFG; more costs a third UNet batch)",
    )
    group.add_argument(
        "--image-guidance-growth",
        type=float,
        default=defaults.image_guidance_growth,
        help="λ_I grows by this much from the first step to the last, 0..30",
    )
    group.add_argument(
        "--start",
        choices=list(START_MODES),
        default=defaults.start,
        help="collage: start from the subjects' cut-outs placed in their boxes, back to front",
    )
    group.add_argument(
        "--start-strength",
        type=float,
        default=defaults.start_strength,
        help="with --start collage: the share of the steps that are run, in (0, 1]",
    )


class Given(argparse.Action):
    """Stores the value and notes that it was typed, so that with --reuse only the options given override the
    PNG's settings (a value equal to the default still counts)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def scheduler_choice(text: str) -> str:
    """A sampler by A1111's name or by its key, in any case: the key of SCHEDULERS."""
    key = sampler_key(text)
    if key is None:
        names = ", ".join(s.title for s in SCHEDULERS.values())
        raise argparse.ArgumentTypeError(f"unknown sampler '{text}' (choose from {names})")
    return key


REUSED = ("prompt", "negative", "seed", "steps", "cfg", "scheduler", "width", "height", "num_images")
REQUEST_FIELD = {"negative": "negative_prompt"}  # the options whose request field is named otherwise


def reused_request(args: argparse.Namespace, studio) -> GenerateRequest:
    """--reuse PNG: the image's request, with the options typed on the command line (and --box) over it; what of
    another tool's settings could not be carried over is said on one line."""
    opened = studio.open_png(args.reuse)
    if opened.note:
        print(f"note: {opened.note}", file=sys.stderr)
    given = getattr(args, "given", set())
    changes = {REQUEST_FIELD.get(name, name): getattr(args, name) for name in REUSED if name in given}
    if args.box:
        changes["layout"] = Layout(tuple(parse_box(text, i) for i, text in enumerate(args.box)))
    return dataclasses.replace(opened.request, **changes)


def parse_box(text: str, order: int) -> Region:
    """'red ball=0.1,0.2,0.5,0.9@1' → Region; '<rex>=...' binds the subject rex."""
    words, sep, rest = text.rpartition("=")
    if not sep or not words.strip():
        raise InputError(f"--box '{text}': write WORDS=x0,y0,x1,y1[@layer]")
    numbers, _, layer = rest.partition("@")
    try:
        box = tuple(float(v) for v in numbers.split(","))
        layer_index = int(layer) if layer else order
    except ValueError:
        raise InputError(f"--box '{text}': the box must be four numbers and the layer an integer") from None
    words = words.strip()
    if words.startswith("<") and words.endswith(">"):
        return Region(phrase="", box=box, subject=words[1:-1], layer=layer_index)
    return Region(phrase=words, box=box, layer=layer_index)


def build_request(args: argparse.Namespace, prompt: str | None = None, layout: Layout | None = None) -> GenerateRequest:
    """The one place where the generate options become a GenerateRequest (a relation's `--pair` gives the prompt
    and the layout)."""
    guidance = GUIDANCE_MODES[args.guidance].config
    if args.strength is not None:
        guidance = dataclasses.replace(guidance, strength=args.strength)
    if args.bound_self_attention:
        guidance = dataclasses.replace(guidance, bound_self_attention=True)
    fit = "full" if args.fit_boxes else args.fit
    if fit != "auto":  # auto is the model family's choice, made once the model is loaded (run)
        guidance = guidance.with_fit(fit)
    if args.box or layout is None:
        layout = Layout(tuple(parse_box(text, i) for i, text in enumerate(args.box)))
    if prompt is None and args.prompt is None:
        raise InputError("--prompt is required (or --relation NAME --pair A B)")
    return GenerateRequest(
        prompt=prompt if prompt is not None else args.prompt,
        negative_prompt=args.negative,
        layout=layout,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        guidance=guidance,
        references=reference_config(args),
        relation=args.relation,
        relation_scale=args.relation_scale,
        loras=tuple(LoraRef.parse(text) for text in args.lora),
    )


def reference_config(args: argparse.Namespace) -> ReferenceConfig:
    """The flags of add_reference_arguments as a ReferenceConfig (the switches, when there are any)."""
    return ReferenceConfig(
        enabled=REFERENCE_SWITCHES[getattr(args, "references", "auto")],
        strength=args.reference_strength,
        adapter=not getattr(args, "no_reference_adapter", False),
        image_guidance=args.image_guidance,
        image_guidance_growth=args.image_guidance_growth,
        start=args.start,
        start_strength=args.start_strength,
    )


def output_paths(out: str, count: int) -> list[Path]:
    """The PNG paths of `count` images, checked before anything is generated: never a folder or a special file, and
    in a folder this process can write in (a probe file is made and removed), so no image is lost after the work."""
    path = Path(out).expanduser()
    if path.suffix.lower() != ".png":
        raise InputError(f"--out {out}: Troupe writes PNG files (they carry the settings)")
    paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{k + 1}{path.suffix}") for k in range(count)]
    for each in paths:
        if each.exists() and not each.is_file():
            raise InputError(f"--out {out}: {each} is a folder or a special file, not a PNG file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folders that saving will make
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"--out {out}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise InputError(f"--out {out}: cannot write in {folder} ({error.strerror or error})") from None
    return paths


def run(args: argparse.Namespace) -> int:
    studio = studio_for(args)
    if args.reuse:
        request = reused_request(args, studio)
    elif args.pair:
        if not args.relation:
            raise InputError("--pair A B fills a relation's template: name it with --relation")
        prompt, layout = studio.apply_relation(args.relation, list(args.pair), args.prompt or "")
        request = build_request(args, prompt, layout)
    else:
        request = build_request(args)
    paths = output_paths(args.out, request.num_images)  # before the model loads (with_default_fit loads it)
    if not args.reuse and args.fit == "auto" and not args.fit_boxes:
        chosen = studio.with_default_fit(request)
        if chosen != request:
            fit = chosen.guidance.fit_name
            print(f"box fitting: {fit}, this model's default with boxes ({BOX_FITS[fit].about}; --fit off skips it)")
        request = chosen
    result = studio.generate(request, on_progress=print_progress)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for image, seed, path in zip(result.images, result.seeds, paths):
        studio.save_png(image, path)
        print(f"{path}  seed {seed}")
    print(f"{result.timings['total']:.2f}s", file=sys.stderr)
    return 0
