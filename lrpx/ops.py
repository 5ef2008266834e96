"""Layer primitives for the rules: a forward ``f(x; W, b)`` and an input VJP ``g(s; W)``.

Each class is a small immutable description of one layer call. The VJPs call ATen's
backward kernels directly (no autograd graph, no weight gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearOps", "ConvOps", "DiagonalOps", "AvgPoolOps", "AdaptiveAvgPoolOps", "MeanOps", "ElementwiseOps"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _like(s: Tensor, input: Tensor | torch.Size) -> Tensor:
    """The input itself, or a tensor of its shape without memory, for kernels that only
    read the input's size (pass the real input where there is one: some kernels copy an
    expanded tensor into contiguous memory)."""
    return input if isinstance(input, Tensor) else s.new_empty(()).expand(input)


def _shape(input: Tensor | torch.Size) -> torch.Size:
    return input.shape if isinstance(input, Tensor) else torch.Size(input)


@dataclass(frozen=True)
class LinearOps:
    """``F.linear``; VJP ``s @ W``."""

    channel_axis: int = -1
    input_nonnegative: bool = False

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        return s.matmul(weight)


@dataclass(frozen=True)
class ConvOps:
    """``F.conv{1,2,3}d`` with numeric padding; VJP by ``aten.convolution_backward``."""

    dim: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    channel_axis: int = 1
    input_nonnegative: bool = False

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _CONV[self.dim](input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        return torch.ops.aten.convolution_backward(
            s, _like(s, input), weight, None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * self.dim, self.groups, [True, False, False],
        )[0]


@dataclass(frozen=True)
class DiagonalOps:
    """A per-channel affine map ``x * w + b`` (BatchNorm in eval mode); VJP ``s * w``."""

    channel_axis: int = 1
    input_nonnegative: bool = False

    def _view(self, t: Tensor, ndim: int) -> Tensor:
        shape = [1] * ndim
        shape[self.channel_axis] = -1
        return t.view(shape)

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = input * self._view(weight, input.dim())
        return out if bias is None else out + self._view(bias, input.dim())

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        return s * self._view(weight, s.dim())


def _as_2d(t: Tensor, dim: int) -> Tensor:
    return t.unsqueeze(-2) if dim == 1 else t


@dataclass(frozen=True)
class AvgPoolOps:
    """Average pooling; VJP by ``aten.avg_pool{2,3}d_backward`` (1d runs as 2d)."""

    dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None = None
    channel_axis: int = 1

    def _args(self) -> tuple:
        if self.dim == 1:
            return (1,) + self.kernel_size, (1,) + self.stride, (0,) + self.padding
        return self.kernel_size, self.stride, self.padding

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        k, st, p = self._args()
        pool = F.avg_pool3d if self.dim == 3 else F.avg_pool2d
        out = pool(_as_2d(input, self.dim), k, st, p, self.ceil_mode, self.count_include_pad, self.divisor_override)
        return out.squeeze(-2) if self.dim == 1 else out

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        k, st, p = self._args()
        shape = _shape(input)
        shape = shape[:-1] + (1,) + shape[-1:] if self.dim == 1 else shape
        back = torch.ops.aten.avg_pool3d_backward if self.dim == 3 else torch.ops.aten.avg_pool2d_backward
        g = back(_as_2d(s, self.dim), _like(s, shape),
                 list(k), list(st), list(p), self.ceil_mode, self.count_include_pad, self.divisor_override)
        return g.squeeze(-2) if self.dim == 1 else g


@dataclass(frozen=True)
class AdaptiveAvgPoolOps:
    """Adaptive average pooling; VJP by ``aten._adaptive_avg_pool{2,3}d_backward``."""

    dim: int
    output_size: tuple[int | None, ...]
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[self.dim]
        return pool(input, self.output_size if self.dim > 1 else self.output_size[0])

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        if self.dim == 3:
            return torch.ops.aten._adaptive_avg_pool3d_backward(s, _like(s, input))
        shape = _shape(input)
        shape = shape[:-1] + (1,) + shape[-1:] if self.dim == 1 else shape
        g = torch.ops.aten._adaptive_avg_pool2d_backward(_as_2d(s, self.dim), _like(s, shape))
        return g.squeeze(-2) if self.dim == 1 else g


@dataclass(frozen=True)
class MeanOps:
    """``input.mean(dim, keepdim)`` (global average pooling written as a mean); VJP spreads
    ``s / n`` over the averaged elements. ``dim=None`` averages everything."""

    dim: tuple[int, ...] | None
    keepdim: bool = False
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        if self.dim is None:
            return input.mean()
        return input.mean(self.dim, keepdim=self.keepdim)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        shape = _shape(input)
        dims = range(len(shape)) if self.dim is None else [d % len(shape) for d in self.dim]
        count = 1
        for d in dims:
            count *= shape[d]
        if self.dim is not None and not self.keepdim:
            for d in sorted(dims):
                s = s.unsqueeze(d)
        return (s / count).expand(shape).contiguous()


@dataclass(frozen=True)
class ElementwiseOps:
    """An element-wise function (an activation); its VJP is never needed by ``Pass``."""

    function: Callable[[Tensor], Tensor]
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        return self.function(input)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:  # pragma: no cover
        raise NotImplementedError("element-wise layers take the Pass rule")
