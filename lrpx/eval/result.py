"""The result of :func:`~lrpx.eval.pixel_flipping`: curves, their axis, and their scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from . import scores as _scores
from .order import pixel_mask


@dataclass(frozen=True, eq=False)
class FlippingResult:
    """Perturbation curves and what is needed to read them.

    Attributes
    ----------
    curves
        ``(orders, B, T + 1)`` float64 target score after each step; column 0 is the clean input.
    counts
        ``(T + 1,)`` int64 cumulative number of removed regions, ``counts[0] == 0``.
    num_regions
        ``P``, the number of regions of the image.
    orders
        Order names, one per row of ``curves``.
    target
        ``(B,)`` class whose score is tracked (given, or the argmax on the clean input).
    score
        Name of the score (``"logit"``, ``"softmax"`` or the callable's name).
    fill
        Name of the fill.
    patch_size
        Side of the regions.
    ranks
        ``(orders, B, Gh, Gw)`` removal position of each region.
    size
        ``(H, W)`` of the inputs.
    mode
        ``"delete"`` (pixel flipping, deletion: ``counts`` regions removed) or ``"insert"``
        (insertion: ``counts`` regions kept, the others filled).
    """

    curves: Tensor
    counts: Tensor
    num_regions: int
    orders: tuple[str, ...]
    target: Tensor
    score: str
    fill: str
    patch_size: int
    ranks: Tensor
    size: tuple[int, int]
    mode: str = "delete"

    @property
    def fractions(self) -> Tensor:
        """``(T + 1,)`` float64 share of regions removed after each step (the x axis)."""
        return self.counts.double() / self.num_regions

    @property
    def removed_per_step(self) -> Tensor:
        """``(T,)`` number of regions removed in each step."""
        return self.counts.diff()

    def curve(self, order: str | None = None) -> Tensor:
        """``(B, T + 1)`` curves of one order (may be omitted when there is only one)."""
        return self.curves[self._row(order)]

    def auc(self, order: str | None = None) -> Tensor:
        """``(B,)`` area under the curve on the fraction axis (trapezoid)."""
        return _scores.auc(self.curve(order), self.fractions)

    def aopc(self, order: str | None = None) -> Tensor:
        """``(B,)`` area over the perturbation curve, ``mean_k (y_0 - y_k)``."""
        return _scores.aopc(self.curve(order))

    def srg(self) -> Tensor:
        """``(B,)`` symmetric relevance gain ``auc(lrf) - auc(morf)``."""
        return self.auc("lrf") - self.auc("morf")

    def mrg(self) -> Tensor:
        """``(B,)`` MoRF relevance gain ``auc(random) - auc(morf)``."""
        return self.auc("random") - self.auc("morf")

    def lrg(self) -> Tensor:
        """``(B,)`` LRF relevance gain ``auc(lrf) - auc(random)``."""
        return self.auc("lrf") - self.auc("random")

    def unit_step_auc(self, order: str | None = None) -> float:
        """Unit-step trapezoid over the step index of the batch-mean curve (parity only)."""
        return _scores.unit_step_auc(self.curve(order))

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation over the samples of every available score."""
        table = {}
        for order in self.orders:
            table[f"auc_{order}"] = _scores.mean_std(self.auc(order))
            table[f"aopc_{order}"] = _scores.mean_std(self.aopc(order))
        gains = {"srg": ("morf", "lrf"), "mrg": ("morf", "random"), "lrg": ("lrf", "random")}
        for name, needed in gains.items():
            if set(needed) <= set(self.orders):
                table[name] = _scores.mean_std(getattr(self, name)())
        return table

    def masks(self, step: int, order: str | None = None) -> Tensor:
        """``(B, 1, H, W)`` bool pixel mask of the regions removed after ``step``."""
        rank = self.ranks[self._row(order)]
        count = self.counts[step].to(rank.device).expand(rank.shape[0])
        return pixel_mask(rank, count, patch_size=self.patch_size, size=self.size)

    def _row(self, order: str | None) -> int:
        return order_row(self.orders, order)


def order_row(orders: Sequence[str], order: str | None) -> int:
    """The row of ``order`` among the evaluated ``orders`` (the only one when ``None``)."""
    if order is None:
        if len(orders) != 1:
            raise ValueError(f"order must be given: this result holds {list(orders)}")
        return 0
    if order not in orders:
        raise ValueError(f"order {order!r} was not evaluated; this result holds {list(orders)}")
    return list(orders).index(order)
