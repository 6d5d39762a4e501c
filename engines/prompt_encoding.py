"""Prompt → the `prompt_embeds` the pipeline takes instead of `prompt` (DESIGN.md's first door).

A prompt with no weighting syntax that fits the text encoder's window goes through the pipeline's own
`encode_prompt`, so it stays bit-identical to plain diffusers. A weighted or longer prompt is read in windows of
`model_max_length - 2` tokens, each wrapped in BOS … EOS and padded as the pipeline pads, encoded one by one and
concatenated along the sequence (A1111's and compel's way past CLIP's 77 positions); the negative prompt gets the
same treatment and the shorter of the two is padded with empty windows, so both have 77·k tokens. SDXL's pooled
embedding is the second encoder's pooled output of the first window, as A1111 takes it.

Weights follow compel's formula (also ComfyUI's default): a weighted token's output z moves away from the empty
prompt's output e at the same place, e + (z − e)·w, and tokens of weight 1 keep z exactly. A1111 instead multiplies
z by w and rescales the whole sequence back to its old mean, which moves every token; here a weight moves only its
own words, so regions and subject residuals elsewhere in the prompt read exactly what they read unweighted. compel
encodes and weighs the windows (`EmbeddingsProvider.build_weighted_embedding_tensor`); the windows themselves are
laid out here, from the very token lists engines/prompts.py took the subject and region positions from, because
compel's own chunker re-tokenizes the text and does not say where each token lands.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.prompt_subjects import PromptSubjects, add_residuals
from engines.prompts import ParsedPrompt, TokenizedPrompt, parse_prompt
from engines.types import GenerateRequest, Layout


@dataclass(frozen=True)
class PreparedPrompt:
    parsed: ParsedPrompt
    embeds: dict[str, torch.Tensor]  # the keyword arguments the pipeline takes instead of `prompt`

    @property
    def num_tokens(self) -> int:
        """The key length of the UNet's cross-attention: 77 per window for CLIP."""
        return self.embeds["prompt_embeds"].shape[1]


def prepare_prompt(bundle, request: GenerateRequest, subjects: PromptSubjects) -> PreparedPrompt:
    """Parse and encode the prompt and the negative prompt; add each subject's residual at its class-word tokens
    (Cones 2 Eq. 6)."""
    convert = getattr(bundle.pipe, "maybe_convert_prompt", None)  # textual-inversion tokens of several vectors
    parsed = parse_prompt(request.prompt, request.layout, subjects.class_words, bundle.tokenizers, convert)
    do_cfg = request.cfg > 1
    negative = parse_prompt(request.negative_prompt, Layout(()), None, bundle.tokenizers, convert) if do_cfg else None
    if _fits_pipeline(parsed) and (negative is None or _fits_pipeline(negative)):
        embeds = _pipeline_embeds(bundle, request, parsed.text, do_cfg)
    else:
        embeds = _windowed_embeds(bundle, request, parsed, negative)
    if subjects.residuals:
        widths = [e.config.hidden_size for e in bundle.text_encoders]
        embeds["prompt_embeds"] = add_residuals(embeds["prompt_embeds"], parsed, subjects, widths)
    return PreparedPrompt(parsed, embeds)


def _fits_pipeline(parsed: ParsedPrompt) -> bool:
    return parsed.plain and parsed.windows == 1


def _pipeline_embeds(bundle, request: GenerateRequest, text: str, do_cfg: bool) -> dict[str, torch.Tensor]:
    pipe, device, negative = bundle.pipe, bundle.device, request.negative_prompt or None
    if bundle.is_xl:
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            text,
            device=device,
            num_images_per_prompt=request.num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative,
        )
        return {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }
    positive, negative = pipe.encode_prompt(text, device, request.num_images, do_cfg, negative_prompt=negative)
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


@torch.no_grad()
def _windowed_embeds(bundle, request: GenerateRequest, parsed: ParsedPrompt,
                     negative: ParsedPrompt | None) -> dict[str, torch.Tensor]:  # fmt: skip
    windows = max(parsed.windows, negative.windows if negative is not None else 1)
    positive, pooled = encode_windows(bundle, parsed.tokens, windows)  # (1, 77·k, ΣD), (1, D₂) or None
    embeds = {"prompt_embeds": positive, "negative_prompt_embeds": None}
    negative_pooled = None
    if negative is not None and bundle.is_xl and not request.negative_prompt and _zeros_for_empty(bundle):
        # as SDXL's encode_prompt does for an empty negative prompt (force_zeros_for_empty_prompt)
        embeds["negative_prompt_embeds"], negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
    elif negative is not None:
        embeds["negative_prompt_embeds"], negative_pooled = encode_windows(bundle, negative.tokens, windows)
    if bundle.is_xl:
        embeds |= {"pooled_prompt_embeds": pooled, "negative_pooled_prompt_embeds": negative_pooled}
    images = request.num_images
    return {key: None if x is None else x.repeat_interleave(images, dim=0) for key, x in embeds.items()}


def _zeros_for_empty(bundle) -> bool:
    return bool(getattr(bundle.pipe.config, "force_zeros_for_empty_prompt", False))


def encode_windows(
    bundle, tokens: tuple[TokenizedPrompt, ...], windows: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every encoder's weighted output over `windows` windows, concatenated along features as the pipeline does
    (SDXL: 768 + 1280), and SDXL's pooled embedding of the first window. → (1, windows·L, ΣD), (1, D₂) or None."""
    from compel import EmbeddingsProvider, ReturnedEmbeddingsType  # imports diffusers' other pipelines: on use only

    # what each pipeline's encode_prompt reads: SD the last layer, SDXL the penultimate one without the final norm
    kind = ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
    if bundle.is_xl:
        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
    outputs, pooled = [], None
    for tokenizer, encoder, prompt in zip(bundle.tokenizers, bundle.text_encoders, tokens):
        ids, weights = window_ids(tokenizer, prompt, windows)
        provider = EmbeddingsProvider(
            tokenizer, encoder, truncate=False, returned_embeddings_type=kind, device=bundle.device
        )
        ids = ids.to(bundle.device)
        outputs.append(provider.build_weighted_embedding_tensor(ids, weights.to(bundle.device)))  # (1, windows·L, D)
        if bundle.is_xl and encoder is bundle.text_encoders[-1]:
            first = encoder(ids[None, : tokenizer.model_max_length])[0]
            pooled = first if first.ndim == 2 else pooled  # CLIPTextModelWithProjection's text_embeds (1, D₂)
    dtype = bundle.text_encoders[-1].dtype
    embeds = torch.cat(outputs, dim=-1).to(bundle.device, dtype)  # (1, windows·L, ΣD)
    return embeds, None if pooled is None else pooled.to(bundle.device, dtype)


def window_ids(tokenizer, prompt: TokenizedPrompt, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids and per-token weights of `windows` windows: BOS, up to W tokens, EOS, then the tokenizer's
    padding (as `tokenizer(..., padding="max_length")` lays out one window); windows past the prompt's end are
    empty (BOS, EOS, padding), as A1111 pads the shorter of prompt and negative prompt. → (windows·L,) twice."""
    size, bos, eos, pad = prompt.window, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    ids, weights = [], []
    for start in range(0, windows * size, size):
        part = list(prompt.ids[start : start + size])
        ids += [bos] + part + [eos] + [pad] * (size - len(part))
        weights += [1.0] + list(prompt.weights[start : start + size]) + [1.0] * (size + 1 - len(part))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)
