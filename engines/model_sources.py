"""Where a model's weights come from, with no network beyond what the person asked for.

- Single-file checkpoints (A1111/ComfyUI `.safetensors`, the original ldm key layout): the kind is read from the
  file's keys, and diffusers' `from_single_file` builds the pipeline from the config set that ships with Troupe in
  engines/model_configs/ (`config=` a local folder, `local_files_only=True`) — left alone it would fetch those configs
  from the Hub. The CLIP tokenizers are built from the one BPE file shipped there (see its README).
- `--vae`: a diffusers VAE folder or a single `.safetensors` VAE (read with the family's shipped VAE config).
- Hub and local diffusers folders: the fp16 weight variant when the dtype is fp16, the plain weights when the repo
  has no such variant.
- The one line that says how to fetch a Hub model this machine does not have.
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from engines.types import InputError

CONFIGS_DIR = Path(__file__).resolve().parent / "model_configs"
CLIP_BPE = "clip/bpe_simple_vocab_16e6.txt.gz"  # under CONFIGS_DIR
PICKLE_SUFFIXES = (".ckpt", ".pt", ".bin", ".pth")
TOKENIZER_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")
UNET = "model.diffusion_model."
# ComfyUI's test for SD 2.x v-prediction (comfy/supported_models.py, SD20.model_type): the weights of ε and v models
# have the same shapes, but this norm bias spreads wider in the v models. ComfyUI's own comment doubts it; a `v_pred`
# key or an A1111 sidecar .yaml, when present, decide first.
V_PROBE_KEY = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_PROBE_STD = 0.09


@dataclass(frozen=True)
class CheckpointKind:
    family: str
    pipeline: type[DiffusionPipeline]
    tokenizers: tuple[str, ...]
    about: str  # the published model whose configs model_configs/<key>/ holds


# One row per kind of single-file checkpoint; the key names the config set in model_configs/.
CHECKPOINT_KINDS: dict[str, CheckpointKind] = {
    "sd15": CheckpointKind("sd15", StableDiffusionPipeline, ("tokenizer",), "stable-diffusion-v1-5"),
    "sd2": CheckpointKind("sd2", StableDiffusionPipeline, ("tokenizer",), "stable-diffusion-2-1-base (512, ε)"),
    "sd2-v": CheckpointKind("sd2", StableDiffusionPipeline, ("tokenizer",), "stable-diffusion-2-1 (768, v)"),
    "sdxl": CheckpointKind(
        "sdxl", StableDiffusionXLPipeline, ("tokenizer", "tokenizer_2"), "stable-diffusion-xl-base-1.0"
    ),
}
# Text-encoder key prefixes of the original layouts: the surest sign of the family (shapes vary with fine-tunes).
TEXT_ENCODER_PREFIXES = (
    ("conditioner.embedders.1.", "sdxl"),  # CLIP ViT-L + OpenCLIP ViT-bigG
    ("cond_stage_model.model.", "sd2"),  # OpenCLIP ViT-H
    ("cond_stage_model.transformer.", "sd15"),  # CLIP ViT-L
)


def load_single_file(path: Path, spec, kwargs: dict, configs: Path | None = None) -> DiffusionPipeline:
    """The pipeline of a single-file checkpoint, built offline from the shipped config set of its kind. `configs`:
    another root of config sets (tests ship tiny ones laid out the same way)."""
    kind_key = checkpoint_kind(path, spec.family)
    kind, folder = CHECKPOINT_KINDS[kind_key], (configs or CONFIGS_DIR) / kind_key
    tokenizers = {name: shipped_tokenizer(folder / name) for name in kind.tokenizers}
    try:
        return kind.pipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, **tokenizers, **kwargs
        )
    except torch.OutOfMemoryError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, RuntimeError, ValueError) as error:
        raise InputError(
            f"{path.name}: read as {kind.about}, but its weights do not fit ({type(error).__name__}: {error})"[:300]
        ) from None


def checkpoint_kind(path: Path, family: str | None = None) -> str:
    """The row of CHECKPOINT_KINDS for a single-file checkpoint, from its key names (and for SD 2.x, ε or v)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            keys = set(weights.keys())
            first_conv = (
                weights.get_slice(UNET + "input_blocks.0.0.weight")
                if UNET + "input_blocks.0.0.weight" in keys
                else None
            )
            in_channels = first_conv.get_shape()[1] if first_conv is not None else None
    except Exception as error:  # safetensors' own error types: not a safetensors file at all
        raise InputError(f"{path.name}: not a readable safetensors file ({type(error).__name__})") from None
    found = next((kind for prefix, kind in TEXT_ENCODER_PREFIXES if any(k.startswith(prefix) for k in keys)), None)
    if in_channels is None or found is None:
        raise InputError(
            f"{path.name}: not a whole SD 1.5, SD 2.x or SDXL checkpoint (no UNet or text encoder in the original "
            "layout; a LoRA, VAE or UNet-only file?)"
        )
    if in_channels != 4:
        raise InputError(
            f"{path.name}: a UNet with {in_channels} input channels (inpainting?); Troupe runs text-to-image"
        )
    if family not in (None, found):
        raise InputError(f"{path.name} is a {found} checkpoint, but the family {family} was asked for")
    if found == "sd2" and _is_v_prediction(path, keys):
        return "sd2-v"
    return found


