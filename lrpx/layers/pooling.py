"""Twins of the parameter-free linear maps that take the Norm rule: average pooling, means and
interpolation (upsampling). Max pooling keeps its plain gradient (winner-take-all), so it
needs no twin."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from ..core import lrp_apply
from ..ops import AdaptiveAvgPoolOps, AvgPoolOps, MeanOps, _like, _shape
from ..rules.base import Rule
from ..rules.elementwise import Norm
from .base import Twin

__all__ = ["Sum", "LRPAvgPool1d", "LRPAvgPool2d", "LRPAvgPool3d",
           "LRPAdaptiveAvgPool1d", "LRPAdaptiveAvgPool2d", "LRPAdaptiveAvgPool3d", "Mean", "Interpolate",
           "LRPUpsample", "LRPUpsamplingNearest2d", "LRPUpsamplingBilinear2d", "UPSAMPLE_TWINS"]

#: interpolation modes whose weights are >= 0 (the output keeps the input's sign)
_CONVEX_MODES = frozenset({"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"})

_ATEN = torch.ops.aten
#: ``{(mode, spatial dims): (backward kernel, whether it takes align_corners)}``
_UPSAMPLE_BACKWARD = {
    ("nearest", 1): (_ATEN.upsample_nearest1d_backward, False), ("nearest", 2): (_ATEN.upsample_nearest2d_backward, False),
    ("nearest", 3): (_ATEN.upsample_nearest3d_backward, False),
    ("nearest-exact", 2): (_ATEN._upsample_nearest_exact2d_backward, False),
    ("linear", 1): (_ATEN.upsample_linear1d_backward, True), ("bilinear", 2): (_ATEN.upsample_bilinear2d_backward, True),
    ("trilinear", 3): (_ATEN.upsample_trilinear3d_backward, True), ("bicubic", 2): (_ATEN.upsample_bicubic2d_backward, True),
}


@dataclass(frozen=True)
class InterpolateOps:
    """``F.interpolate`` (``nn.Upsample``): a linear map of its input without parameters; VJP by
    ATen's upsampling backward kernels (by autograd for the modes they do not cover)."""

    size: tuple[int, ...] | int | None = None
    scale_factor: tuple[float, ...] | float | None = None
    mode: str = "nearest"
    align_corners: bool | None = None
    recompute_scale_factor: bool | None = None
    antialias: bool = False
    kind: ClassVar[str] = "sum"
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        return F.interpolate(input, size=self.size, scale_factor=self.scale_factor, mode=self.mode,
                             align_corners=self.align_corners, recompute_scale_factor=self.recompute_scale_factor,
                             antialias=self.antialias)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        shape = _shape(input)
        dim = len(shape) - 2
        found = _UPSAMPLE_BACKWARD.get((self.mode, dim))
        if found is None or self.antialias:
            return self._autograd_vjp(s, input)
        kernel, takes_corners = found
        scales: list = [None] * dim
        if self.scale_factor is not None and not self.recompute_scale_factor:
            factors = self.scale_factor if isinstance(self.scale_factor, (tuple, list)) else (self.scale_factor,) * dim
            scales = [float(f) for f in factors]
        corners = (bool(self.align_corners),) if takes_corners else ()
        return kernel(s, list(s.shape[2:]), list(shape), *corners, *scales)

    def _autograd_vjp(self, s: Tensor, input: Tensor | torch.Size) -> Tensor:
        x = _like(s, input).detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(self.forward(x), x, s)[0]


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

    #: the sum instead of the mean (:class:`Sum`)
    total = False

    def forward(self, input: Tensor) -> Tensor:
        return lrp_apply(MeanOps(self.dim, self.keepdim, total=self.total), self.rule, input)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}, rule={self.rule!r}"


class Sum(Mean):
    """``input.sum(dim, keepdim)`` as a layer with the Norm rule: a sum over the splits of
    split attention (ResNeSt) or over tokens. ``convert`` puts one in place of each such call
    on values computed from the input."""

    total = True


class Interpolate(_PoolTwin, nn.Module):
    r"""``F.interpolate(input, size, scale_factor, mode, ...)`` as a layer with the Norm rule:
    a linear map of its input, so relevance is split in proportion to each input pixel's
    contribution to each output pixel,

    .. math:: R_j = x_j \sum_k \frac{w_{kj}}{\sum_i w_{ki} x_i + \epsilon\,\mathrm{sign}_0(\cdot)} R_k

    (``w`` the interpolation weights). ``convert`` puts one in place of each ``F.interpolate``
    call in traced forward code; ``size`` and ``scale_factor`` computed at run time (the
    segmentation models' ``size=x.shape[-2:]``) are arguments of its forward.
    """

    def __init__(self, mode: str = "nearest", align_corners: bool | None = None,
                 recompute_scale_factor: bool | None = None, antialias: bool = False, rule: Rule | None = None) -> None:
        super().__init__()
        self.mode, self.align_corners = mode, align_corners
        self.recompute_scale_factor, self.antialias = recompute_scale_factor, bool(antialias)
        self.rule = Norm() if rule is None else rule

    @classmethod
    def from_module(cls, module: "Interpolate", rule: Rule) -> "Interpolate":
        cls.check_rule(rule)
        return cls(module.mode, module.align_corners, module.recompute_scale_factor, module.antialias, rule)

    def forward(self, input: Tensor, size=None, scale_factor=None) -> Tensor:
        ops = InterpolateOps(_frozen(size), _frozen(scale_factor), self.mode, self.align_corners,
                             self.recompute_scale_factor, self.antialias)
        return lrp_apply(ops, self.rule, input)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return inputs_nonnegative and self.mode in _CONVEX_MODES

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, align_corners={self.align_corners}, rule={self.rule!r}"


def _frozen(value):
    """A size or scale as a tuple (``torch.Size``, lists) or a number; None stays None."""
    if value is None or isinstance(value, (int, float)):
        return value
    return tuple(int(v) if isinstance(v, int) or hasattr(v, "__index__") else float(v) for v in value)


class _UpsampleTwin(_PoolTwin):
    def forward(self, input: Tensor) -> Tensor:
        ops = InterpolateOps(_frozen(self.size), _frozen(self.scale_factor), self.mode, self.align_corners,
                             getattr(self, "recompute_scale_factor", None))
        return lrp_apply(ops, self.rule, input)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return inputs_nonnegative and self.mode in _CONVEX_MODES


class LRPUpsample(_UpsampleTwin, nn.Upsample):
    """``nn.Upsample`` with the Norm rule (see :class:`Interpolate`)."""


class LRPUpsamplingNearest2d(_UpsampleTwin, nn.UpsamplingNearest2d):
    """``nn.UpsamplingNearest2d`` with the Norm rule (see :class:`Interpolate`)."""


class LRPUpsamplingBilinear2d(_UpsampleTwin, nn.UpsamplingBilinear2d):
    """``nn.UpsamplingBilinear2d`` with the Norm rule (see :class:`Interpolate`)."""


#: ``{torch class: twin class}`` of the upsampling layers
UPSAMPLE_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Upsample: LRPUpsample, nn.UpsamplingNearest2d: LRPUpsamplingNearest2d,
    nn.UpsamplingBilinear2d: LRPUpsamplingBilinear2d, Interpolate: Interpolate,
}
