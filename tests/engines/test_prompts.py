"""Prompt syntax and token spans, for one and for both of SDXL's tokenizers."""

import pytest

from engines.prompts import expand_subjects, parse_prompt
from engines.types import InputError, Layout, Region
from tests.tiny_models import tiny_tokenizer

TOKENIZERS = [tiny_tokenizer()]


def spans(prompt, regions, class_words=None, tokenizers=TOKENIZERS):
    return parse_prompt(prompt, Layout(tuple(regions)), class_words or {}, tokenizers)


def test_subjects_expand_to_class_words_at_their_tokens():
    parsed = spans("a photo of <rex> hugging <milo> on the beach", [], {"rex": "dog", "milo": "cat"})
    assert parsed.text == "a photo of dog hugging cat on the beach"
    assert [(s.name, s.positions) for s in parsed.subjects] == [("rex", (4,)), ("milo", (6,))]


def test_multi_token_class_words_and_repeated_subjects():
    text, ranges = expand_subjects("<a> and <a>", {"a": "toy bear"})
    assert text == "toy bear and toy bear" and len(ranges) == 2
    parsed = spans("<a> and <a>", [Region("", (0, 0, 1, 1), subject="a")], {"a": "toy bear"})
    assert parsed.region_positions == ((1, 2, 4, 5),)


def test_phrase_regions_bind_every_free_occurrence_but_not_subject_tokens():
    parsed = spans("a dog and <rex> and a dog", [Region("dog", (0, 0, 1, 1))], {"rex": "dog"})
    assert parsed.region_positions == ((2, 7),)


def test_both_sdxl_tokenizers_agree():
    parsed = spans("a red ball next to a box", [Region("red ball", (0, 0, 1, 1))], tokenizers=TOKENIZERS * 2)
    assert parsed.region_positions == ((2, 3),)


@pytest.mark.parametrize(
    "prompt, regions, message",
    [
        ("a photo of dog", [Region("cow", (0, 0, 1, 1))], "not in the prompt"),
        ("a dog", [Region("dog", (0, 0, 1, 1)), Region("dog", (0, 0, 1, 1))], "bind the same words"),
        ("a red ball", [Region("red ball", (0, 0, 1, 1)), Region("ball", (0, 0, 1, 1))], "bind the same words"),
        ("a photo of <rex>", [Region("dog", (0, 0, 1, 1))], "only as part of a subject"),
        ("a photo of <rex>", [Region("", (0, 0, 1, 1), subject="milo")], "does not mention <milo>"),
        ("a photo of <nobody>", [], "no subject named <nobody>"),
        ("a " * 1300 + "dog", [Region("dog", (0, 0, 1, 1))], "reads at most 1200"),
    ],
)
def test_bad_layouts_name_the_problem(prompt, regions, message):
    with pytest.raises(InputError, match=message):
        spans(prompt, regions, {"rex": "dog", "milo": "cat"})


def test_long_prompt_binds_words_in_later_windows():
    """Past 75 tokens the prompt continues in a second window of 77 (BOS, 75 tokens, EOS): token 75 sits at 78."""
    parsed = spans("a dog " + "on the beach " * 30, [Region("dog", (0, 0, 1, 1))])
    assert parsed.region_positions == ((2,),) and parsed.windows == 2
    parsed = spans("on the beach " * 25 + "a dog", [Region("dog", (0, 0, 1, 1))])
    assert parsed.region_positions == ((77 + 1 + 1,),)  # token 76 (0-based): window 1, place 1 after its BOS
