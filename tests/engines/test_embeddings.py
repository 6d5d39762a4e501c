"""Textual-inversion embeddings (engines/embeddings.py): the file formats, what loading changes in the text encoder,
the prompt rule beside `<subject>` syntax, and every refusal."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from engines.embeddings import EmbeddingWords, load_embeddings, read_embedding
from engines.models import load_model
from engines.types import InputError, ModelSpec
from tests.tiny_models import tiny_sd15, tiny_sdxl


def vectors(count: int, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


def test_an_embedding_changes_only_its_own_tokens_rows(tmp_path):
    pipe = tiny_sd15()
    table = pipe.text_encoder.get_input_embeddings().weight
    before, rows = table.detach().clone(), table.shape[0]
    with torch.no_grad():
        plain_before = pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0]
    added = vectors(2)
    (embedding,) = load_embeddings(pipe, [write(tmp_path / "EasyNeg.safetensors", {"emb_params": added})])
    after = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(list(embedding.tokens))
    assert embedding.name == "EasyNeg" and len(embedding.tokens) == 2 and ids == [rows, rows + 1]
    assert torch.equal(after[:rows], before)  # every row the model had is untouched
    assert torch.equal(after[rows:], added)  # the new rows are the file's vectors, in order
    with torch.no_grad():
        assert torch.equal(pipe.encode_prompt("a photo of a cat", "cpu", 1, False)[0], plain_before)
        with_word = pipe.encode_prompt("a photo of EasyNeg", "cpu", 1, False)[0]
    assert not torch.equal(with_word, plain_before)
    text = pipe.maybe_convert_prompt("a photo of easyneg", pipe.tokenizer)  # the pipeline's hook: both vectors
    assert pipe.tokenizer(text).input_ids[4:6] == ids


def test_the_prompt_rule_leaves_subjects_and_other_words_alone(tmp_path):
    pipe = tiny_sd15()
    (embedding,) = load_embeddings(pipe, [write(tmp_path / "bad-hands.safetensors", {"emb_params": vectors(2)})])
    words = " ".join(embedding.tokens)
    convert = pipe.maybe_convert_prompt
    assert isinstance(convert, EmbeddingWords)
    assert convert("bad-hands, a cat") == f"{words}, a cat"
    assert convert("Bad-Hands and embedding:bad-hands") == f"{words} and {words}"  # any case; ComfyUI's prefix
    assert convert("(bad-hands:1.2)") == f"({words}:1.2)"  # inside A1111 weighting
    for untouched in ("bad-hands-5", "xbad-hands", "bad-hands.v2", "bad-handsome"):
        assert convert(untouched) == untouched
    assert convert(["bad-hands", "a cat"]) == [words, "a cat"]


def test_a_subject_with_an_embeddings_name_is_refused_in_one_line(tmp_path):
    pipe = tiny_sd15()
    load_embeddings(pipe, [write(tmp_path / "rex.safetensors", {"emb_params": vectors(1)})])
    with pytest.raises(InputError, match=r"<rex> is a subject, and the embedding rex.safetensors has its name"):
        pipe.maybe_convert_prompt("a photo of <rex>", pipe.tokenizer)


def test_a_diffusers_file_is_named_by_its_token_without_brackets(tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    write(path, {"<cat-toy>": vectors(1)[0]})  # diffusers saves one (D,) vector under its token
    name, loaded = read_embedding(path)
    assert name == "cat-toy" and loaded[0].shape == (1, 32)
    write(tmp_path / "toy.safetensors", {"<cat-toy>": vectors(1)[0]})
    assert read_embedding(tmp_path / "toy.safetensors")[0] == "toy"  # any other file: its stem, as A1111


def test_an_sdxl_embedding_fills_both_encoders(tmp_path):
    pipe = tiny_sdxl()
    first, second = vectors(3, seed=1), vectors(3, seed=2)
    (embedding,) = load_embeddings(pipe, [write(tmp_path / "style.safetensors", {"clip_l": first, "clip_g": second})])
    for tokenizer, encoder, expected in ((pipe.tokenizer, pipe.text_encoder, first),
                                         (pipe.tokenizer_2, pipe.text_encoder_2, second)):  # fmt: skip
        ids = tokenizer.convert_tokens_to_ids(list(embedding.tokens))
        assert torch.equal(encoder.get_input_embeddings().weight[ids], expected)
    assert pipe.tokenizer.convert_tokens_to_ids(list(embedding.tokens)) == pipe.tokenizer_2.convert_tokens_to_ids(
        list(embedding.tokens)
    )  # the same positions in both, as the prompt parser requires


def test_an_embedding_for_another_family_is_refused(tmp_path):
    sd15_file = write(tmp_path / "one.safetensors", {"emb_params": vectors(1)})
    with pytest.raises(InputError, match=r"vectors are 32 wide; this model's text encoders take 32 \+ 32"):
        load_embeddings(tiny_sdxl(), [sd15_file])
    xl_file = write(tmp_path / "two.safetensors", {"clip_l": vectors(1), "clip_g": vectors(1, 48)})
    with pytest.raises(InputError, match=r"are 32 \+ 48 wide"):
        load_embeddings(tiny_sd15(), [xl_file])


@pytest.mark.parametrize(
    "case, message",
    [
        ("pickle", "only from .safetensors"),
        ("subject", "is a Troupe subject, not an embedding: import it with python -m studio subjects import"),
        ("old subject", "is a Troupe subject"),
        ("many", "not a textual-inversion embedding"),
        ("nan", "NaN or infinite"),
        ("ints", "1-75 float vectors"),
        ("name", "rename the file"),
        ("twice", "two embeddings are called"),
    ],
)
def test_bad_embedding_files_are_one_line(case, message, tmp_path):
    files = {
        "pickle": lambda: (tmp_path / "x.pt").write_bytes(b"\x80") and str(tmp_path / "x.pt"),
        "subject": lambda: write(tmp_path / "rex.safetensors", {"troupe.subject.format": torch.tensor([2])}),
        "old subject": lambda: write(
            tmp_path / "rex.safetensors", {"text_encoder": vectors(1)}, {"troupe_subject": "{}"}
        ),
        "many": lambda: write(tmp_path / "lora.safetensors", {"a": vectors(1), "b": vectors(1)}),
        "nan": lambda: write(tmp_path / "n.safetensors", {"emb_params": torch.full((1, 32), float("nan"))}),
        "ints": lambda: write(tmp_path / "i.safetensors", {"emb_params": torch.ones(1, 32, dtype=torch.int64)}),
        "name": lambda: write(tmp_path / "my style.safetensors", {"emb_params": vectors(1)}),
    }
    if case == "twice":
        (tmp_path / "a").mkdir()
        paths = [
            write(tmp_path / "Neg.safetensors", {"x": vectors(1)}),
            write(tmp_path / "a" / "neg.safetensors", {"x": vectors(1)}),
        ]
    else:
        paths = [files[case]()]
    with pytest.raises(InputError, match=message) as error:
        load_embeddings(tiny_sd15(), paths)
    assert "\n" not in str(error.value)


def test_the_subject_fingerprint_ignores_embeddings(sd15, tiny_sd15_dir, tmp_path):
    """Subjects registered on a model keep fitting it when embeddings are loaded beside them."""
    file = write(tmp_path / "EasyNeg.safetensors", {"emb_params": vectors(2)})
    bundle = load_model(ModelSpec(str(tiny_sd15_dir), device="cpu", embeddings=(file,)))
    assert bundle.fingerprint == sd15.fingerprint
    assert [e.name for e in bundle.embeddings] == ["EasyNeg"]
    from engines.generate import Generator
    from engines.types import GenerateRequest, Layout, Region

    layout = Layout((Region("cat", (0.0, 0.0, 0.5, 0.5)),))  # a region bound to a word after the embedding's
    request = GenerateRequest("EasyNeg a photo of a cat", negative_prompt="EasyNeg", layout=layout, steps=2,
                              width=64, height=64, seed=1)  # fmt: skip
    assert Generator(bundle)(request).images[0].size == (64, 64)
