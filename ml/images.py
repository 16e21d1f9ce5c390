"""The PIL/numpy half of the eval transform (and top-k labelling), without torch.

Any input a caller may send (a PIL image of any mode and size, or a nested list /
array of pixel values 0..255) becomes the uint8 array [S,S,C] that the tensor half
(``ml.data.EvalTransform.batch``) normalises. Web processes import this module to
validate and prepare inputs without paying for ``import torch``; training,
evaluation and ``ml.inference`` use the same functions, so there is one transform.

Encoded images are opened only in the formats of ``FORMATS`` (``open_image``), so
/predict, dataset uploads and training read the same files and no other Pillow
plugin (EPS runs Ghostscript; others parse rarer containers) ever sees client bytes.
"""
from __future__ import annotations

import io
from typing import Any, BinaryIO, Sequence

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
# The encoded formats Kiln serves and trains on: those of ml.folders.IMAGE_EXTENSIONS
# (torchvision's ImageFolder list). Pillow's "PPM" reads PPM, PGM, PBM and PNM; "JPEG"
# also reads MPO (multi-picture JPEGs from phone cameras) as its first picture.
FORMATS = ("PNG", "JPEG", "BMP", "PPM", "TIFF", "WEBP")
FORMAT_NAMES = "PNG, JPEG, BMP, PPM/PGM, TIFF or WebP"


class ImageError(ValueError):
    """An encoded image Kiln cannot use; ``code`` names why (the web tier answers 422 with it)."""

    code = "corrupt_image"


class NotAnImage(ImageError):
    code = "not_an_image"


class TooManyPixels(ImageError):
    code = "image_too_large"


def open_image(data: bytes | BinaryIO, max_pixels: int | None = None, where: str = "image") -> Image.Image:
    """Encoded bytes (or a binary file) -> a PIL image whose header only has been read.

    The format must be one of FORMATS and width x height at most ``max_pixels``:
    both are known before a single pixel is decoded. ImageError names the problem.
    """
    fp = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        image = Image.open(fp, formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise NotAnImage(f"{where}: not an image Kiln reads; send {FORMAT_NAMES}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels(_too_many(where, None, max_pixels)) from None
    except Exception as exc:  # noqa: BLE001 - header parsers raise many types on hostile input
        raise ImageError(f"{where}: corrupt image header ({type(exc).__name__}: {exc})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{where}: image is empty ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(_too_many(where, image.size, max_pixels))
    return image


def load_image(image: Image.Image, where: str = "image") -> Image.Image:
    """Decode the pixels of an image from ``open_image``; ImageError when the data is truncated or corrupt."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels(_too_many(where, image.size, None)) from None
    except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input; all mean "corrupt"
        raise ImageError(f"{where}: truncated or corrupt image ({type(exc).__name__}: {exc})") from None
    return image


def _too_many(where: str, size: tuple[int, int] | None, max_pixels: int | None) -> str:
    shape = f" ({size[0]}x{size[1]})" if size else ""
    limit = f"more than {max_pixels} pixels" if max_pixels else "too many pixels"
    return f"{where}: image{shape} has {limit}; resize it before sending"


def to_channels(image: Image.Image, in_channels: int) -> Image.Image:
    """Any PIL mode (L, RGB, RGBA, P, ...) -> L (1 channel) or RGB (3 channels)."""
    mode = "L" if in_channels == 1 else "RGB"
    if image.mode == mode:
        return image
    if image.mode == "P":  # palettes may carry transparency; PIL wants RGBA as the intermediate
        image = image.convert("RGBA")
    return image.convert(mode)


def base_array(image: Image.Image, image_size: int, in_channels: int) -> np.ndarray:
    """Channels -> square resize -> uint8 array [S,S,C]."""
    image = to_channels(image, in_channels)
    if image.size != (image_size, image_size):  # PIL's resize to the same size is a plain copy
        image = image.resize((image_size, image_size), RESAMPLE)
    arr = np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy wants one
    return arr[:, :, None] if arr.ndim == 2 else arr


def check_finite(arr: np.ndarray, where: str) -> None:
    if arr.size == 0:
        raise ValueError(f"{where}: empty array; send at least a 1x1 image")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: contains NaN or Inf; pixel values must be finite numbers")


def array_to_image(x: Any, where: str) -> Image.Image:
    """Pixel array [H,W] or [H,W,C] (C in 1,3,4), values 0..255 -> PIL image."""
    if isinstance(x, np.ndarray) and x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: array dtype {x.dtype} is not a real number type")
    try:
        arr = np.asarray(x, dtype=np.float64)
    except OverflowError:  # an integer beyond float64's range (JSON allows 400 digits)
        raise ValueError(f"{where}: pixel values must be in 0..255; found a number too large for a float") from None
    except (ValueError, TypeError):
        raise ValueError(f"{where}: not a rectangular array of numbers; send [H][W] or [H][W][C] "
                         "nested lists of pixel values 0..255") from None
    if arr.ndim not in (2, 3):
        raise ValueError(f"{where}: expected shape [H,W] or [H,W,C], got {list(arr.shape)}")
    check_finite(arr, where)
    if arr.ndim == 3 and arr.shape[2] not in MODES:
        raise ValueError(f"{where}: expected 1, 3 or 4 channels last ([H,W,C]), got shape {list(arr.shape)}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"{where}: pixel values must be in 0..255, got {arr.min():g}..{arr.max():g}")
    arr = np.rint(arr).astype(np.uint8)
    if arr.ndim == 3:
        mode = MODES[arr.shape[2]]
        arr = arr[:, :, 0] if mode == "L" else arr
    else:
        mode = "L"
    return Image.fromarray(np.ascontiguousarray(arr), mode=mode)


def prepare(x: Any, index: int, image_size: int, in_channels: int) -> np.ndarray:
    """One input (PIL image or pixel array / nested list) -> uint8 [S,S,C]; ValueError names the input."""
    where = f"input {index}"
    if isinstance(x, Image.Image):
        if x.width < 1 or x.height < 1:
            raise ValueError(f"{where}: image is empty ({x.width}x{x.height})")
        image = x
    elif isinstance(x, (np.ndarray, list, tuple)):
        image = array_to_image(x, where)
    else:
        raise ValueError(f"{where}: unsupported type {type(x).__name__}; send an image, "
                         "a pixel array [H,W] or [H,W,C] (0..255) or a tensor [C,H,W] (0..1)")
    try:
        return base_array(image, image_size, in_channels)
    except (OSError, SyntaxError) as exc:  # PIL decodes lazily: a truncated file fails here
        raise ImageError(f"{where}: image could not be decoded ({exc})") from None
    except ValueError as exc:  # a mode PIL cannot convert to L or RGB (e.g. some 16-bit TIFFs)
        raise ImageError(f"{where}: image mode {image.mode} cannot be used ({exc})") from None


def label_rows(classes: Sequence[str], values: Sequence[Sequence[float]],
               indices: Sequence[Sequence[int]]) -> list[dict]:
    """Top-k rows (probabilities, class indices) -> one {"label", "index", "top_k": [...]} per row."""
    out = []
    for vals, idxs in zip(values, indices):
        top = [{"label": classes[i], "index": i, "probability": p} for p, i in zip(vals, idxs)]
        out.append({"label": top[0]["label"], "index": top[0]["index"], "top_k": top})
    return out
