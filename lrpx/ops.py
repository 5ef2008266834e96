"""Layer primitives for the rules, one small immutable description per layer call.

Each class names its ``kind`` (``lrpx.rules.KINDS``) and offers the primitives of that kind:
a weighted layer its forward ``f(x; W, b)`` and input VJP ``g(s; W)``, a parameter-free linear
map (``sum``) its forward and VJP, a normalisation its centring, and so on (``docs/rules.md``).
The VJPs call ATen's backward kernels directly (no autograd graph, no weight gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LinearOps", "ConvOps", "DiagonalOps", "AvgPoolOps", "AdaptiveAvgPoolOps", "MeanOps", "SumOps",
           "ElementwiseOps", "LayerNormOps", "GroupNormOps", "SoftmaxOps", "MatmulOps", "WeightMatmulOps",
           "ProductOps", "IndexAddOps"]

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
    """``F.linear``; VJP ``s @ W``. Each row (last axis) of the output depends on the same row
    of the input alone (``row_local``)."""

    kind: ClassVar[str] = "weighted"
    row_local: ClassVar[bool] = True
    channel_axis: int = -1
    input_nonnegative: bool = False

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        return s.matmul(weight)


@dataclass(frozen=True)
class ConvOps:
    """``F.conv{1,2,3}d`` with numeric padding; VJP by ``aten.convolution_backward``."""

    kind: ClassVar[str] = "weighted"
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

    kind: ClassVar[str] = "weighted"
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

    kind: ClassVar[str] = "sum"
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

    kind: ClassVar[str] = "sum"
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
    """``input.mean(dim, keepdim)`` (global average pooling written as a mean), or with
    ``total`` ``input.sum(dim, keepdim)``; VJP spreads ``s / n`` (``s``) over the reduced
    elements. ``dim=None`` reduces everything."""

    kind: ClassVar[str] = "sum"
    dim: tuple[int, ...] | None
    keepdim: bool = False
    channel_axis: int = 1
    #: the sum instead of the mean (``x.sum(dim)``)
    total: bool = False

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        reduce = torch.sum if self.total else torch.mean
        if self.dim is None:
            return reduce(input)
        return reduce(input, self.dim, keepdim=self.keepdim)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        shape = _shape(input)
        dims = range(len(shape)) if self.dim is None else [d % len(shape) for d in self.dim]
        count = 1
        for d in dims:
            count *= shape[d]
        if self.dim is not None and not self.keepdim:
            for d in sorted(dims):
                s = s.unsqueeze(d)
        return (s if self.total else s / count).expand(shape).contiguous()


@dataclass(frozen=True)
class SumOps:
    """The sum of broadcastable operands (a residual sum, ``x + parameter``); the VJP of each
    operand sums ``s`` over the dimensions it was broadcast along."""

    kind: ClassVar[str] = "sum"
    channel_axis: int = 1

    def forward(self, input: tuple[Tensor, ...], weight: None = None, bias: None = None) -> Tensor:
        output = input[0] + input[1]
        for t in input[2:]:
            output = output.add_(t)
        return output

    def vjp(self, s: Tensor, weight: None, input: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """``s`` summed to each operand's shape (``s`` itself, not a copy, where the shapes agree)."""
        return tuple(s.sum_to_size(t.shape) for t in input)


@dataclass(frozen=True)
class ElementwiseOps:
    """An element-wise function (an activation); its VJP is never needed by ``Pass``."""

    function: Callable[[Tensor], Tensor]
    kind: ClassVar[str] = "elementwise"
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        return self.function(input)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:  # pragma: no cover
        raise NotImplementedError("element-wise layers take the Pass rule")


