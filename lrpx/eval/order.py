"""Regions, removal orders and step schedules for perturbation curves.

An image of size ``H x W`` is cut into a grid of ``patch_size x patch_size`` regions in raster
order. When ``H`` or ``W`` is not a multiple of ``patch_size``, the regions in the last row and
column are smaller (they hold the remaining ``H mod p`` rows / ``W mod p`` columns). A region's
relevance is the sum over its pixels and channels (``reduce="sum"``, so that LRP conservation
carries over) or their mean (``reduce="mean"``, for unequal border regions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .draws import rand

ORDERS = ("morf", "lrf", "random")
SCHEDULES = ("linear", "quadratic", "log")
REDUCTIONS = ("sum", "mean")


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Number of region rows and columns, border regions included."""
    return math.ceil(height / patch_size), math.ceil(width / patch_size)


def channel_sum(relevance: Tensor) -> Tensor:
    """Relevance summed over channels, as ``(B, H, W)``.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``.
    """
    return relevance if relevance.dim() == 3 else relevance.sum(dim=1)


def region_relevance(relevance: Tensor, patch_size: int, *, reduce: str = "sum") -> Tensor:
    """Relevance of each region of the ``patch_size`` grid.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``; summed over channels first.
    patch_size
        Side of the square regions; border regions are smaller when it does not divide the
        image size.
    reduce
        ``"sum"`` (default) or ``"mean"`` over the pixels of a region.

    Returns
    -------
    Tensor
        ``(B, Gh, Gw)`` region relevance, float64 (float32 on devices without float64).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    dtype = torch.float32 if relevance.device.type == "mps" else torch.float64
    pixels = channel_sum(relevance.to(dtype))
    batch, height, width = pixels.shape
    rows, cols = grid_shape(height, width, patch_size)
    pad = (0, cols * patch_size - width, 0, rows * patch_size - height)
    padded = torch.nn.functional.pad(pixels, pad)
    sums = padded.reshape(batch, rows, patch_size, cols, patch_size).sum(dim=(2, 4))
    if reduce == "sum":
        return sums
    ones = torch.nn.functional.pad(torch.ones_like(pixels[:1]), pad)
    areas = ones.reshape(1, rows, patch_size, cols, patch_size).sum(dim=(2, 4))
    return sums / areas


def removal_order(
    regions: Tensor, order: str, *, generator: torch.Generator | None = None
) -> Tensor:
    """Region indices in the order they are removed.

    Parameters
    ----------
    regions
        ``(B, Gh, Gw)`` region relevance.
    order
        ``"morf"`` (most relevant first: decreasing relevance, ties in raster order), ``"lrf"``
        (least relevant first: the exact reverse of MoRF) or ``"random"`` (a permutation per
        sample drawn from ``generator``).
    generator
        Source of the random permutations; the global generator when ``None``.

    Returns
    -------
    Tensor
        ``(B, P)`` int64 flat region indices, first removed first.
    """
    flat = regions.flatten(1)
    if order == "random":
        draws = rand(flat.shape, generator, device=flat.device)
        return torch.argsort(draws, dim=1, stable=True)
    morf = torch.argsort(flat, dim=1, descending=True, stable=True)
    if order == "morf":
        return morf
    if order == "lrf":
        return morf.flip(1)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def removal_rank(indices: Tensor) -> Tensor:
    """Inverse of :func:`removal_order`: the step position of each region, ``(B, P)``."""
    positions = torch.arange(indices.shape[1], device=indices.device).expand_as(indices)
    return torch.empty_like(indices).scatter_(1, indices, positions)


def pixel_mask(
    rank: Tensor, count: Tensor, *, patch_size: int, size: tuple[int, int]
) -> Tensor:
    """Pixel mask of the first ``count`` removed regions.

    Parameters
    ----------
    rank
        ``(N, Gh, Gw)`` removal position of each region.
    count
        ``(N,)`` number of regions removed for each item.
    patch_size
        Region side.
    size
        ``(H, W)`` of the image.

    Returns
    -------
    Tensor
        ``(N, 1, H, W)`` bool, ``True`` where the pixel is removed.
    """
    removed = rank < count.view(-1, 1, 1)
    pixels = removed.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return pixels[:, None, : size[0], : size[1]]


def schedule_counts(
    schedule: str | Sequence[int] | Sequence[float] | Tensor,
    num_regions: int,
    steps: int | None = None,
) -> list[int]:
    """Cumulative number of removed regions after each step, ``[0, n_1, ..., n_T]``.

    Parameters
    ----------
    schedule
        ``"linear"``: ``n_k = floor(k P / T)``, equal counts per step up to rounding.
        ``"quadratic"``: ``n_k = min(k^2, P)``, step ``k`` removes ``2k - 1`` regions; at most
        ``ceil(sqrt(P))`` steps. ``"log"``: geometric spacing ``n_k = round(P^(k/T))``, raised
        where needed to keep the counts strictly increasing. A sequence of ints gives the counts,
        a sequence of floats in ``(0, 1]`` the fractions of regions (rounded to counts); a
        leading 0 is optional.
    num_regions
        ``P``, the number of regions.
    steps
        ``T``; defaults to ``min(P, 20)`` for ``linear`` and ``log``, ``ceil(sqrt(P))`` for
        ``quadratic``, and the sequence length for explicit schedules.

    Returns
    -------
    list of int
        Strictly increasing counts starting at 0, the last one at most ``P``.
    """
    if isinstance(schedule, str):
        return [0] + _named_counts(schedule, num_regions, steps)
    counts = _explicit_counts(schedule, num_regions)
    if steps is not None and steps != len(counts):
        raise ValueError(f"steps={steps} disagrees with the {len(counts)} steps of the schedule")
    return [0] + counts


def _named_counts(name: str, total: int, steps: int | None) -> list[int]:
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} or a sequence, got {name!r}")
    limit = math.ceil(math.sqrt(total)) if name == "quadratic" else total
    if steps is None:
        steps = limit if name == "quadratic" else min(total, 20)
    if not 1 <= steps <= limit:
        what = "ceil(sqrt(regions))" if name == "quadratic" else "the number of regions"
        raise ValueError(
            f"steps must be between 1 and {what} = {limit} for schedule {name!r}, got {steps}"
        )
    if name == "linear":
        return [k * total // steps for k in range(1, steps + 1)]
    if name == "quadratic":
        return [min(k * k, total) for k in range(1, steps + 1)]
    counts = [total] * steps
    previous = 0
    for k in range(1, steps):
        previous = max(previous + 1, round(total ** (k / steps)))
        counts[k - 1] = previous
    return counts


def _explicit_counts(schedule: Sequence[int] | Sequence[float] | Tensor, total: int) -> list[int]:
    values = schedule.tolist() if isinstance(schedule, Tensor) else list(schedule)
    if values[:1] == [0]:
        values = values[1:]
    if not values:
        raise ValueError("schedule must hold at least one count or fraction above 0")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        counts = values
    elif all(isinstance(v, (int, float)) and 0 < v <= 1 for v in values):
        counts = [round(v * total) for v in values]
    else:
        raise ValueError(
            f"schedule must be a name, int counts, or float fractions in (0, 1]; got {values}"
        )
    if counts[0] < 1 or counts[-1] > total or any(b <= a for a, b in zip(counts, counts[1:])):
        raise ValueError(
            f"schedule must give strictly increasing counts in [1, {total}] (the number of "
            f"regions); got {counts}"
        )
    return counts
