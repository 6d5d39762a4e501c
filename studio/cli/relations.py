"""python -m studio relations {train,list,export,import,rename,delete}: relations learned from examples."""

from __future__ import annotations

import argparse
import json
import sys

from engines.types import KEYPOINT_SWITCHES, PAPER_KEYPOINT_WEIGHT, RelationTrainRequest, keypoint_weight
from studio.cli.common import add_library_argument, add_model_arguments, studio_for, train_with_progress

TRAIN_DEFAULTS = RelationTrainRequest(name="x", exemplars="x")


def add_parsers(subparsers) -> None:
    relations = subparsers.add_parser("relations", help="teach, list and manage learned relations")
    actions = relations.add_subparsers(dest="action", required=True)
    train = actions.add_parser("train", help="teach a relation from a folder of examples (relation.json + images)",
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add_model_arguments(train)
    train.add_argument("--name", required=True, help="the relation's name in the picker and for --relation")
    train.add_argument("--exemplars", required=True, help="the folder with relation.json and its images")
    train.add_argument("--steps", type=int, default=TRAIN_DEFAULTS.steps)
    train.add_argument("--rank", type=int, default=TRAIN_DEFAULTS.rank, help="the LoRA's rank")
    train.add_argument("--learning-rate", type=float, default=TRAIN_DEFAULTS.learning_rate)
    train.add_argument("--keypoints", choices=KEYPOINT_SWITCHES, default="auto",
                       help="DreamRelation's keypoint matching loss: auto (the model family's choice: off for the demo "
                       f"model, where it measured worse; on for SD), on (weight {PAPER_KEYPOINT_WEIGHT}), off")  # fmt: skip
    train.add_argument("--no-keypoints", action="store_true", help="the same as --keypoints off")
    train.add_argument("--seed", type=int, default=TRAIN_DEFAULTS.seed)
    train.set_defaults(func=run_train)
    listing = actions.add_parser("list", help="the learned relations")
    listing.add_argument("--json", action="store_true", help="one JSON object per relation")
    listing.set_defaults(func=run_list)
    export = actions.add_parser("export", help="write a relation's LoRA to one .safetensors file")
    export.add_argument("name")
    export.add_argument("--out", required=True, help="a .safetensors path")
    export.add_argument("--format", choices=("diffusers", "kohya"), default="diffusers",
                        help="diffusers: load_lora_weights reads it; kohya: A1111 and ComfyUI read it")  # fmt: skip
    export.set_defaults(func=run_export)
    imported = actions.add_parser("import", help="add a relation from a file exported by Troupe")
    imported.add_argument("file")
    imported.add_argument("--name", default=None, help="add it under another name")
    imported.set_defaults(func=run_import)
    rename = actions.add_parser("rename", help="rename a learned relation")
    rename.add_argument("old")
    rename.add_argument("new")
    rename.set_defaults(func=run_rename)
    delete = actions.add_parser("delete", help="delete a learned relation")
    delete.add_argument("name")
    delete.set_defaults(func=run_delete)
    for action in (train, listing, export, imported, rename, delete):
        add_library_argument(action)


def run_train(args: argparse.Namespace) -> int:
    request = RelationTrainRequest(
        name=args.name,
        exemplars=args.exemplars,
        steps=args.steps,
        rank=args.rank,
        learning_rate=args.learning_rate,
        keypoint_weight=None
        if args.keypoints == "auto" and not args.no_keypoints
        else keypoint_weight("", "off" if args.no_keypoints else args.keypoints),  # fmt: skip
        seed=args.seed,
    )
    info = train_with_progress(args, lambda studio, progress, cancel: studio.teach_relation(request, progress, cancel))
    first, last = (info.loss_curve[0], info.loss_curve[-1]) if info.loss_curve else (0.0, 0.0)
    print(f"learned '{info.name}' ({info.template}) from {info.examples} examples: {info.steps} steps, "
          f"{info.seconds:.0f}s, loss {first:.4f} → {last:.4f}")  # fmt: skip
    return 0


def run_list(args: argparse.Namespace) -> int:
    relations = studio_for(args, with_model=False).learned_relations()
    if not args.json and relations:
        print(f"{'NAME':<20} {'TEMPLATE':<28} {'FAMILY':<6} {'EXAMPLES':>8} {'STEPS':>6}  KEYPOINTS")
    for info in relations:
        if args.json:
            print(json.dumps({"name": info.name, "relation": info.relation, "template": info.template,
                              "family": info.family, "examples": info.examples, "steps": info.steps,
                              "rank": info.rank, "keypoint_weight": info.keypoint_weight, "lora": info.lora}))  # fmt: skip
        else:
            keypoints = "yes" if info.keypoint_weight > 0 else "no"
            print(
                f"{info.name:<20} {info.template:<28} {info.family:<6} {info.examples:>8} {info.steps:>6}  {keypoints}"
            )
    if not relations and not args.json:
        print("no relations learned yet (python -m studio relations train --help)", file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    path = studio_for(args, with_model=False).export_relation(args.name, args.out, args.format)
    print(f"wrote {path} ({args.format})")
    return 0


def run_import(args: argparse.Namespace) -> int:
    info = studio_for(args, with_model=False).import_relation(args.file, args.name)
    print(f"imported '{info.name}' ({info.template})")
    return 0


def run_rename(args: argparse.Namespace) -> int:
    info = studio_for(args, with_model=False).rename_relation(args.old, args.new)
    print(f"renamed '{args.old}' to '{info.name}'")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    studio_for(args, with_model=False).delete_relation(args.name)
    print(f"deleted '{args.name}'")
    return 0
