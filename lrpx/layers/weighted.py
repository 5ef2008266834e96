"""Twins of the weighted layers: Linear, Conv1d/2d/3d, BatchNorm as a per-channel affine map."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import ConvOps, DiagonalOps, LinearOps
from .base import Twin

__all__ = ["LRPLinear", "LRPConv1d", "LRPConv2d", "LRPConv3d",
           "LRPBatchNorm1d", "LRPBatchNorm2d", "LRPBatchNorm3d", "batchnorm_affine"]

_LINEAR, _LINEAR_NONNEGATIVE = LinearOps(), LinearOps(input_nonnegative=True)


class _WeightedTwin(Twin):
    lrp_kind = "weighted"
    lrp_fusable = True


class LRPLinear(_WeightedTwin, nn.Linear):
    """``nn.Linear`` whose backward applies its LRP rule."""

    def forward(self, input: Tensor) -> Tensor:
        ops = _LINEAR_NONNEGATIVE if self.input_nonnegative else _LINEAR
        return lrp_apply(ops, self.rule, input, self.weight, self.bias, relu=self.fused_relu)


class _ConvTwin(_WeightedTwin):
    def forward(self, input: Tensor) -> Tensor:
        dim, rule = len(self.kernel_size), self.rule
        padding, pad, mode = self.padding, None, "zeros"
        if self.padding_mode != "zeros":
            # the padded tensor is the layer input; F.pad's gradient sums relevance back
            pad, mode, padding = self._reversed_padding_repeated_twice, self.padding_mode, (0,) * dim
        elif isinstance(padding, str):
            padding, pad = _string_padding(padding, self.kernel_size, self.dilation)
        if pad is not None:
            input = F.pad(input, pad, mode=mode if mode != "zeros" else "constant")
            rule = rule.padded(pad, mode)
        ops = ConvOps(dim, tuple(self.stride), tuple(padding), tuple(self.dilation), self.groups,
                      input_nonnegative=self.input_nonnegative)
        return lrp_apply(ops, rule, input, self.weight, self.bias, relu=self.fused_relu)


def _string_padding(mode: str, kernel_size, dilation) -> tuple[tuple[int, ...], list[int] | None]:
    """Numeric padding for 'valid'/'same'; an explicit (asymmetric) pad when needed."""
    if mode == "valid":
        return (0,) * len(kernel_size), None
    totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
    if all(t % 2 == 0 for t in totals):
        return tuple(t // 2 for t in totals), None
    pad: list[int] = []
    for t in reversed(totals):
        pad += [t // 2, t - t // 2]
    return (0,) * len(kernel_size), pad


class LRPConv1d(_ConvTwin, nn.Conv1d):
    """``nn.Conv1d`` whose backward applies its LRP rule (all padding modes, groups, dilation)."""


class LRPConv2d(_ConvTwin, nn.Conv2d):
    """``nn.Conv2d`` whose backward applies its LRP rule (all padding modes, groups, dilation)."""


class LRPConv3d(_ConvTwin, nn.Conv3d):
    """``nn.Conv3d`` whose backward applies its LRP rule (all padding modes, groups, dilation)."""


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(x) == x * scale + shift`` per channel in eval mode."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("a BatchNorm without running statistics (track_running_stats=False) "
                         "normalises by batch statistics and is not a fixed affine map")
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


class _BatchNormTwin(_WeightedTwin):
    def forward(self, input: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError(f"{type(self).__name__} explains eval-mode BatchNorm only; call .eval() on the model")
        scale, shift = batchnorm_affine(self)
        ops = DiagonalOps(input_nonnegative=self.input_nonnegative)
        return lrp_apply(ops, self.rule, input, scale, shift, relu=self.fused_relu)


class LRPBatchNorm1d(_BatchNormTwin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` (eval) as the affine layer ``x * scale + shift`` with an LRP rule."""


class LRPBatchNorm2d(_BatchNormTwin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (eval) as the affine layer ``x * scale + shift`` with an LRP rule."""


class LRPBatchNorm3d(_BatchNormTwin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` (eval) as the affine layer ``x * scale + shift`` with an LRP rule."""