def _is_v_prediction(path: Path, keys: set[str]) -> bool:
    if "v_pred" in keys:  # the marker some trainers (and ComfyUI's saver) write
        return True
    sidecar = path.with_suffix(".yaml")  # A1111: the original config beside the checkpoint
    if sidecar.is_file():
        import yaml

        try:
            params = yaml.safe_load(sidecar.read_text(encoding="utf-8"))["model"]["params"]
        except (yaml.YAMLError, KeyError, TypeError, UnicodeDecodeError):
            raise InputError(f"{sidecar.name}: not an ldm model config (model.params is missing)") from None
        return params.get("parameterization") == "v"
    if V_PROBE_KEY not in keys:
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as weights:
        probe = weights.get_tensor(V_PROBE_KEY).float()
    return torch.std(probe, unbiased=False).item() > V_PROBE_STD


@functools.cache
def _clip_bpe(path: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """OpenAI CLIP's byte-level BPE file turned into a vocab and merges, as CLIP's simple_tokenizer.py builds them:
    the 256 byte symbols, the same with the end-of-word mark, one token per merge (the file's first 48,894), then
    the two special tokens — 49,408 tokens, the vocab.json of every SD tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1])
    symbols = list(bytes_to_unicode().values())
    vocab = (
        symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    )
    return {token: i for i, token in enumerate(vocab)}, merges


def shipped_tokenizer(folder: Path):
    """A CLIPTokenizer from a config set's tokenizer folder: its own files (tokenizer.json, or vocab.json and
    merges.txt) when it carries them, else the shipped CLIP BPE with the folder's tokenizer_config.json (SD 2.x
    and SDXL's second tokenizer pad with "!", the others with <|endoftext|>)."""
    from transformers import CLIPTokenizer

    if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    where = f"{folder.parent.name}/{folder.name}/tokenizer_config.json"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"model config {where} is missing or broken ({type(error).__name__})") from None
    unknown = set(config) - set(TOKENIZER_KEYS)
    if not isinstance(config, dict) or unknown:
        raise InputError(f"model config {where}: unknown keys {sorted(unknown)} (allowed: {', '.join(TOKENIZER_KEYS)})")
    vocab, merges = _clip_bpe(CONFIGS_DIR / CLIP_BPE)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), **config)


def load_vae(source: str, family: str, dtype: torch.dtype, configs: Path | None = None) -> AutoencoderKL:
    """--vae: a diffusers VAE folder (config.json and weights) or a single .safetensors file in either key layout,
    read with the shipped VAE config of the model's family (SDXL's scales latents by 0.13025, SD's by 0.18215)."""
    path = Path(source).expanduser()
    if path.suffix in PICKLE_SUFFIXES:
        raise InputError(f"--vae {path.name}: Troupe loads weights only from .safetensors (pickle files can run code)")
    if family == "demo":
        raise InputError("--vae replaces a Stable Diffusion VAE; the demo model's own VAE is part of it")
    try:
        if path.is_dir():
            return AutoencoderKL.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        if path.suffix == ".safetensors" and path.is_file():
            folder = (configs or CONFIGS_DIR) / family
            return AutoencoderKL.from_single_file(
                str(path), config=str(folder), subfolder="vae", dtype=dtype, local_files_only=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise InputError(f"--vae {path.name}: not a VAE Troupe can read ({type(error).__name__})") from None
    raise InputError(f"--vae {source}: give a diffusers VAE folder or a .safetensors file that exists")


def pretrained_pipeline(source: str | Path, kwargs: dict) -> DiffusionPipeline:
    """from_pretrained, asking for the fp16 weight files when loading in fp16 (half the download and the disk), and
    for the plain files when the repo or folder has no fp16 variant (or it cannot be fetched)."""
    if kwargs.get("dtype") == torch.float16:
        try:
            return DiffusionPipeline.from_pretrained(source, variant="fp16", **kwargs)
        except (ValueError, OSError):  # diffusers: "no such modeling files are available" for that variant
            pass
    return DiffusionPipeline.from_pretrained(source, **kwargs)


def missing_model_message(source: str, error: Exception, local: bool = False) -> str:
    """One line for a model that would not load: a local path is named with what went wrong (fetching it again is
    not the cure); a Hub id is named with the command that fetches it."""
    if local:
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        return (
            f"could not load the model at {source} ({type(error).__name__}: {detail}); "
            "is it a complete diffusers model?"
        )
    return (
        f"could not load Hub model '{source}' ({type(error).__name__}); this machine may be offline or lack it: "
        f"fetch it where there is network with `hf download {source}` (then --model {source} works offline), or "
        f"`hf download {source} --local-dir DIR` and pass --model DIR; --model demo needs no download"
    )
