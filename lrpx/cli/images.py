"""Image files in and out: reading any image Pillow opens as an upright RGB picture, and one
output name per input image."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import UsageError, first_line

__all__ = ["read_rgb", "load_images", "check_readable", "output_names"]

#: modes of more than 8 bits per pixel and their full-scale value (``convert("RGB")`` clips them)
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def read_rgb(path: Path):
    """The image in ``path`` as an 8-bit RGB ``PIL.Image``: turned upright by its EXIF
    orientation, 16-bit and float greyscale scaled to 8 bits (not clipped).

    Raises
    ------
    UsageError
        A missing or unreadable file, or one larger than Pillow's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}") from None
    except Image.DecompressionBombError as error:
        raise UsageError(f"image {path} is too large to read safely: {first_line(error)}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise UsageError(f"cannot read image {path}: {first_line(error)}") from None


def _to_rgb(img):
    from PIL import Image

    if img.mode in _WIDE_MODES:
        values = np.asarray(img, dtype=np.float64) / _WIDE_MODES[img.mode]
        img = Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_images(paths: Sequence[Path], transform) -> Tensor:
    """Preprocessed ``(B, 3, H, W)`` batch (``transform`` maps a PIL image to a tensor)."""
    return torch.stack([transform(read_rgb(path)) for path in paths])


def check_readable(paths: Sequence[Path]) -> None:
    """Every path is an image Pillow can read (checked without decoding the pixels)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if not path.exists():
            raise UsageError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                img.verify()
        except Image.DecompressionBombError as error:
            raise UsageError(f"image {path} is too large to read safely: {first_line(error)}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise UsageError(f"cannot read image {path}: {first_line(error)}") from None


def output_names(paths: Sequence[Path]) -> list[str]:
    """One distinct name per image: its file stem, or for a stem seen before the stem numbered
    ``-1``, ``-2``, ... with a number no other image's stem takes."""
    stems = [path.stem for path in paths]
    taken = set(stems)
    names, seen = [], set()
    for stem in stems:
        name, count = stem, 0
        while name in seen or (name != stem and name in taken):
            count += 1
            name = f"{stem}-{count}"
        seen.add(name)
        names.append(name)
    return names
