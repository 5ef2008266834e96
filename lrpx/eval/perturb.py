"""Perturbed inputs: input checks, region ranks, fills in pixel space, lazy item building."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch import Tensor

from .draws import check_generators
from .fills import Fill, as_fill
from .order import ORDERS, pixel_mask, region_relevance, removal_order, removal_rank
from .order import schedule_counts

# Aliases are evaluated at import time, so they spell Union (PEP 604 needs Python 3.10 there).
Normalizer = Union[
    tuple[Union[Sequence[float], Tensor], Union[Sequence[float], Tensor]],
    tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]],
]
Schedule = Union[str, Sequence[int], Sequence[float], Tensor]
FillSpec = Union[str, float, Tensor, Fill, Callable[[Tensor, Tensor], Tensor]]


class Perturbation:
    """Builds the perturbed input of any (order, sample, step) item of one evaluation.

    Construction checks the arguments, draws the per-sample random state once (the fill's
    state first, then the random orders, both from ``generator``) and ranks the regions;
    calling it builds a chunk of items lazily. See :func:`perturbed_inputs` for the arguments.
    ``mode="delete"`` replaces the first ``n_k`` regions of the order by the fill (pixel
    flipping, deletion); ``mode="insert"`` keeps only them and fills the rest (insertion).
    """

    def __init__(self, x: Tensor, relevance: Tensor, *, patch_size: int, steps: int | None,
                 schedule: Schedule, orders: Sequence[str], fill: FillSpec, reduce: str,
                 normalizer: Normalizer | None, pixel_range: tuple[float, float] | None,
                 generator: torch.Generator | None, mode: str = "delete"):
        _check_images(x, relevance, patch_size, generator)
        if mode not in ("delete", "insert"):
            raise ValueError(f"mode must be 'delete' or 'insert', got {mode!r}")
        self.orders = _check_orders(orders)
        self.x, self.patch_size, self.fill, self.mode = x.detach(), patch_size, as_fill(fill), mode
        regions = region_relevance(relevance.detach().to(x.device), patch_size, reduce=reduce)
        self.regions = regions
        self.num_regions = regions[0].numel()
        self.counts = schedule_counts(schedule, self.num_regions, steps)
        self._counts = torch.tensor(self.counts, device=x.device)
        self._prepare_fill(normalizer, pixel_range, generator)
        ranks = [removal_rank(removal_order(regions, o, generator=generator)) for o in self.orders]
        self.ranks = torch.stack(ranks).view(len(ranks), *regions.shape)

    def __call__(self, order: Tensor, sample: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """Perturbed inputs ``(N, C, H, W)`` and masks ``(N, 1, H, W)`` of index tensors."""
        return self.build(sample, self.ranks[order, sample], self._counts[step])

    def build(self, sample: Tensor, rank: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
        """Perturbed inputs of the samples ``sample`` whose regions of ``rank`` below ``count``
        are removed (``mode="delete"``) or kept (``"insert"``); the masks are ``True`` on the
        pixels that hold the fill."""
        mask = pixel_mask(rank, count, patch_size=self.patch_size, size=tuple(self.x.shape[-2:]))
        if self.mode == "insert":
            mask = ~mask
        return torch.where(mask, self._values(sample, mask), self.x[sample]), mask

    def _prepare_fill(self, normalizer, pixel_range, generator) -> None:
        to_pixel, self.from_pixel = _pixel_maps(normalizer, self.x)
        space = to_pixel(self.x) if self.fill.pixel_space else self.x
        self.low, self.high = _pixel_bounds(space, pixel_range)
        state = self.fill.prepare(space, low=self.low, high=self.high, generator=generator)
        if self.fill.static:
            self.values = self.from_pixel(state) if self.fill.pixel_space else state
        else:
            self.space, self.state = space, state

    def _values(self, sample: Tensor, mask: Tensor) -> Tensor:
        if self.fill.static:
            return self.values[sample]
        state = None if self.state is None else self.state[sample]
        values = self.fill(self.space[sample], mask, state, low=self.low[sample],
                           high=self.high[sample])
        return self.from_pixel(values) if self.fill.pixel_space else values


def perturbed_inputs(
    x: Tensor,
    relevance: Tensor,
    *,
    at: Sequence[int],
    order: str = "morf",
    patch_size: int = 1,
    steps: int | None = None,
    schedule: Schedule = "linear",
    fill: FillSpec = "random",
    reduce: str = "sum",
    normalizer: Normalizer | None = None,
    pixel_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """The inputs :func:`~lrpx.eval.pixel_flipping` feeds the model at some steps.

    With the same arguments and a generator in the same state, the inputs are those of the
    evaluation (for a random order, when it is the only random order evaluated).

    Parameters
    ----------
    x, relevance
        As for :func:`~lrpx.eval.pixel_flipping`.
    at
        Step indices (0 is the clean input, ``T`` the last step).
    order
        One order name.
    patch_size, steps, schedule, fill, reduce, normalizer, pixel_range, generator
        As for :func:`~lrpx.eval.pixel_flipping`.

    Returns
    -------
    inputs : Tensor
        ``(len(at), B, C, H, W)`` perturbed inputs.
    masks : Tensor
        ``(len(at), B, 1, H, W)`` bool, ``True`` on removed pixels.
    """
    plan = Perturbation(x, relevance, patch_size=patch_size, steps=steps, schedule=schedule,
                        orders=(order,), fill=fill, reduce=reduce, normalizer=normalizer,
                        pixel_range=pixel_range, generator=generator)
    last = len(plan.counts) - 1
    if any(not 0 <= k <= last for k in at):
        raise ValueError(f"at must hold steps between 0 and {last}, got {list(at)}")
    batch, device = x.shape[0], x.device
    step = torch.as_tensor(list(at), device=device).repeat_interleave(batch)
    sample = torch.arange(batch, device=device).repeat(len(at))
    with torch.inference_mode():
        inputs, masks = plan(torch.zeros_like(sample), sample, step)
    shape = (len(at), batch)
    return inputs.clone().unflatten(0, shape), masks.clone().unflatten(0, shape)


def _check_images(x: Tensor, relevance: Tensor, patch_size: int,
                  generator: torch.Generator | None) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got {_describe(x)}")
    batch, channels, height, width = x.shape
    if batch == 0:
        raise ValueError(f"x is an empty batch {tuple(x.shape)}: there is nothing to perturb")
    allowed = [(batch, channels, height, width), (batch, 1, height, width), (batch, height, width)]
    if not isinstance(relevance, Tensor) or tuple(relevance.shape) not in allowed:
        raise ValueError(
            f"relevance must have shape (B, C, H, W), (B, 1, H, W) or (B, H, W) matching x "
            f"{tuple(x.shape)}, got {_describe(relevance)}"
        )
    if bool(torch.isnan(relevance).any()):
        raise ValueError("relevance contains NaN; explain again or replace the NaNs first")
    if not isinstance(patch_size, int) or not 1 <= patch_size <= min(height, width):
        raise ValueError(
            f"patch_size must be an int between 1 and min(H, W) = {min(height, width)}, "
            f"got {patch_size!r}"
        )
    check_generators(generator, batch, x.device)


def _check_orders(orders: str | Sequence[str]) -> tuple[str, ...]:
    names = (orders,) if isinstance(orders, str) else tuple(orders)
    unknown = [name for name in names if name not in ORDERS]
    if unknown or not names:
        raise ValueError(f"order must be one or more of {ORDERS}, got {orders!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"order must not repeat a name, got {orders!r}")
    return names


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__


def _pixel_maps(normalizer: Normalizer | None, x: Tensor) -> tuple[Callable, Callable]:
    if normalizer is None:
        return (lambda t: t), (lambda t: t)
    if not (isinstance(normalizer, (tuple, list)) and len(normalizer) == 2):
        raise ValueError("normalizer must be a pair (mean, std) or (to_pixel, from_pixel)")
    if all(callable(f) for f in normalizer):
        return normalizer[0], normalizer[1]
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
                 for v in normalizer)
    if {mean.shape[1], std.shape[1]} - {1, x.shape[1]}:
        raise ValueError(f"normalizer mean and std need 1 or {x.shape[1]} (channels) values")
    if bool((std == 0).any()):
        raise ValueError("normalizer std must not be 0")
    return (lambda t: t * std + mean), (lambda t: (t - mean) / std)


def _pixel_bounds(pixels: Tensor, pixel_range: tuple[float, float] | None):
    if pixel_range is None:
        flat = pixels.flatten(1)
        return flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
    low, high = (torch.full((pixels.shape[0], 1, 1, 1), float(v), dtype=pixels.dtype,
                            device=pixels.device) for v in pixel_range)
    if not bool((low < high).all()):
        raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range}")
    return low, high
