"""ModelSpec → a loaded diffusers pipeline with its family, device, dtype and text-encoder fingerprint."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from engines.compiled_unet import compile_unet
from engines.embeddings import Embedding, load_embeddings
from engines.model_sources import load_single_file, load_vae, missing_model_message, pretrained_pipeline
from engines.types import InputError, ModelSpec
from engines.types.tables import QUANTIZATIONS, Quantization

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo_model"
DEMO_REFERENCE_ADAPTER = DEMO_MODEL_DIR / "reference_adapter.safetensors"  # made by `studio references train`
NATIVE_SIZE = {"sd15": 512, "sd2": 512, "sdxl": 1024}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ModelBundle:
    """A loaded pipeline and what the engines need to know about it."""

    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline
    spec: ModelSpec
    family: str
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    pending_adapter: Path | None = None  # the demo model's reference adapter, attached on first use (see below)
    embeddings: tuple[Embedding, ...] = ()  # textual inversions, written in prompts as engines/embeddings.py says

    @property
    def is_xl(self) -> bool:
        return isinstance(self.pipe, StableDiffusionXLPipeline)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if e is not None]

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    @property
    def native_size(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def vae_roundtrip(self, image: np.ndarray) -> np.ndarray:
        """An RGB image (H, W, 3) uint8 encoded and decoded by the VAE: the most any latent of this model can show."""
        vae = self.pipe.vae
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(vae.device, vae.dtype) / 127.5 - 1  # (1, 3, H, W)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample  # (1, 3, H, W)
        return ((decoded[0].permute(1, 2, 0).float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy()


def load_model(spec: ModelSpec) -> ModelBundle:
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    device = resolve_device(spec.device)
    dtype = _resolve_dtype(spec.dtype, device)
    _check_accelerator_options(spec, device)
    pipe = _load_pipeline(spec, dtype)
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise InputError(f"model '{spec.source}' is a {type(pipe).__name__}; Troupe runs SD 1.5, SD 2.x and SDXL")
    family = spec.family or detect_family(pipe, spec.source)
    adapter = reference_adapter_path(spec, family)
    if adapter is not None and spec.reference_adapter != "auto":
        from engines.reference_adapter import load_adapter  # peft: imported only when there is an adapter

        load_adapter(pipe.unet, adapter)  # a file the person named: its errors now, not at the first picture
    if spec.vae is not None:
        pipe.vae = load_vae(spec.vae, family, dtype)
    _place(pipe, spec, device)
    if spec.compile:
        compile_unet(pipe.unet)  # the graphs are built at the first image of each size
    pipe.set_progress_bar_config(disable=True)
    # The fingerprint is taken before embeddings add rows: a subject fits the encoder, whatever words are added to it.
    fingerprint = text_encoder_fingerprint(pipe)
    embeddings = load_embeddings(pipe, spec.embeddings)
    # The demo model's own adapter waits for the first request that reads photos (engines/references.py): building
    # peft's LoRA layers is start-up work that most runs of `studio generate` would do for nothing.
    pending = adapter if spec.reference_adapter == "auto" else None
    return ModelBundle(pipe, spec, family, device, dtype, fingerprint, pending, embeddings)


def reference_adapter_path(spec: ModelSpec, family: str) -> Path | None:
    """The reference adapter to attach: the file asked for, or with "auto" the demo model's own (when shipped)."""
    if spec.reference_adapter == "none":
        return None
    if spec.reference_adapter == "auto":
        return DEMO_REFERENCE_ADAPTER if family == "demo" and DEMO_REFERENCE_ADAPTER.is_file() else None
    return Path(spec.reference_adapter)


def detect_family(pipe: DiffusionPipeline, source: str) -> str:
    """From the config, not the name: XL has two encoders; SD 2.x has the 1024-wide OpenCLIP-H encoder."""
    if source == "demo" or Path(source).resolve() == DEMO_MODEL_DIR:
        return "demo"
    if isinstance(pipe, StableDiffusionXLPipeline):
        return "sdxl"
    return "sd2" if pipe.text_encoder.config.hidden_size == 1024 else "sd15"


def text_encoder_fingerprint(pipe: DiffusionPipeline) -> str:
    """A short hash of the text encoders' configs and weights: a subject only fits the encoder it was trained on."""
    digest = hashlib.sha256()
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is None:
            continue
        config = {k: v for k, v in encoder.config.to_dict().items() if k != "quantization_config"}  # same weights
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        embedding = encoder.get_input_embeddings().weight.detach()
        digest.update(embedding.float().sum(dim=1).cpu().numpy().round(3).tobytes())  # robust to dtype casts
    return digest.hexdigest()[:16]