@dataclass(frozen=True)
class LayerNormOps:
    """``F.layer_norm`` over the trailing ``normalized_shape``, read as ``y = c / sigma * w + b``
    with the centring ``c = x - mean(x)`` (a linear map of ``x``) and ``sigma`` held constant."""

    normalized_shape: tuple[int, ...]
    eps: float
    kind: ClassVar[str] = "normalization"

    def forward(self, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    def _dims(self) -> tuple[int, ...]:
        return tuple(range(-len(self.normalized_shape), 0))

    def centre(self, input: Tensor) -> Tensor:
        return input - input.mean(self._dims(), keepdim=True)

    def centre_vjp(self, s: Tensor) -> Tensor:
        """The VJP of the centring, ``s - mean(s)``, written into ``s``."""
        return s.sub_(s.mean(self._dims(), keepdim=True))

    def bias_like(self, bias: Tensor, output: Tensor) -> Tensor:
        return bias


@dataclass(frozen=True)
class GroupNormOps:
    """``F.group_norm``: per sample, the channels of one group at all positions are normalised."""

    num_groups: int
    eps: float
    kind: ClassVar[str] = "normalization"

    def forward(self, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def centre(self, input: Tensor) -> Tensor:
        grouped = input.reshape(input.shape[0], self.num_groups, -1)
        return (grouped - grouped.mean(-1, keepdim=True)).reshape(input.shape)

    def centre_vjp(self, s: Tensor) -> Tensor:
        grouped = s.reshape(s.shape[0], self.num_groups, -1)
        return grouped.sub_(grouped.mean(-1, keepdim=True)).reshape(s.shape)

    def bias_like(self, bias: Tensor, output: Tensor) -> Tensor:
        return bias.reshape(-1, *(1,) * (output.dim() - 2))


@dataclass(frozen=True)
class SoftmaxOps:
    """``torch.softmax(input, dim)``; with ``dtype``, computed in that dtype (``softmax(x, dim,
    dtype=torch.float32)``) and returned in the wider of it and the input's dtype, so that the
    rule works in at least the precision of both."""

    dim: int
    dtype: torch.dtype | None = None
    kind: ClassVar[str] = "softmax"

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        if self.dtype is None:
            return torch.softmax(input, self.dim)
        return torch.softmax(input, self.dim, dtype=self.dtype).to(torch.promote_types(input.dtype, self.dtype))


@dataclass(frozen=True)
class MatmulOps:
    """``a @ b`` of two activations (attention scores, attention times values), or
    ``torch.einsum(equation, a, b)`` (a product of two activations summed over shared indices)."""

    equation: str | None = None
    kind: ClassVar[str] = "bilinear"

    def forward(self, input: tuple[Tensor, Tensor], weight: None = None, bias: None = None) -> Tensor:
        return torch.matmul(*input) if self.equation is None else torch.einsum(self.equation, *input)

    def pair_vjp(self, s: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The VJPs of ``s`` for both factors: ``(s b^T, a^T s)`` for a matmul (broadcast over
        leading dimensions, not yet summed to the factors' shapes)."""
        if self.equation is None:
            return torch.matmul(s, b.mT), torch.matmul(a.mT, s)
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            return torch.autograd.grad(torch.einsum(self.equation, a_, b_), (a_, b_), s)


def einsum_operands(args: tuple) -> tuple | None:
    """The operands of ``torch.einsum(equation, *operands)`` or ``(equation, [operands])``, from
    its positional arguments (``None`` if they are not of that form)."""
    if not args or not isinstance(args[0], str):
        return None
    return tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else tuple(args[1:])


@dataclass(frozen=True)
class WeightMatmulOps:
    """``input @ weight`` (or ``weight @ input`` with ``weight_first``) with a ``weight`` that is
    not computed from the input: a linear map, for the weighted rules; VJP ``s @ weight^T``
    (``weight^T @ s``), summed to the input's shape over broadcast dimensions."""

    kind: ClassVar[str] = "weighted"
    weight_first: bool = False
    input_nonnegative: bool = False

    @property
    def channel_axis(self) -> int:
        return -2 if self.weight_first else -1

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        out = torch.matmul(weight, input) if self.weight_first else torch.matmul(input, weight)
        return out if bias is None else out + bias

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        g = torch.matmul(weight.mT, s) if self.weight_first else torch.matmul(s, weight.mT)
        shape = _shape(input)
        return g if g.shape == shape else g.sum_to_size(shape)


@dataclass(frozen=True)
class ProductOps:
    """``a * b`` (or ``a / b`` with ``divide``) of two tensors of the ``shapes`` of this call;
    ``signal`` is the operand that carries the signal (``0`` or ``1``: the other is a gate or a
    constant factor) or ``None`` (both: two activations)."""

    signal: int | None
    divide: bool = False
    shapes: tuple[torch.Size, ...] = ()
    kind: ClassVar[str] = "product"

    def forward(self, input: tuple[Tensor, Tensor], weight: None = None, bias: None = None) -> Tensor:
        a, b = input
        return a / b if self.divide else a * b


@dataclass(frozen=True, eq=False)
class IndexAddOps:
    """``input.index_add(dim, index, source)``: the sum of ``input`` and the slices of ``source``
    added at ``index`` along ``dim`` (a mixture of experts gathering its experts' outputs); VJP
    ``(s, s.index_select(dim, index))``."""

    dim: int
    index: Tensor
    kind: ClassVar[str] = "sum"
    channel_axis: int = 1

    def forward(self, input: tuple[Tensor, Tensor], weight: None = None, bias: None = None) -> Tensor:
        base, source = input
        return base.index_add(self.dim, self.index, source)

    def vjp(self, s: Tensor, weight: None, input: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return s, s.index_select(self.dim, self.index)
