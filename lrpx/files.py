"""Reading image files: any image Pillow opens, as an upright 8-bit RGB picture."""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ImageReadError", "read_rgb"]

#: modes of more than 8 bits per pixel and their full-scale value (``convert("RGB")`` clips them)
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


class ImageReadError(ValueError):
    """An image file that is missing, unreadable, or too large to decode safely."""


def read_rgb(path: str | Path):
    """The image in ``path`` as an 8-bit RGB ``PIL.Image``: turned upright by its EXIF
    orientation, 16-bit and float greyscale scaled to 8 bits (not clipped).

    Raises
    ------
    ImageReadError
        A missing or unreadable file, or one larger than Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageReadError(f"image not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"image {path} is too large to read safely: {_first_line(error)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ImageReadError(f"cannot read image {path}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _to_rgb(img):
    from PIL import Image

    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float64) / _WIDE_MODES[img.mode]
        img = Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