def resolve_device(device: str = "auto") -> torch.device:
    """auto: the CUDA GPU when there is one, else the CPU; a CUDA device asked for on a machine without one is an
    InputError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device '{device}' asked for, but this machine has no CUDA GPU (use --device cpu)")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # torch's own message lists dozens of device types this app never runs on
        raise InputError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device '{device}': Troupe runs on cpu, cuda or mps")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise InputError(f"device '{device}': this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == "fp16" and device.type == "cpu":
        raise InputError("fp16 needs a GPU; on a CPU use fp32 (or bf16)")
    return TORCH_DTYPES[dtype]


def _check_accelerator_options(spec: ModelSpec, device: torch.device) -> None:
    quantization = QUANTIZATIONS[spec.quantization]
    if quantization.cuda_only and device.type != "cuda":
        cpu = ", ".join(k for k, q in QUANTIZATIONS.items() if q.backend and not q.cuda_only)
        raise InputError(f"{spec.quantization} quantization needs a CUDA GPU; on {device.type} use {cpu}")
    if quantization.backend and importlib.util.find_spec(quantization.backend) is None:
        raise InputError(
            f"{spec.quantization} quantization needs {quantization.backend}: pip install {quantization.backend}"
        )
    if spec.offload != "none" and device.type != "cuda":
        raise InputError(f"{spec.offload} offload moves weights between CPU and GPU; it needs a CUDA GPU")


def _load_pipeline(spec: ModelSpec, dtype: torch.dtype, components: dict | None = None) -> DiffusionPipeline:
    """The pipeline of spec.source; `components` already loaded are passed in instead of loaded again."""
    source = str(DEMO_MODEL_DIR) if spec.source == "demo" else spec.source
    kwargs = {"dtype": dtype, **_quantization_kwargs(spec), **(components or {})}
    path = Path(source).expanduser()
    if spec.source == "demo" and not (path / "model_index.json").exists():
        raise InputError(f"the demo model is missing from {path}; rebuild it: python -m demo_world.train")
    try:
        if path.is_dir():
            if not (path / "model_index.json").exists():
                raise InputError(f"{path} is not a diffusers model folder (no model_index.json)")
            return pretrained_pipeline(path, {"local_files_only": True, **kwargs})
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise InputError(f"model file {path} does not exist")
            return load_single_file(path, spec, kwargs)
        if path.suffix in (".ckpt", ".pt", ".bin", ".pth"):
            raise InputError(f"{path.name}: Troupe loads weights only from .safetensors (pickle files can run code)")
        if path.exists():  # a file, but neither a model folder nor a .safetensors file
            raise InputError(f"{path} is not a model: give a diffusers folder, a .safetensors file or a Hub id")
        if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1:
            raise InputError(f"model path {path} does not exist")
        return pretrained_pipeline(source, kwargs)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as error:  # KeyError: a model_index.json without its fields
        raise InputError(missing_model_message(source, error, local=path.exists())) from error


def _quantization_kwargs(spec: ModelSpec) -> dict:
    """diffusers' pipeline quantization config for a row of QUANTIZATIONS: the UNet by diffusers' config class of the
    backend, the text encoders (when the row asks) by transformers' class of the same name and arguments."""
    quantization = QUANTIZATIONS[spec.quantization]
    if quantization.backend is None:
        return {}
    import diffusers
    import transformers
    from diffusers.quantizers import PipelineQuantizationConfig

    name, options = _backend_options(quantization)
    mapping = {"unet": getattr(diffusers, name)(**options)}
    if quantization.text_encoders:
        mapping |= {encoder: getattr(transformers, name)(**options) for encoder in TEXT_ENCODERS}
    return {"quantization_config": PipelineQuantizationConfig(quant_mapping=mapping)}


def _backend_options(quantization: Quantization) -> tuple[str, dict]:
    """The config class (the same name in diffusers and transformers) and its arguments for a row of QUANTIZATIONS."""
    if quantization.backend == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig

        # weight-only: activations stay float, so it runs on any device and gradients reach the inputs (registration
        # and box fitting backpropagate through the frozen UNet)
        return "TorchAoConfig", {"quant_type": Int8WeightOnlyConfig()}
    if quantization.weights == "int8":
        return "BitsAndBytesConfig", {"load_in_8bit": True}
    return "BitsAndBytesConfig", {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether any weight of `module` is stored quantized (bitsandbytes parameters, torchao tensor subclasses)."""
    return any(type(p) not in (torch.Tensor, torch.nn.Parameter) for p in module.parameters())


def float_text_encoders(bundle: ModelBundle) -> list[torch.nn.Module]:
    """The bundle's text encoders in float: themselves, or when they were quantized (for generation only) a float
    copy loaded again from the model's source, with the UNet and VAE already loaded passed in so they are not."""
    if not any(is_quantized(e) for e in bundle.text_encoders):
        return bundle.text_encoders
    pipe = bundle.pipe
    reuse = {k: v for k, v in pipe.components.items() if k not in TEXT_ENCODERS and v is not None}
    plain = _load_pipeline(replace(bundle.spec, quantization="none"), torch.float32, reuse)
    return [getattr(plain, name) for name in TEXT_ENCODERS if getattr(plain, name, None) is not None]


def _place(pipe: DiffusionPipeline, spec: ModelSpec, device: torch.device) -> None:
    if spec.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif spec.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
