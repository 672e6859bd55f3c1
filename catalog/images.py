"""The one safe image loader and the one preprocessing definition.

Every image that enters fedcbir (training, indexing, a query photo uploaded to the
device) goes through :func:`load_image`, and every image that enters a model goes
through :func:`to_uint8` then :func:`normalize` with a :class:`Preprocess`. Export
writes ``Preprocess.to_dict()`` into the bundle manifest and retrieval reads it back
with :meth:`Preprocess.from_dict`, so the pixels a device sees are defined here once.

``load_image`` always returns a fully decoded RGB image, detached from its file:

- EXIF orientation is applied;
- palette, alpha (composited on white), CMYK, 16/32-bit integer, float, grey, LA and
  bilevel images become RGB;
- the pixel count is checked against ``max_pixels`` from the header, *before* any
  pixel is decoded (Pillow opens lazily), so a small file claiming a huge size is
  refused without allocating memory; Pillow's own bomb warning is made an error;
- every failure (missing file, a directory, zero bytes, not an image, truncated or
  corrupt data) raises :class:`ImageError` with one line naming the file.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps

from common.errors import FedcbirError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = (255, 255, 255)
DEFAULT_MAX_PIXELS = 40_000_000

RESIZE_MODES = ("pad-white", "center-crop", "stretch")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


# Pillow's own decompression-bomb guard only warns between its limit and twice that;
# make the warning an error so nothing half-trusted is decoded. (A process-wide filter,
# set once here: ``warnings.catch_warnings`` per call is not thread-safe and images are
# decoded from several threads.)
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class ImageError(FedcbirError):
    """An image that cannot be used: missing, not an image, damaged or too large."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _name_of(src: Any) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes in memory>"
    return str(src)


