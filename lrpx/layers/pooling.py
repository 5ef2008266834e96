"""Twins of average pooling (the Norm rule). Max pooling keeps its plain gradient
(winner-take-all), so it needs no twin."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from ..core import lrp_apply
from ..ops import AdaptiveAvgPoolOps, AvgPoolOps, MeanOps
from ..rules.base import Rule
from ..rules.elementwise import Norm
from .base import Twin

__all__ = ["LRPAvgPool1d", "LRPAvgPool2d", "LRPAvgPool3d",
           "LRPAdaptiveAvgPool1d", "LRPAdaptiveAvgPool2d", "LRPAdaptiveAvgPool3d", "Mean"]


class _PoolTwin(Twin):
    lrp_kind = "sum"

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return inputs_nonnegative


class _AvgPoolTwin(_PoolTwin):
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


class _AdaptiveAvgPoolTwin(_PoolTwin):
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


class Mean(_PoolTwin, nn.Module):
    """``input.mean(dim, keepdim)`` as a layer with the Norm rule: the global average pooling
    that forward code writes as ``x.mean([2, 3])`` (ShuffleNet, MnasNet).

    ``convert`` puts one in place of each such call it finds when tracing forward code.
    """

    def __init__(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False,
                 rule: Rule | None = None) -> None:
        super().__init__()
        self.dim = (dim,) if isinstance(dim, int) else (None if dim is None else tuple(dim))
        self.keepdim = bool(keepdim)
        self.rule = Norm() if rule is None else rule

    @classmethod
    def from_module(cls, module: "Mean", rule: Rule) -> "Mean":
        cls.check_rule(rule)
        return cls(module.dim, module.keepdim, rule)

    def forward(self, input: Tensor) -> Tensor:
        return lrp_apply(MeanOps(self.dim, self.keepdim), self.rule, input)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}, rule={self.rule!r}"
