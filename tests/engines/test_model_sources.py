"""Model sources (engines/model_sources.py): single-file checkpoints read offline with shipped configs, the shipped
config sets themselves, --vae, fp16 variants, and the line for a missing Hub model.

What is verified where: the tiny SD 1.5 and SDXL checkpoints are written in the original (ldm) key layout by
tests/ldm_layout.py and loaded through load_model with a tiny config set laid out as engines/model_configs/ is (the
real configs describe billion-weight models no test can hold); the real config sets are checked on their own: the
architectures they build have the published parameter counts, and the shipped BPE tokenizes as CLIP does.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

import engines.model_sources as sources
from engines.models import load_model
from engines.types import InputError, ModelSpec
from tests.ldm_layout import ldm_checkpoint, ldm_vae
from tests.tiny_models import tiny_sd15, tiny_sdxl, tiny_tokenizer


@pytest.fixture
def offline(monkeypatch):
    """Any connection attempt fails the test: "loads with no network" is checked, not assumed."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_sdxl_two_widths():
    """Tiny SDXL whose second encoder is wider than the first, as in SDXL (768 and 1280): diffusers tells the two
    encoders of a single file apart by width."""
    from diffusers import UNet2DConditionModel

    pipe = tiny_sdxl()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(1)
    wide = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=48,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=48,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    )
    torch.manual_seed(0)
    config = {**pipe.unet.config, "cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 48}
    unet = UNet2DConditionModel.from_config(config)
    pipe.register_modules(text_encoder_2=wide, unet=unet)
    return pipe


def config_set(pipe, folder):
    """A config set laid out as engines/model_configs/<kind>/ (configs only, no weights), tokenizers included."""
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_vocabulary"):
            component.save_pretrained(folder / name)
        elif hasattr(component, "save_config"):
            component.save_config(folder / name)
        else:
            component.config.save_pretrained(folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """(configs root, sd15 file, sd15 pipe, sdxl file, sdxl pipe)."""
    root = tmp_path_factory.mktemp("configs")
    out = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for kind, build in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl_two_widths)):
        pipe = build()
        config_set(pipe, root / kind)
        save_file(ldm_checkpoint(pipe), out / f"{kind}.safetensors")
        made[kind] = (out / f"{kind}.safetensors", pipe)
    return root, made


def assert_same_weights(loaded, original, names):
    for name in names:
        theirs = getattr(original, name).state_dict()
        mine = getattr(loaded, name).state_dict()
        assert set(mine) == set(theirs), name
        for key, value in theirs.items():
            assert torch.equal(mine[key], value), f"{name}.{key}"


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_single_file_checkpoint_loads_offline_with_every_weight(kind, tiny_files, offline, monkeypatch):
    root, made = tiny_files
    path, original = made[kind]
    monkeypatch.setattr(sources, "CONFIGS_DIR", root)
    bundle = load_model(ModelSpec(str(path), device="cpu"))
    assert bundle.family == kind and bundle.is_xl == (kind == "sdxl")
    encoders = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]
    assert_same_weights(bundle.pipe, original, ["unet", "vae", *encoders])
    assert bundle.pipe.tokenizer.get_vocab() == original.tokenizer.get_vocab()


