"""Twins of average pooling (the Norm rule). Max pooling keeps its plain gradient
(winner-take-all), so it needs no twin."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from ..core import lrp_apply
from ..ops import AdaptiveAvgPoolOps, AvgPoolOps
from .base import Twin

__all__ = ["LRPAvgPool1d", "LRPAvgPool2d", "LRPAvgPool3d",
           "LRPAdaptiveAvgPool1d", "LRPAdaptiveAvgPool2d", "LRPAdaptiveAvgPool3d"]


class _AvgPoolTwin(Twin):
    dim: int

    def forward(self, input: Tensor) -> Tensor:
        t = _ntuple(self.dim)
        stride = self.stride if self.stride is not None and self.stride != [] else self.kernel_size
        ops = AvgPoolOps(self.dim, t(self.kernel_size), t(stride), t(self.padding), bool(self.ceil_mode),
                         bool(self.count_include_pad), getattr(self, "divisor_override", None))
        return lrp_apply(ops, self.rule, input)


class LRPAvgPool1d(_AvgPoolTwin, nn.AvgPool1d):
    """``nn.AvgPool1d`` with the Norm rule."""
    dim = 1


class LRPAvgPool2d(_AvgPoolTwin, nn.AvgPool2d):
    """``nn.AvgPool2d`` with the Norm rule."""
    dim = 2


class LRPAvgPool3d(_AvgPoolTwin, nn.AvgPool3d):
    """``nn.AvgPool3d`` with the Norm rule."""
    dim = 3


class _AdaptiveAvgPoolTwin(Twin):
    dim: int

    def forward(self, input: Tensor) -> Tensor:
        return lrp_apply(AdaptiveAvgPoolOps(self.dim, _ntuple(self.dim)(self.output_size)), self.rule, input)


class LRPAdaptiveAvgPool1d(_AdaptiveAvgPoolTwin, nn.AdaptiveAvgPool1d):
    """``nn.AdaptiveAvgPool1d`` with the Norm rule."""
    dim = 1


class LRPAdaptiveAvgPool2d(_AdaptiveAvgPoolTwin, nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` with the Norm rule."""
    dim = 2


class LRPAdaptiveAvgPool3d(_AdaptiveAvgPoolTwin, nn.AdaptiveAvgPool3d):
    """``nn.AdaptiveAvgPool3d`` with the Norm rule."""
    dim = 3
