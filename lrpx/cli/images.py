"""Image files in and out: reading images as upright RGB pictures (:mod:`lrpx.files`), and
one output name per input image."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .. import files
from .common import UsageError, first_line

__all__ = ["read_rgb", "load_images", "check_readable", "output_names"]

def read_rgb(path: Path):
    """:func:`lrpx.files.read_rgb`, its errors as usage errors (one line, exit code 2)."""
    try:
        return files.read_rgb(path)
    except files.ImageReadError as error:
        raise UsageError(str(error)) from None


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
