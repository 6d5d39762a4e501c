"""Validation and preprocessing of a person's subject photos (Pillow, OpenCV, optional ONNX segmenter).

Every photo is checked before anything is written anywhere: a file that is not a PNG/JPEG/WebP image, a truncated
file, a decompression bomb (too many pixels) or a tiny image is an InputError naming the file. Accepted photos are
turned upright (EXIF orientation), converted to RGB, given a foreground mask, cropped to a square around the subject
and resized to the model's training size. The mask later weights the denoising loss (engines/register/).

Foreground masks: the alpha channel of a cut-out photo (PNG/WebP with transparency); else an ONNX segmenter run
through onnxruntime when its model file is present (`TROUPE_SEGMENTER` or ~/.troupe/models/segmenter.onnx), otherwise
OpenCV GrabCut seeded with a centre rectangle. A photo in which no foreground is found is refused: its mask would
steer reference attention and the masked loss to nothing.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from engines.types import InputError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 40_000_000  # a 40-megapixel photo is fine; more is refused (decompression bombs)
MIN_SIDE = 32  # pixels; a smaller image has nothing to learn from
# A photo is cropped to a square around the subject no larger than its short side: a 40000×32 strip would give a
# 32-px square blown up to the model's size. 4:1 takes every camera and phone format (panoramas included up to 4:1).
MAX_ASPECT = 4.0
MIN_FOREGROUND = 0.005  # share of a photo's pixels: less is "no subject found"
CROP_MARGIN = 0.15  # fraction of the subject's box added on each side before squaring
GRABCUT_SIDE = 256  # GrabCut runs on a copy at most this big (it is O(pixels))
DEFAULT_SEGMENTER = Path("~/.troupe/models/segmenter.onnx")


@dataclass(frozen=True)
class PreparedPhoto:
    photo: Image.Image  # RGB, size × size
    mask: Image.Image  # L, size × size, 255 = subject
    source: str


def load_photo(path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE) -> Image.Image:
    """Open, fully decode and validate one photo; upright RGB or InputError (nothing is written)."""
    return load_photo_and_alpha(path, max_pixels, min_side)[0]


def load_photo_and_alpha(
    path: str | Path, max_pixels: int = MAX_PIXELS, min_side: int = MIN_SIDE
) -> tuple[Image.Image, np.ndarray | None]:
    """Upright RGB (transparent parts composited on white) and the alpha channel in [0, 1] when the photo has a
    real cut-out (some pixels transparent), else None."""
    path = Path(path)
    name = path.name
    if path.is_dir():
        raise InputError(f"photo {name}: is a folder, not an image file (name the photos in it)")
    if not path.is_file():
        raise InputError(f"photo {name}: {'not a regular file' if path.exists() else 'no such file'}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in FORMATS:
                    raise InputError(f"photo {name}: {image.format} images are not accepted (use PNG, JPEG or WebP)")
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(f"photo {name}: {width}×{height} is too many pixels (limit {max_pixels:,})")
                if min(width, height) < min_side:
                    raise InputError(f"photo {name}: {width}×{height} is too small (each side needs ≥ {min_side} px)")
                if max(width, height) > MAX_ASPECT * min(width, height):
                    raise InputError(
                        f"photo {name}: {width}×{height} is too long and thin (at most {MAX_ASPECT:g}:1); "
                        "crop it around the subject first"
                    )
                image.load()  # decodes everything: a truncated file fails here
                return _upright_rgb(ImageOps.exif_transpose(image), name)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"photo {name}: refused as a possible decompression bomb ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise InputError(f"photo {name}: not an image (PNG, JPEG or WebP expected)") from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated / corrupt data
        raise InputError(f"photo {name}: the file is damaged or truncated ({error})") from error


def _upright_rgb(image: Image.Image, name: str) -> tuple[Image.Image, np.ndarray | None]:
    """A decoded photo as RGB and its cut-out alpha (see load_photo_and_alpha)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale: Pillow's convert("RGB") clips every value above 255 to white, so scale 0..65535 to 0..255
        grey = np.asarray(image, np.float64).clip(0, 65535) / 257.0  # (H, W)
        image = Image.fromarray(grey.round().astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255.0  # (H, W)
        if alpha.max() < 0.5:
            raise InputError(f"photo {name}: it is fully transparent, so there is no subject in it")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        cut_out = alpha.min() < 0.5 and alpha.max() > 0.5
        return rgb, (alpha if cut_out else None)
    return image.convert("RGB"), None


class OnnxSegmenter:
    """A foreground segmenter in ONNX: input float32 NCHW RGB in [0, 1]; output N×1×h×w logits or probabilities."""

    def __init__(self, model_path: str | Path, input_size: int = 320):
        import onnxruntime

        self.path = Path(model_path)
        providers = segmenter_providers(onnxruntime.get_available_providers(), _cuda_present())
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types
            raise InputError(f"segmenter {self.path.name} could not be loaded: {error}") from error
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape  # [N, 3, H, W], H/W may be symbolic
        static = len(shape) == 4 and all(isinstance(s, int) for s in shape[2:])
        self.size = (int(shape[3]), int(shape[2])) if static else (input_size, input_size)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """Foreground probability in [0, 1], shape (H, W) of `image`."""
        resized = np.asarray(image.convert("RGB").resize(self.size, Image.BILINEAR), np.float32) / 255.0
        batch = resized.transpose(2, 0, 1)[None]  # (1, 3, h, w)
        output = np.asarray(self.session.run(None, {self.input_name: batch})[0], np.float32)
        prob = output.reshape(output.shape[-2], output.shape[-1])  # (h, w)
        if prob.min() < 0.0 or prob.max() > 1.0:
            prob = 1.0 / (1.0 + np.exp(-prob))  # logits → probabilities
        out = Image.fromarray((prob * 255).clip(0, 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
        return np.asarray(out, np.float32) / 255.0


def segmenter_providers(available: list[str], cuda: bool) -> list[str]:
    """onnxruntime's execution providers, best first: CUDA where onnxruntime-gpu is installed (requirements-gpu.txt)
    and a GPU is present, the CPU always last. onnxruntime falls back down this list if the CUDA provider cannot load
    (e.g. its CUDA/cuDNN libraries do not match the ones torch brought)."""
    gpu = ["CUDAExecutionProvider"] if cuda and "CUDAExecutionProvider" in available else []
    return [*gpu, "CPUExecutionProvider"]


def _cuda_present() -> bool:
    # the onnxruntime-gpu wheel lists its CUDA provider even on a machine without a GPU, so ask torch (already loaded
    # with the model whenever photos are prepared)
    import torch

    return torch.cuda.is_available()


def find_segmenter(path: str | Path | None = None) -> OnnxSegmenter | None:
    """The ONNX segmenter if its file is present (argument, $TROUPE_SEGMENTER, ~/.troupe/models), else None."""
    candidate = path or os.environ.get("TROUPE_SEGMENTER") or DEFAULT_SEGMENTER
    candidate = Path(candidate).expanduser()
    return OnnxSegmenter(candidate) if candidate.is_file() else None


def grabcut_mask(image: Image.Image, iterations: int = 4) -> np.ndarray:
    """Foreground in {0, 1}, shape (H, W), by GrabCut. It is seeded from the photo's border: pixels far from the
    border's median colour are probably the subject, the border itself is background where it has that colour. A
    subject off-centre or filling most of the frame is found this way; a photo with no such pixels falls back to a
    centre rectangle (10% margin on each side)."""
    import cv2

    width, height = image.size
    scale = min(1.0, GRABCUT_SIDE / max(width, height))
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BILINEAR)
    bgr = np.ascontiguousarray(np.asarray(small)[:, :, ::-1])  # (h, w, 3) uint8
    h, w = bgr.shape[:2]
    mask, mode, rect = _border_seed(bgr), cv2.GC_INIT_WITH_MASK, None
    if not (mask == cv2.GC_PR_FGD).any():
        mask, mode = np.zeros((h, w), np.uint8), cv2.GC_INIT_WITH_RECT
        rect = (int(w * 0.1), int(h * 0.1), max(1, int(w * 0.8)), max(1, int(h * 0.8)))
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(bgr, mask, rect, bgd, fgd, iterations, mode)
        fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.float32)
    except cv2.error:  # e.g. a flat image: GrabCut cannot fit its colour models
        fg = np.zeros((h, w), np.float32)
    return np.asarray(Image.fromarray((fg * 255).astype(np.uint8)).resize((width, height), Image.NEAREST)) / 255.0


def _border_seed(bgr: np.ndarray, ring: int = 2, far: float = 40.0) -> np.ndarray:
    """GrabCut's starting labels (h, w) uint8: probable foreground where a pixel's colour is `far` from the median
    colour of the photo's outer `ring` pixels, sure background on that ring where it has that colour."""
    import cv2

    pixels = bgr.astype(np.float32)
    edge = np.ones(bgr.shape[:2], bool)
    edge[ring:-ring, ring:-ring] = False
    distance = np.linalg.norm(pixels - np.median(pixels[edge], axis=0), axis=-1)  # (h, w)
    seed = np.full(bgr.shape[:2], cv2.GC_PR_BGD, np.uint8)
    seed[distance > far] = cv2.GC_PR_FGD
    seed[edge & (distance <= far)] = cv2.GC_BGD
    return seed


def subject_square(fg: np.ndarray, native: int, margin: float = CROP_MARGIN) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) inside the image around the foreground's box, as big as the image allows and no
    smaller than the model's native side where the image has one: an upscaled crop would teach the subject blurred
    and larger than life (a 30-px object in a 64-px photo would become a 64-px one with stripes twice as wide)."""
    height, width = fg.shape
    ys, xs = np.nonzero(fg > 0.5)
    if len(xs) == 0:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    side = int(min(max(side, MIN_SIDE, native), width, height))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side / 2, 0), width - side)))
    top = int(round(min(max(cy - side / 2, 0), height - side)))
    return left, top, left + side, top + side


def foreground(path: str | Path, segmenter: OnnxSegmenter | None = None) -> tuple[Image.Image, np.ndarray]:
    """The photo (upright RGB) and its foreground in [0, 1], (H, W); InputError when no subject is found in it."""
    image, alpha = load_photo_and_alpha(path)
    if alpha is not None:  # a cut-out photo carries its own mask
        fg = alpha
    else:
        fg = segmenter(image) if segmenter is not None else grabcut_mask(image)  # (H, W) in [0, 1]
    if (fg > 0.5).mean() < MIN_FOREGROUND:
        raise InputError(
            f"photo {Path(path).name}: no subject found in it (its foreground is empty); use a photo in "
            "which the subject stands out from the background, or a cut-out PNG with transparency"
        )
    return image, fg


def check_photos(paths: list[str] | tuple[str, ...], segmenter: OnnxSegmenter | str | Path | None = None) -> None:
    """Every check prepare_photos makes (files, sizes, a foreground in each), without the model: run before the
    model loads, so a bad photo is one line in a second instead of after the load (GrabCut runs on ≤ 256-px copies,
    so doing it twice costs little)."""
    for path in paths:
        load_photo(path)
    if segmenter is None or isinstance(segmenter, (str, Path)):
        segmenter = find_segmenter(segmenter)
    for path in paths:
        foreground(path, segmenter)


def prepare_photo(path: str | Path, size: int, segmenter: OnnxSegmenter | None = None) -> PreparedPhoto:
    image, fg = foreground(path, segmenter)
    box = subject_square(fg, size)
    photo = image.crop(box).resize((size, size), Image.LANCZOS)
    mask_full = Image.fromarray((fg * 255).clip(0, 255).astype(np.uint8))
    mask = mask_full.crop(box).resize((size, size), Image.BILINEAR)
    return PreparedPhoto(photo, mask, str(path))


def prepare_photos(
    paths: list[str] | tuple[str, ...], size: int, segmenter: OnnxSegmenter | str | Path | None = None
) -> list[PreparedPhoto]:
    """Validate every photo first (so one bad file refuses the whole set), then mask, crop and resize."""
    for path in paths:
        load_photo(path)
    if segmenter is None or isinstance(segmenter, (str, Path)):
        segmenter = find_segmenter(segmenter)
    return [prepare_photo(path, size, segmenter) for path in paths]
