"""The ``shapes`` data: one shape (circle, square, triangle, cross or ring) of random position,
size, rotation and colour on a textured, noisy background, with its object mask."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLASSES", "MEAN", "STD", "SPLIT_SEEDS", "Shapes", "make_shapes", "shapes_split", "normalize",
           "denormalize", "zbox_bounds"]

CLASSES = ("circle", "square", "triangle", "cross", "ring")
#: per-channel normalisation of the models' input: ``(pixel - MEAN) / STD``
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
#: first seed of each split; splits never share a seed
SPLIT_SEEDS = {"train": 0, "test": 1_000_000}


@dataclass(frozen=True)
class Shapes:
    """A batch of the shapes task.

    Attributes
    ----------
    images
        ``(N, 3, H, W)`` float32 pixels in ``[0, 1]``.
    labels
        ``(N,)`` int64 class indices into :data:`CLASSES`.
    masks
        ``(N, 1, H, W)`` bool, ``True`` on the object's pixels.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index) -> Shapes:
        return Shapes(self.images[index], self.labels[index], self.masks[index])


def make_shapes(n: int, *, seed: int = 0, size: int = 64) -> Shapes:
    """Generate ``n`` images of the shapes task, the same for the same ``n``, ``seed`` and ``size``.

    Parameters
    ----------
    n
        Number of images; the classes take turns (``label = i % 5`` before shuffling), so
        they are balanced.
    seed
        Seed of a private :class:`torch.Generator`; the global RNG is not touched.
    size
        Side of the square images (at least 32).

    Returns
    -------
    Shapes
        Images, labels and object masks.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int of at least 32, got {size!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n)[torch.randperm(n, generator=g)] % len(CLASSES)
    masks = _object_masks(labels, size, g)
    background = _background(n, size, g)
    colour = _object_colour(background, g)
    shading = 1 + 0.15 * (torch.rand(n, 1, size, size, generator=g) - 0.5)
    images = torch.where(masks, (colour * shading).clamp(0, 1), background)
    images = (images + 0.03 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    return Shapes(images.float(), labels, masks)


def shapes_split(split: str, n: int, *, size: int = 64) -> Shapes:
    """The ``"train"`` or ``"test"`` split of the task (disjoint seeds)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    return make_shapes(n, seed=SPLIT_SEEDS[split], size=size)


def _object_masks(labels: Tensor, size: int, g: torch.Generator) -> Tensor:
    """``(N, 1, size, size)`` bool masks of the shapes, with random radius, centre and angle."""
    n = labels.numel()
    radius = size * (0.12 + 0.13 * torch.rand(n, generator=g))
    margin = radius + 2
    centre = margin[:, None] + (size - 2 * margin)[:, None] * torch.rand(n, 2, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dy = grid.view(1, -1, 1) - centre[:, 0].view(-1, 1, 1)
    dx = grid.view(1, 1, -1) - centre[:, 1].view(-1, 1, 1)
    cos, sin = angle.cos().view(-1, 1, 1), angle.sin().view(-1, 1, 1)
    u, v = (cos * dx + sin * dy) / radius.view(-1, 1, 1), (cos * dy - sin * dx) / radius.view(-1, 1, 1)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for k in range(len(CLASSES)):
        pick = labels == k
        masks[pick] = _shape(k, u[pick], v[pick])
    return masks.unsqueeze(1)


def _shape(kind: int, u: Tensor, v: Tensor) -> Tensor:
    """Inside-test of shape ``kind`` in coordinates scaled by the radius (circumradius 1)."""
    r2 = u**2 + v**2
    if kind == 0:  # circle
        return r2 <= 0.9**2
    if kind == 1:  # square
        return torch.maximum(u.abs(), v.abs()) <= 0.75
    if kind == 2:  # equilateral triangle, inradius 0.55
        edges = [u * math.cos(a) + v * math.sin(a) <= 0.55 for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return edges[0] & edges[1] & edges[2]
    if kind == 3:  # cross of two bars
        return ((u.abs() <= 0.3) & (v.abs() <= 1)) | ((v.abs() <= 0.3) & (u.abs() <= 1))
    return (r2 <= 1) & (r2 >= 0.55**2)  # ring


def _background(n: int, size: int, g: torch.Generator) -> Tensor:
    """Smooth coloured noise plus stripes of random direction and frequency, ``(N, 3, H, W)``."""
    base = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    coarse = F.interpolate(torch.rand(n, 3, 6, 6, generator=g) - 0.5, size=(size, size), mode="bicubic",
                           align_corners=False)
    angle = math.pi * torch.rand(n, 1, 1, 1, generator=g)
    freq = 2 * math.pi * (2 + 4 * torch.rand(n, 1, 1, 1, generator=g)) / size
    grid = torch.arange(size, dtype=torch.float32)
    phase = freq * (angle.cos() * grid.view(1, 1, 1, -1) + angle.sin() * grid.view(1, 1, -1, 1))
    stripes = 0.08 * torch.rand(n, 1, 1, 1, generator=g) * torch.sin(phase)
    return (base + 0.3 * coarse + stripes).clamp(0, 1)


def _object_colour(background: Tensor, g: torch.Generator, candidates: int = 8) -> Tensor:
    """A random colour per image that stands out from the background's mean colour."""
    n = background.shape[0]
    colours = torch.rand(n, candidates, 3, generator=g)
    mean = background.mean(dim=(2, 3)).unsqueeze(1)
    contrast = (colours - mean).abs().amax(dim=2)
    good = contrast >= 0.3
    pick = torch.where(good.any(1), good.float().argmax(1), contrast.argmax(1))
    return colours[torch.arange(n), pick].view(n, 3, 1, 1)


def normalize(images: Tensor) -> Tensor:
    """Pixels in ``[0, 1]`` to model input: ``(images - MEAN) / STD`` per channel."""
    mean, std = _stats(images)
    return (images - mean) / std


def denormalize(x: Tensor) -> Tensor:
    """Model input back to pixels: ``x * STD + MEAN`` per channel."""
    mean, std = _stats(x)
    return x * std + mean


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    kw = {"dtype": like.dtype, "device": like.device}
    return torch.tensor(MEAN, **kw).view(1, 3, 1, 1), torch.tensor(STD, **kw).view(1, 3, 1, 1)


def zbox_bounds(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The ZBox ``(low, high)`` bounds of the model input: pixels 0 and 1 normalised, ``(1, 3, 1, 1)``."""
    zero, one = torch.zeros(1, 3, 1, 1, dtype=dtype), torch.ones(1, 3, 1, 1, dtype=dtype)
    return normalize(zero), normalize(one)

