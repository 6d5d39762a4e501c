"""What the studio shows: progress bars, subject cards, the model badge and the Markdown of the Settings tab.

Pure functions from data to HTML, Markdown or images; every text that reaches HTML is escaped.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from engines.types import StepProgress, SubjectInfo


def progress_html(title: str, progress: StepProgress | None = None, extra: str = "", state: str = "run") -> str:
    """A titled bar: step, loss, elapsed time and ETA while a job runs; full and green when `state` is "done"."""
    if progress is None:
        percent, detail = (100 if state == "done" else 0), extra
    else:
        percent = int(100 * progress.step / max(progress.total, 1))
        bits = [f"step {progress.step}/{progress.total}"]
        if progress.loss is not None:
            bits.append(f"loss {progress.loss:.4f}")
        bits.append(f"{progress.elapsed:.1f}s elapsed")
        if progress.step < progress.total:
            bits.append(f"ETA {progress.eta:.0f}s")
        detail = " · ".join(bits) + (f" · {extra}" if extra else "")
    return (
        f'<div class="tr-progress tr-{state}"><div class="tr-progress-head"><b>{html.escape(title)}</b>'
        f'<span>{html.escape(detail)}</span></div><div class="tr-bar"><div style="width:{percent}%"></div></div>'
        f"</div>"
    )


def idle_html(text: str) -> str:
    return (
        f'<div class="tr-progress tr-idle"><div class="tr-progress-head"><span>{html.escape(text)}</span></div></div>'
    )


def subject_cards(subjects: Iterable[SubjectInfo]) -> list[tuple[Any, str]]:
    """Gallery items: the subject's thumbnail (or a coloured initial) captioned `<name> · class · family · what it
    holds` (residual + photos, photos only or residual only)."""
    cards = []
    for subject in subjects:
        has_thumbnail = subject.thumbnail and Path(subject.thumbnail).is_file()
        image: Any = subject.thumbnail if has_thumbnail else _placeholder(subject)
        cards.append((image, f"<{subject.name}> · {subject.class_word} · {subject.family} · {subject.holds}"))
    return cards


def _placeholder(subject: SubjectInfo) -> Image.Image:
    """A colour derived from the name, so a subject keeps its colour across reloads."""
    digest = hashlib.sha1(subject.name.encode()).digest()
    image = Image.new("RGB", (128, 128), (80 + digest[0] % 120, 80 + digest[1] % 120, 80 + digest[2] % 120))
    ImageDraw.Draw(image).text((54, 52), subject.name[:1].upper(), fill="white", font_size=28)
    return image


def subject_markdown(subject: SubjectInfo) -> str:
    """One line on a subject, with the numbers that say whether registration learned it."""
    curve = f" · final loss {subject.loss_curve[-1]:.4f}" if subject.loss_curve else ""
    if subject.photo_loss:
        curve += f" · loss on its photos {subject.photo_loss[0]:.4f} → {subject.photo_loss[1]:.4f}"
    trained = f"{subject.steps} steps" if subject.has_residual else "instant (no training; works with any model)"
    return (
        f"**`<{subject.name}>`** — a {subject.class_word} · {subject.holds} · model family `{subject.family}` · "
        f"{trained}{curve} · registered {subject.created[:16].replace('T', ' ')}"
    )


def model_badge(info: dict[str, Any]) -> str:
    source, family, device = (html.escape(str(info.get(key, "?"))) for key in ("source", "family", "device"))
    return (
        f'<div class="tr-badge"><span class="tr-dot"></span>{source}'
        f"<small>{family} · {html.escape(str(info.get('native_size', '?')))}px · {device}</small></div>"
    )


def model_markdown(info: dict[str, Any]) -> str:
    rows = "\n".join(f"- **{key.replace('_', ' ')}**: `{value}`" for key, value in info.items())
    return f"### Loaded model\n{rows}"


def library_markdown(library_dir: str | Path, per_user: bool, outputs: Path | None) -> str:
    if per_user:
        return (
            "### Subject library\nOn this Space every visitor gets a private, temporary library: export your "
            "subjects (.safetensors) and download your images to keep them."
        )
    return (
        f"### Subject library\n`{library_dir}`\n\nStart with `--library DIR` to use another folder."
        f"\n\n### Images and projects\n`{outputs or 'a temporary folder'}`"
    )


def vram_markdown(presets: dict[str, Any]) -> str:
    rows = "\n".join(
        f"- **{p.name}** — `{p.device} · {p.dtype} · {p.quantization} · offload {p.offload}`: {p.note}"
        for p in presets.values()
    )
    return f"### Machine presets\n{rows}"


def subject_labels(subjects: Iterable[SubjectInfo]) -> list[str]:
    """How subjects are written in prompts and region labels: `<name>`."""
    return [f"<{s.name}>" for s in subjects]


def relation_choices(relations: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The picker's entries: "— none —", then every relation as its template with A and B; a learned one (it has
    a LoRA) says so."""
    return [("— none —", "")] + [
        (r.template.format(a="A", b="B") + (" · learned" if r.lora is not None else ""), r.name)
        for r in relations.values()
    ]


def is_learned(relations: Mapping[str, Any], name: str | None) -> bool:
    return getattr(relations.get(name or ""), "lora", None) is not None