def test_the_checkpoints_kind_comes_from_its_keys(tmp_path):
    conv = {sources.UNET + "input_blocks.0.0.weight": torch.zeros(3, 4, 1, 1)}

    def kind(keys, name="m.safetensors", **options):
        save_file({**conv, **{k: torch.zeros(2) for k in keys}}, tmp_path / name)
        return sources.checkpoint_kind(tmp_path / name, **options)

    assert kind(["cond_stage_model.transformer.text_model.x"]) == "sd15"
    assert kind(["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"]) == "sdxl"
    assert kind(["cond_stage_model.model.x"]) == "sd2"
    assert kind(["cond_stage_model.model.x", "v_pred"]) == "sd2-v"
    (tmp_path / "y.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert kind(["cond_stage_model.model.x"], "y.safetensors") == "sd2-v"
    with pytest.raises(InputError, match="is a sdxl checkpoint, but the family sd15"):
        kind(["conditioner.embedders.1.model.x"], family="sd15")
    with pytest.raises(InputError, match="not a whole SD 1.5, SD 2.x or SDXL checkpoint"):
        kind(["lora_unet_down_blocks_0.alpha"])


def test_sd2_v_prediction_is_read_from_the_weights_spread(tmp_path):
    """ComfyUI's statistic: the norm bias of the last output block spreads wider in v models."""
    for spread, expected in ((0.2, "sd2-v"), (0.01, "sd2")):
        probe = torch.randn(320, generator=torch.Generator().manual_seed(0)) * spread
        tensors = {sources.UNET + "input_blocks.0.0.weight": torch.zeros(3, 4, 1, 1),
                   "cond_stage_model.model.x": torch.zeros(2), sources.V_PROBE_KEY: probe}  # fmt: skip
        save_file(tensors, tmp_path / "m.safetensors")
        assert sources.checkpoint_kind(tmp_path / "m.safetensors") == expected


def test_inpainting_checkpoints_are_refused_in_one_line(tmp_path):
    tensors = {
        sources.UNET + "input_blocks.0.0.weight": torch.zeros(3, 9, 1, 1),
        "cond_stage_model.model.x": torch.zeros(1),
    }
    save_file(tensors, tmp_path / "inpaint.safetensors")
    with pytest.raises(InputError, match="9 input channels"):
        load_model(ModelSpec(str(tmp_path / "inpaint.safetensors"), device="cpu"))


def test_the_shipped_tokenizers_are_clips(offline):
    """The BPE shipped once builds the 49,408-token CLIP vocabulary; SD 2.x and SDXL's second tokenizer pad with !."""
    clip = sources.shipped_tokenizer(sources.CONFIGS_DIR / "sd15" / "tokenizer")
    assert len(clip) == 49408
    assert clip("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP's published ids
    assert clip.pad_token_id == 49407
    assert sources.shipped_tokenizer(sources.CONFIGS_DIR / "sd2" / "tokenizer").pad_token_id == 0  # "!"
    assert sources.shipped_tokenizer(sources.CONFIGS_DIR / "sdxl" / "tokenizer_2").pad_token == "!"


# Parameter counts of the published models (UNet, VAE, text encoder[s]): the configs build exactly those networks.
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, [123_060_480]),
    "sd2": (865_910_724, 83_653_863, [340_387_840]),
    "sd2-v": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("kind", sorted(PUBLISHED))
def test_the_shipped_configs_build_the_published_architectures(kind):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = sources.CONFIGS_DIR / kind
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == sources.CHECKPOINT_KINDS[kind].pipeline.__name__

    def count(model):
        return sum(p.numel() for p in model.parameters())

    with init_empty_weights():  # on the meta device: shapes only, no memory
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = [
            (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(
                CLIPTextConfig.from_pretrained(folder / name)
            )
            for name in ("text_encoder", "text_encoder_2")
            if (folder / name).is_dir()
        ]
    assert (count(unet), count(vae), [count(e) for e in encoders]) == PUBLISHED[kind]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == ("v_prediction" if kind == "sd2-v" else "epsilon")


@pytest.mark.parametrize("layout", ["single file", "folder"])
def test_a_vae_replaces_the_models_own(layout, tiny_files, tmp_path, offline, monkeypatch):
    from diffusers import AutoencoderKL

    root, made = tiny_files
    monkeypatch.setattr(sources, "CONFIGS_DIR", root)
    torch.manual_seed(7)
    other = AutoencoderKL.from_config(made["sd15"][1].vae.config)
    if layout == "folder":
        other.save_pretrained(tmp_path / "vae")
        source = tmp_path / "vae"
    else:  # an A1111 VAE file: the original keys with no prefix
        source = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in ldm_vae(other).items()}, source)
    bundle = load_model(ModelSpec(str(made["sd15"][0]), device="cpu", vae=str(source)))
    for key, value in other.state_dict().items():
        assert torch.equal(bundle.pipe.vae.state_dict()[key], value), key


def test_a_pickled_vae_is_refused(tiny_sd15_dir, tmp_path):
    (tmp_path / "vae.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="only from .safetensors"):
        load_model(ModelSpec(str(tiny_sd15_dir), device="cpu", vae=str(tmp_path / "vae.pt")))


def test_fp16_loads_ask_for_the_fp16_variant_and_fall_back(tmp_path, offline):
    plain, variant = tiny_sd15(), tiny_sd15()
    with torch.no_grad():
        variant.unet.conv_in.bias.fill_(0.5)  # tells the variant's files from the plain ones
    plain.save_pretrained(tmp_path / "both")
    variant.save_pretrained(tmp_path / "both", variant="fp16")
    plain.save_pretrained(tmp_path / "plain")
    kwargs = {"dtype": torch.float16, "local_files_only": True}
    both = sources.pretrained_pipeline(tmp_path / "both", kwargs)
    assert torch.all(both.unet.conv_in.bias == 0.5) and both.unet.dtype == torch.float16
    fallback = sources.pretrained_pipeline(tmp_path / "plain", kwargs)
    assert torch.equal(fallback.unet.conv_in.bias, plain.unet.conv_in.bias.half())
    fp32 = sources.pretrained_pipeline(tmp_path / "both", {"dtype": torch.float32, "local_files_only": True})
    assert torch.equal(fp32.unet.conv_in.bias, plain.unet.conv_in.bias)  # fp32 reads the plain files


def test_a_missing_hub_model_names_the_id_and_the_command(tmp_path):
    hub = sources.missing_model_message("someone/some-model", OSError("offline"))
    assert "someone/some-model" in hub and "hf download someone/some-model" in hub and "\n" not in hub
    local = sources.missing_model_message(str(tmp_path), OSError("broken"), local=True)
    assert "download" not in local and str(tmp_path) in local


def test_cli_model_arguments_carry_the_vae_embeddings_and_compile():
    from studio.__main__ import build_parser
    from studio.cli.common import model_spec, with_model_extras

    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "x",
            "--vae",
            "v.safetensors",
            "--embedding",
            "a.safetensors",
            "--embedding",
            "b.safetensors",
        ]
    )
    spec = model_spec(args)
    assert spec.vae == "v.safetensors" and spec.embeddings == ("a.safetensors", "b.safetensors")
    assert not spec.compile
    ui = build_parser().parse_args(["ui", "--embedding", "a.safetensors", "--vae", "vae", "--compile"])
    expected = ModelSpec(vae="vae", embeddings=("a.safetensors",), compile=True)
    assert with_model_extras(ModelSpec(), ui) == expected
