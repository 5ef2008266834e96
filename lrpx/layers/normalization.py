r"""Twins of LayerNorm, GroupNorm and torchvision's LayerNorm2d (AttnLRP's normalisation rule).

The layer is read as :math:`y = c / \sigma \cdot w + b` with :math:`c = x - \mathrm{mean}(x)`
over the normalised set and :math:`\sigma = \sqrt{\mathrm{var}(x) + \mathrm{eps}}` held constant
(Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML, Prop. 3.4 and Eq. 8): the division by :math:`\sigma` and the product with
:math:`w` pass relevance through, the bias takes its share of the sum :math:`n + b`, and the
linear centring takes the epsilon rule. Twins accept ``Norm(epsilon)`` (that rule) and
``Pass()`` (relevance passes the whole layer unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..rules.base import Rule, divide
from ..rules.elementwise import Norm, Pass
from .base import Twin

try:
    from torchvision.models.convnext import LayerNorm2d
except (ImportError, AttributeError):  # no torchvision, or convnext changed
    LayerNorm2d = None

__all__ = ["LRPLayerNorm", "LRPGroupNorm", "NORM_TWINS"]


def _doc(head: str, where: str) -> str:
    return head + r"""

    The layer is :math:`y = c / \sigma \cdot w + b` with :math:`c = x - \bar x` and :math:`\sigma`
    held constant; bars are means over the normalised set, """ + where + r""". Without affine
    parameters :math:`w = 1`, :math:`b = 0`. With ``Norm(epsilon)``, :math:`n = y - b` and
    :math:`\mathrm{stab}(z) = z + \epsilon\,\mathrm{sign}_0(z)`:

    .. math::

        R^n_i = n_i \frac{R_i}{\mathrm{stab}(y_i)}, \qquad
        s_i = \frac{R^n_i}{\mathrm{stab}(c_i)}, \qquad
        R^x_i = x_i \,(s_i - \bar s).

    With ``Pass()``, :math:`R^x = R`; ``from_module`` raises ``TypeError`` for any other rule.

    References
    ----------
    Achtibat et al. 2024, "AttnLRP", ICML, Prop. 3.4 and Eq. 8.
    """


def _affine_relevance(relevance: Tensor, output: Tensor, bias: Tensor | None, epsilon: float) -> Tensor:
    """``R_n = n * R / stab(y)`` with ``n = y - b``: the bias keeps its share."""
    n = output if bias is None else output - bias
    return divide(relevance, output, epsilon).mul_(n)


def _centring_relevance(input: Tensor, relevance: Tensor, dims: tuple[int, ...], epsilon: float) -> Tensor:
    """Epsilon rule of ``c = x - mean(x)`` over ``dims``: ``x * (s - mean(s))``, ``s = R / stab(c)``."""
    s = divide(relevance, input - input.mean(dims, keepdim=True), epsilon)
    return s.sub_(s.mean(dims, keepdim=True)).mul_(input)


@dataclass(frozen=True)
class _LayerNormOps:
    """``F.layer_norm`` over the trailing ``normalized_shape``."""

    normalized_shape: tuple[int, ...]
    eps: float

    def forward(self, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

    def relevance(self, relevance: Tensor, input: Tensor, output: Tensor, bias: Tensor | None,
                  epsilon: float) -> Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        return _centring_relevance(input, _affine_relevance(relevance, output, bias, epsilon), dims, epsilon)


@dataclass(frozen=True)
class _GroupNormOps:
    """``F.group_norm``: each sample's channel groups × all positions are normalised."""

    num_groups: int
    eps: float

    def forward(self, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        return F.group_norm(input, self.num_groups, weight, bias, self.eps)

    def relevance(self, relevance: Tensor, input: Tensor, output: Tensor, bias: Tensor | None,
                  epsilon: float) -> Tensor:
        if bias is not None:
            bias = bias.reshape(-1, *(1,) * (input.dim() - 2))
        r_n = _affine_relevance(relevance, output, bias, epsilon)
        grouped = (input.shape[0], self.num_groups, -1)
        return _centring_relevance(input.reshape(grouped), r_n.reshape(grouped), (-1,), epsilon).reshape(input.shape)


class _NormFunction(torch.autograd.Function):
    """Forward ``ops.forward``; backward ``ops.relevance`` (``epsilon=None``: identity)."""

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, ops, epsilon: float | None) -> Tensor:
        output = ops.forward(input, weight, bias)
        ctx.ops, ctx.epsilon = ops, epsilon
        if epsilon is not None:
            ctx.save_for_backward(input, output, bias)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        if ctx.epsilon is None:
            return relevance, None, None, None, None
        input, output, bias = ctx.saved_tensors
        return ctx.ops.relevance(relevance, input, output, bias, ctx.epsilon), None, None, None, None


class _NormTwin(Twin):
    lrp_kind = "sum"

    @classmethod
    def from_module(cls, module: nn.Module, rule: Rule):
        """A twin of ``module`` with ``rule`` (``Norm`` or ``Pass``); ``module`` is left unchanged."""
        if not isinstance(rule, (Norm, Pass)):
            raise TypeError(f"{cls.__name__} ({type(module).__name__}) takes the rules Norm or Pass, got {rule!r}")
        return super().from_module(module, rule)

    def _ops(self) -> _LayerNormOps | _GroupNormOps:
        return _LayerNormOps(tuple(self.normalized_shape), self.eps)

    def _normalize(self, input: Tensor) -> Tensor:
        epsilon = self.rule.epsilon if isinstance(self.rule, Norm) else None
        return _NormFunction.apply(input, self.weight, self.bias, self._ops(), epsilon)

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)


class LRPLayerNorm(_NormTwin, nn.LayerNorm):
    __doc__ = _doc("``nn.LayerNorm`` whose backward applies AttnLRP's normalisation rule.",
                   "the trailing ``normalized_shape`` dimensions")


class LRPGroupNorm(_NormTwin, nn.GroupNorm):
    __doc__ = _doc("``nn.GroupNorm`` whose backward applies AttnLRP's normalisation rule.",
                   "per sample the channels of one group at all positions")

    def _ops(self) -> _GroupNormOps:
        return _GroupNormOps(self.num_groups, self.eps)


#: ``{torch class: twin class}`` of the normalisation layers
NORM_TWINS: dict[type[nn.Module], type[nn.Module]] = {nn.LayerNorm: LRPLayerNorm, nn.GroupNorm: LRPGroupNorm}

if LayerNorm2d is not None:

    class LRPLayerNorm2d(_NormTwin, LayerNorm2d):
        __doc__ = _doc("torchvision's ConvNeXt ``LayerNorm2d`` (LayerNorm over the channels of NCHW) "
                       "whose backward applies AttnLRP's normalisation rule.", "the channels at one position")

        def forward(self, input: Tensor) -> Tensor:  # NCHW -> NHWC, LayerNorm over C, back
            return self._normalize(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    NORM_TWINS[LayerNorm2d] = LRPLayerNorm2d
    __all__.append("LRPLayerNorm2d")
