"""A1111 weighting and prompts past the text encoder's window: the syntax, exact token positions in the windowed
sequence (regions and subject residuals), weights that move only their own tokens, and plain short prompts that
still go through the pipeline's own encode_prompt bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import engines.generate as generate_module
from engines import metadata
from engines.generate import Generator
from engines.prompt_encoding import encode_windows, prepare_prompt, window_ids
from engines.prompt_subjects import PromptSubjects
from engines.prompt_weights import Fragment, is_plain, parse_weights
from engines.prompts import parse_prompt
from engines.types import GenerateRequest, GuidanceConfig, Layout, Region
from tests.tiny_models import tiny_tokenizer

W = 1 / 1.1


@pytest.mark.parametrize(
    "prompt, fragments",
    [
        ("a (cat:1.3) on a mat", [("a ", 1.0), ("cat", 1.3), (" on a mat", 1.0)]),
        ("(cat) and ((dog))", [("cat", 1.1), (" and ", 1.0), ("dog", 1.1 * 1.1)]),
        ("[cat] and [[dog]]", [("cat", W), (" and ", 1.0), ("dog", W * W)]),
        ("((a (red:1.5) ball:0.5))", [("a ", 0.55), ("red", 0.825), (" ball", 0.55)]),
        (r"a \(cat\) \[dog\] a\\b", [(r"a (cat) [dog] a\b", 1.0)]),
        ("(<rex>:1.3) hugging [<milo>]", [("<rex>", 1.3), (" hugging ", 1.0), ("<milo>", W)]),
        ("(a b:1) c", [("a b c", 1.0)]),
        ("(a:b) c", [("a:b", 1.1), (" c", 1.0)]),
        ("", []),
    ],
)
def test_a1111_syntax(prompt, fragments):
    parsed = parse_weights(prompt)
    assert [f.text for f in parsed] == [text for text, _ in fragments]
    assert [f.weight for f in parsed] == pytest.approx([weight for _, weight in fragments])


@pytest.mark.parametrize("prompt", ["a cat (sitting", "smile :)", "a cat) on a mat", "(a:0.5", "x:1.2) y", "a [b"])
def test_unbalanced_brackets_are_read_as_the_characters_they_are(prompt):
    """Decided: a bracket with no partner is text (A1111 also reads a lone `)` so; an unclosed `(` it would read as
    × 1.1 for the rest of the prompt). Such a prompt is plain: the pipeline encodes it exactly as before."""
    assert parse_weights(prompt) == (Fragment(prompt, 1.0),)
    assert is_plain(prompt)


def test_a_group_closed_inside_an_unclosed_bracket_still_weighs():
    assert parse_weights("[[a]") == (Fragment("[", 1.0), Fragment("a", W))


def test_any_text_parses_and_a_plain_prompt_reads_exactly_as_written():
    """Random bracket soup never raises; when the syntax says nothing (is_plain) the text is the prompt itself, so
    the pipeline may encode it as before. `[]` says something: it takes itself out of the text."""
    import random

    rng = random.Random(19)
    for _ in range(3000):
        prompt = "".join(rng.choice("()[]:\\ab1.2 <>") for _ in range(rng.randint(0, 16)))
        fragments = parse_weights(prompt)
        assert all(f.text for f in fragments)
        if is_plain(prompt):
            assert "".join(f.text for f in fragments) == prompt
    assert not is_plain("[]") and is_plain("")


def test_subject_in_a_weighted_group_keeps_its_positions_and_weight():
    tokenizer = tiny_tokenizer()
    parsed = parse_prompt(
        "a photo of (<rex>:1.3) hugging [<milo>]",
        Layout((Region("", (0, 0, 1, 1), subject="rex"), Region("hugging", (0, 0, 1, 1)))),
        {"rex": "dog", "milo": "cat"},
        [tokenizer],
    )
    assert parsed.text == "a photo of dog hugging cat" and not parsed.plain
    assert [(s.name, s.positions, round(s.weight, 4)) for s in parsed.subjects] == [
        ("rex", (4,), 1.3),
        ("milo", (6,), round(W, 4)),
    ]
    assert parsed.region_positions == ((4,), (5,))


# --- encoding ---------------------------------------------------------------------------------------------------


def encode_directly(bundle, prompt: str, negative: str = "", cfg: bool = True) -> dict:
    """The pipeline's own encode_prompt, as Troupe called it before prompts were weighted or windowed."""
    pipe, device = bundle.pipe, bundle.device
    if bundle.is_xl:
        out = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                                 negative_prompt=negative or None)  # fmt: skip
        return dict(zip(["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                         "negative_pooled_prompt_embeds"], out))  # fmt: skip
    return dict(
        zip(["prompt_embeds", "negative_prompt_embeds"], pipe.encode_prompt(prompt, device, 1, cfg, negative or None))
    )


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_plain_short_prompts_are_encoded_by_the_pipeline_bit_for_bit(family, request):
    bundle = request.getfixturevalue(family)
    for prompt, negative in [("a photo of dog on the beach", ""), ("a cat (sitting", "blurry sky")]:
        prepared = prepare_prompt(bundle, GenerateRequest(prompt, negative_prompt=negative), PromptSubjects())
        for key, expected in encode_directly(bundle, prompt, negative).items():
            assert torch.equal(prepared.embeds[key], expected), key


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_windowed_encoding_of_a_plain_prompt_matches_the_pipeline(family, request):
    """The windowed path reads one window exactly as encode_prompt does (same ids, same layer, same pooled)."""
    bundle = request.getfixturevalue(family)
    prompt = "a photo of dog on the beach"
    parsed = parse_prompt(prompt, Layout(()), {}, bundle.tokenizers)
    embeds, pooled = encode_windows(bundle, parsed.tokens, 1)
    expected = encode_directly(bundle, prompt)
    assert torch.allclose(embeds, expected["prompt_embeds"], atol=1e-6, rtol=0)
    if bundle.is_xl:
        assert torch.allclose(pooled, expected["pooled_prompt_embeds"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_weights_move_only_the_weighted_tokens(family, request):
    """compel's formula: a token of weight w becomes e + (z − e)·w, e the empty prompt's output at its place."""
    bundle = request.getfixturevalue(family)
    weighted = prepare_prompt(bundle, GenerateRequest("a photo of (dog:1.5) on [the beach]"), PromptSubjects())
    unweighted = prepare_prompt(bundle, GenerateRequest("a photo of (dog:1) on (the beach:1)"), PromptSubjects())
    difference = (weighted.embeds["prompt_embeds"] - unweighted.embeds["prompt_embeds"])[0]  # (T, ΣD)
    assert difference.abs().sum(-1).nonzero().flatten().tolist() == [4, 6, 7]  # BOS a photo of dog on the beach
    empty, _ = encode_windows(bundle, parse_prompt("", Layout(()), None, bundle.tokenizers).tokens, 1)
    z, e = unweighted.embeds["prompt_embeds"][0], empty[0]
    assert torch.allclose(weighted.embeds["prompt_embeds"][0, 4], e[4] + (z[4] - e[4]) * 1.5, atol=1e-5)
    assert torch.allclose(weighted.embeds["prompt_embeds"][0, 6], e[6] + (z[6] - e[6]) * W, atol=1e-5)
    assert torch.equal(weighted.embeds["negative_prompt_embeds"], unweighted.embeds["negative_prompt_embeds"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_positive_and_negative_get_the_same_number_of_windows(family, request):
    bundle = request.getfixturevalue(family)
    long_negative = "grass, " * 60  # 120 tokens: two windows
    prepared = prepare_prompt(bundle, GenerateRequest("a dog", negative_prompt=long_negative), PromptSubjects())
    assert prepared.embeds["prompt_embeds"].shape == prepared.embeds["negative_prompt_embeds"].shape
    assert prepared.num_tokens == 2 * 77
    empty, _ = encode_windows(bundle, parse_prompt("", Layout(()), None, bundle.tokenizers).tokens, 1)
    assert torch.equal(prepared.embeds["prompt_embeds"][:, 77:], empty)  # the padding window: BOS, EOS, padding
    if bundle.is_xl:  # an empty negative prompt stays SDXL's zeros, however long the prompt
        zeros = prepare_prompt(bundle, GenerateRequest("a dog " * 60), PromptSubjects()).embeds
        assert zeros["negative_prompt_embeds"].shape[1] == 2 * 77 and not zeros["negative_prompt_embeds"].any()
        assert not zeros["negative_pooled_prompt_embeds"].any()


# --- a 300-token weighted prompt, generated with regions and a subject ----------------------------------------------

FILLER = "the sky at night over the grass and the sand, "  # 11 tokens, none of them a region's word
LONG_PROMPT = (
    "(a red ball:1.2) on the beach, "
    + FILLER * 13
    + "(<rex>:1.3) hugging [a cat], "
    + FILLER * 13
    + "((a blue box)) next to a tent"
)
LAYOUT = Layout(
    (
        Region("red ball", (0.0, 0.0, 0.5, 0.5)),
        Region("", (0.5, 0.0, 1.0, 0.5), subject="rex", layer=1),
        Region("cat", (0.0, 0.5, 0.5, 1.0)),
        Region("blue box", (0.5, 0.5, 1.0, 1.0)),
    )
)


def residual_subjects(bundle, with_residual: bool = True) -> PromptSubjects:
    keys = ("text_encoder", "text_encoder_2")
    deltas = {k: torch.linspace(-1, 1, e.config.hidden_size)[None] for k, e in zip(keys, bundle.text_encoders)}
    return PromptSubjects({"rex": "dog"}, {"rex": deltas} if with_residual else {})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_300_token_weighted_prompt_keeps_regions_and_residuals_on_their_words(family, request, monkeypatch, tmp_path):
    bundle = request.getfixturevalue(family)
    subjects = residual_subjects(bundle)
    asked = GenerateRequest(LONG_PROMPT, negative_prompt="blurry", layout=LAYOUT, seed=3, steps=2,
                            guidance=GuidanceConfig(strength=2.0))  # fmt: skip
    prepared = Generator(bundle).prepare_prompt(asked, subjects)
    parsed = prepared.parsed
    assert len(parsed.tokens[0].ids) >= 300 and parsed.windows == 5 and prepared.num_tokens == 5 * 77
    assert prepared.embeds["negative_prompt_embeds"].shape == prepared.embeds["prompt_embeds"].shape

    # Every region's positions index its own words in the concatenated sequence, in every encoder's windows.
    phrases = ["red ball", "dog", "cat", "blue box"]
    for tokenizer, tokens in zip(bundle.tokenizers, parsed.tokens):
        ids, _ = window_ids(tokenizer, tokens, parsed.windows)
        for phrase, positions in zip(phrases, parsed.region_positions):
            words = tokenizer(phrase, add_special_tokens=False).input_ids
            assert ids[list(positions)].tolist() == words, phrase
    rex = parsed.subjects[0]
    assert rex.positions == parsed.region_positions[1] and rex.positions[0] > 2 * 77  # in the third window
    assert parsed.region_positions[3] == (3 * 77 + 1 + 74, 4 * 77 + 1)  # "blue | box": split by the 4th window's end

    # The residual lands on rex's class word only, scaled with its group's weight.
    plain = Generator(bundle).prepare_prompt(asked, residual_subjects(bundle, with_residual=False))
    difference = (prepared.embeds["prompt_embeds"] - plain.embeds["prompt_embeds"])[0]  # (T, ΣD)
    assert difference.abs().sum(-1).nonzero().flatten().tolist() == list(rex.positions)
    delta = torch.cat(list(subjects.residuals["rex"].values()), dim=-1)[0]
    assert torch.allclose(difference[rex.positions[0]], 1.3 * delta, atol=1e-5)

    # Guidance sees the whole sequence: maps of 5·77 tokens whose bound columns are the regions' positions, and every
    # guided cross-attention call biases keys of that length.
    seen_maps, key_lengths = [], []
    build_maps, sdpa = generate_module.build_maps, F.scaled_dot_product_attention
    monkeypatch.setattr(
        generate_module, "build_maps", lambda *a, **k: seen_maps.append(build_maps(*a, **k)) or seen_maps[-1]
    )

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None and attn_mask.shape[-1] == key.shape[2] and key.shape[2] != query.shape[2]:
            key_lengths.append(key.shape[2])
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    result = Generator(bundle)(asked, subjects)
    bound = {p for positions in parsed.region_positions for p in positions}
    for maps in seen_maps[0].values():
        assert maps.token_weights.shape[-1] == 5 * 77
        assert set(maps.token_weights.abs().sum(0).nonzero().flatten().tolist()) == bound
    assert key_lengths and set(key_lengths) == {5 * 77}

    # The prompt is kept as written, weights and all, so Reuse makes the same picture again.
    assert result.request.prompt == LONG_PROMPT
    assert result.metadata[0]["parameters"].startswith(LONG_PROMPT + "\nNegative prompt: blurry\n")
    saved = metadata.save_png(result.images[0], tmp_path / "long.png")
    reused = metadata.read_request(saved)
    assert reused.prompt == LONG_PROMPT and reused.seed == 3


def test_a_textual_inversion_of_several_vectors_shifts_positions_in_a_weighted_prompt(tmp_path):
    """The parser reads each fragment through the pipeline's embedding hook (engines/embeddings.py), so a 2-vector
    embedding inside a weighted group takes two places and the subject after it is found where the encoder sees it."""
    from safetensors.torch import save_file

    from engines.embeddings import load_embeddings
    from tests.tiny_models import tiny_sd15

    pipe = tiny_sd15()
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "bad-hands.safetensors"))
    (embedding,) = load_embeddings(pipe, [str(tmp_path / "bad-hands.safetensors")])
    layout = Layout((Region("", (0, 0, 1, 1), subject="rex"),))
    prompt = "(bad-hands:1.2), a photo of (<rex>:1.3)"
    parsed = parse_prompt(prompt, layout, {"rex": "dog"}, [pipe.tokenizer], pipe.maybe_convert_prompt)
    assert parsed.region_positions == ((7,),)  # BOS, two vectors, ",", a, photo, of, dog
    ids, weights = window_ids(pipe.tokenizer, parsed.tokens[0], parsed.windows)
    assert ids[[1, 2]].tolist() == pipe.tokenizer.convert_tokens_to_ids(list(embedding.tokens))
    assert ids[7].item() == pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert weights[[1, 2, 3, 7]].tolist() == pytest.approx([1.2, 1.2, 1.0, 1.3])