def load_image(src: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``src`` (a path or the bytes of a file) into a new RGB image.

    Raises :class:`ImageError` (one line, naming the file) for anything unusable.
    """
    name = _name_of(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"cannot read image {name}: empty data")
        fp: Any = io.BytesIO(data)
    else:
        path = Path(src)
        if not path.exists():
            raise ImageError(f"cannot read image {name}: no such file")
        if path.is_dir():
            raise ImageError(f"cannot read image {name}: it is a directory")
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ImageError(f"cannot read image {name}: {_one_line(exc.strerror or exc)}") from None
        if size == 0:
            raise ImageError(f"cannot read image {name}: the file is empty (0 bytes)")
        fp = path
    try:
        with Image.open(fp) as im:
            width, height = im.size
            if width <= 0 or height <= 0:
                raise ImageError(f"cannot read image {name}: invalid size {width}x{height}")
            if width * height > max_pixels:
                raise ImageError(
                    f"refusing image {name}: {width}x{height} = {width * height:,} pixels exceeds "
                    f"the limit of {max_pixels:,} (possible decompression bomb)"
                )
            im.load()
            return _to_rgb(_apply_exif(im))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refusing image {name}: {_one_line(exc)}") from None
    except MemoryError:
        raise ImageError(f"cannot read image {name}: out of memory while decoding") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"cannot read image {name}: not an image file (format not recognised)") from None
    except Exception as exc:  # any decoder failure: truncated, corrupt, unsupported
        reason = _one_line(exc) or type(exc).__name__
        raise ImageError(f"cannot read image {name}: damaged or unsupported ({reason})") from None


def _apply_exif(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not make a good image unusable
        return im
    return out if out is not None else im


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
    return background


def _scale_to_uint8(arr: np.ndarray, full_scale: float) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return np.clip(np.rint(arr * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → a new RGB image (alpha composited on white)."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        if mode.startswith("I") or mode == "F":
            im = Image.fromarray(_high_depth_to_uint8(im), "L")
        return _on_white(im.convert("RGBA"))
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _high_depth_to_uint8(im)
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    return im.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_uint8(im: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grey → 8-bit grey.

    16-bit data is scaled by its full range (65535 → 255). A 32-bit ``I`` image whose
    values fit in 0..255 is taken as 8-bit, in 0..65535 as 16-bit, otherwise it is
    stretched between its minimum and maximum. Float images in 0..1 are scaled by 255.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        return _scale_to_uint8(arr, 65535.0)
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        return _scale_to_uint8(arr, 1.0)
    if lo >= 0 and hi <= 255:
        return _scale_to_uint8(arr, 255.0)
    if lo >= 0 and hi <= 65535:
        return _scale_to_uint8(arr, 65535.0)
    span = hi - lo if hi > lo else 1.0
    return _scale_to_uint8((np.nan_to_num(arr, nan=lo) - lo), span)


@dataclass(frozen=True)
class Preprocess:
    """How an RGB image becomes model input (one definition for train, export, search).

    ``resize``: ``pad-white`` pads the image to a square on white then resizes (the whole
    product stays visible, like ABO's white-background photos); ``center-crop`` resizes
    the short side and crops the centre; ``stretch`` ignores the aspect ratio.
    Normalisation: ``(x / 255 - mean) / std`` per channel, layout HWC (NHWC batches).
    """

    size: int = 96
    resize: str = "pad-white"
    resample: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layout: str = field(default="NHWC", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 8 <= self.size <= 4096:
            raise FedcbirError(f"preprocess size must be an integer in 8..4096, got {self.size!r}")
        if self.resize not in RESIZE_MODES:
            raise FedcbirError(f"preprocess resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.resample not in _RESAMPLE:
            raise FedcbirError(f"preprocess resample must be one of {', '.join(_RESAMPLE)}, got {self.resample!r}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise FedcbirError(f"preprocess {key} must be three numbers, got {value!r}") from None
            if len(value) != 3 or not all(np.isfinite(value)):
                raise FedcbirError(f"preprocess {key} must be three finite numbers, got {value!r}")
            if key == "std" and min(value) <= 0:
                raise FedcbirError(f"preprocess std must be positive, got {value!r}")
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "resize": self.resize,
            "resample": self.resample,
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": self.layout,
            "scale": "1/255",
            "channels": "RGB",
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        if not isinstance(d, Mapping):
            raise FedcbirError("preprocess settings must be a JSON object")
        for key, expected in (("layout", "NHWC"), ("scale", "1/255"), ("channels", "RGB")):
            if key in d and d[key] != expected:
                raise FedcbirError(f"unsupported preprocess {key} {d[key]!r} (expected {expected!r})")
        known = {"size", "resize", "resample", "mean", "std"}
        unknown = set(d) - known - {"layout", "scale", "channels"}
        if unknown:
            raise FedcbirError(f"unknown preprocess settings: {', '.join(sorted(unknown))}")
        return cls(**{k: v for k, v in d.items() if k in known})


DEFAULT_PREPROCESS = Preprocess()


def _as_pre(size_or_pre: int | Preprocess) -> Preprocess:
    if isinstance(size_or_pre, Preprocess):
        return size_or_pre
    if size_or_pre == DEFAULT_PREPROCESS.size:
        return DEFAULT_PREPROCESS
    return Preprocess(size=int(size_or_pre))


def to_uint8(img: Image.Image, size: int | Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """The resized (and padded/cropped) image as uint8 ``[size, size, 3]``, before normalisation."""
    pre = _as_pre(size)
    if img.mode != "RGB":
        img = _to_rgb(img)
    s = pre.size
    resample = _RESAMPLE[pre.resample]
    w, h = img.size
    if pre.resize == "stretch" or w == h:
        out = img.resize((s, s), resample)
    elif pre.resize == "pad-white":
        # scale the long side to s, then centre on a white square
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (s, s), WHITE)
        canvas.paste(img.resize((nw, nh), resample), ((s - nw) // 2, (s - nh) // 2))
        out = canvas
    else:  # center-crop: the largest centred square, then resize
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out = img.resize((s, s), resample, box=(left, top, left + side, top + side))
    return np.asarray(out, dtype=np.uint8)


def normalize(batch: np.ndarray, pre: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """uint8 ``[..., H, W, 3]`` → float32 ``(x / 255 - mean) / std``."""
    batch = np.asarray(batch)
    if batch.shape[-1:] != (3,):
        raise ValueError(f"expected RGB data with 3 channels last, got shape {batch.shape}")
    std = np.asarray(pre.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (np.asarray(pre.mean, dtype=np.float32) / std).astype(np.float32)
    out = batch.astype(np.float32)
    out *= scale
    out -= shift
    return out


def preprocess(img: Image.Image, pre: Preprocess = DEFAULT_PREPROCESS) -> np.ndarray:
    """One image → float32 HWC model input."""
    return normalize(to_uint8(img, pre), pre)
