"""Layers for the sums and products that forward code writes as operators: ``Add`` replaces
``a + b``, ``Product`` ``a * b`` / ``a / b`` and ``Matmul`` ``a @ b`` of two activations when
``convert`` traces a model."""
from __future__ import annotations

import operator
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import ElementwiseOps, MatmulOps, ProductOps, SumOps, WeightMatmulOps
from ..rules.base import Rule
from ..rules.attention import Uniform
from ..rules.linear import Epsilon
from ..rules.elementwise import Norm, Pass
from .base import Twin

__all__ = ["Add", "Product", "Matmul", "Normalize"]

_SUM = SumOps()
_MATMUL = MatmulOps()
_PASS = Pass()


class _OwnLayer(Twin, nn.Module):
    """A layer that exists only in converted models: built with its rule, no torch original."""

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        self.check_rule(rule)
        self.rule = rule

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}" + (", then ReLU (fused)" if self.fused_relu else "")


class Add(_OwnLayer):
    """``operands[0] + operands[1] + ...`` with relevance split by the ``Norm`` rule (in
    proportion to each operand's contribution, ``R_i = x_i R / stab(sum_j x_j)``).

    A Python number among tensor operands (``x + 1``, ``a - b`` written as ``a + b * -1``) is a
    constant operand: it takes its share like a bias. Without a tensor operand it is ``+``.
    """

    lrp_kind = "sum"
    lrp_fusable = True

    def __init__(self, rule: Rule | None = None) -> None:
        super().__init__(Norm() if rule is None else rule)

    @classmethod
    def from_module(cls, module: "Add", rule: Rule) -> "Add":
        return cls(rule)

    def forward(self, *operands):
        if len(operands) >= 2 and all(isinstance(t, Tensor) for t in operands):  # a residual sum
            return lrp_apply(_SUM, self.rule, operands, relu=self.fused_relu)
        tensor = next((t for t in operands if isinstance(t, Tensor)), None)
        if len(operands) < 2 or tensor is None or not all(isinstance(t, (Tensor, int, float)) for t in operands):
            out = operands[0]
            for t in operands[1:]:
                out = out + t
            return out.relu() if self.fused_relu else out
        # a number is a constant operand, which takes its share of the relevance like a bias
        operands = tuple(t if isinstance(t, Tensor) else torch.tensor(t, dtype=tensor.dtype, device=tensor.device)
                         for t in operands)
        return lrp_apply(_SUM, self.rule, operands, relu=self.fused_relu)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return self.fused_relu or inputs_nonnegative


class Product(_OwnLayer):
    r"""``a * b`` or ``a / b`` in forward code, with the relevance going where it belongs.

    ``signal`` says which operands carry the signal, as ``convert`` finds them in the traced
    code: ``0`` or ``1`` when the other operand is a gate (``x * sigmoid(...)`` in
    squeeze-excitation) or a constant factor (layer scale ``gamma * x``, ``x / 255``: a diagonal
    linear map without bias), ``None`` for two activations. The rule (``Uniform``) gives all
    relevance to the one signal operand, or half to each of two (AttnLRP, Prop. 3.2):

    .. math:: R_{\text{signal}} = R \quad\text{or}\quad R_a = R_b = R / 2

    summed over broadcast dimensions. A Python number operand makes the tensor the signal.
    """

    lrp_kind = "product"

    def __init__(self, signal: int | None = 0, divide: bool = False, rule: Rule | None = None) -> None:
        if signal not in (0, 1, None):
            raise ValueError(f"signal is 0, 1 or None, got {signal!r}")
        super().__init__(Uniform() if rule is None else rule)
        self.signal, self.divide = signal, bool(divide)

    @classmethod
    def from_module(cls, module: "Product", rule: Rule) -> "Product":
        return cls(module.signal, module.divide, rule)

    def forward(self, a, b):
        tensors = [isinstance(t, Tensor) for t in (a, b)]
        if all(tensors):
            return lrp_apply(ProductOps(self.signal, self.divide, (a.shape, b.shape)), self.rule, (a, b))
        if not any(tensors):
            return a / b if self.divide else a * b
        # a tensor and a number: a constant factor, which passes the relevance to the tensor
        tensor, number = (a, b) if tensors[0] else (b, a)
        op = operator.truediv if self.divide else operator.mul
        function = (lambda t: op(t, number)) if tensors[0] else (lambda t: op(number, t))
        return lrp_apply(ElementwiseOps(function), _PASS, tensor)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return inputs_nonnegative

    def extra_repr(self) -> str:
        who = "half each" if self.signal is None else f"signal={self.signal}"
        return f"{'divide' if self.divide else 'multiply'}, {who}, rule={self.rule!r}"


class Matmul(_OwnLayer):
    r"""``a @ b`` of two activations in forward code (attention scores ``q @ k.T``, attention
    times values), with the AttnLRP product rule (:class:`lrpx.rules.Uniform`: the epsilon
    rule on each factor, relevance split evenly between them; see
    :func:`lrpx.layers.attention.lrp_matmul`)."""

    lrp_kind = "bilinear"

    def __init__(self, rule: Rule | None = None, equation: str | None = None) -> None:
        super().__init__(Uniform(1e-6) if rule is None else rule)
        self.equation = equation
        self._ops = _MATMUL if equation is None else MatmulOps(equation)

    @classmethod
    def from_module(cls, module: "Matmul", rule: Rule) -> "Matmul":
        return cls(rule, module.equation)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if self.equation is None and (a.dim() < 2 or b.dim() < 2):
            return a @ b  # a vector product: its gradient (no rule for this case)
        return lrp_apply(self._ops, self.rule, (a, b))

    def extra_repr(self) -> str:
        return (f"equation={self.equation!r}, " if self.equation else "") + f"rule={self.rule!r}"


class WeightMatmul(_OwnLayer):
    r"""``x @ w`` (or ``w @ x`` with ``weight_first``) in forward code with a factor ``w``
    computed from parameters and constants alone (a relative position table, a fixed mixing
    matrix): the linear map with weight ``w``, under a weighted rule (the composite's default:
    ``Epsilon``), as ``F.linear`` would be."""

    lrp_kind = "weighted"

    def __init__(self, rule: Rule | None = None, weight_first: bool = False) -> None:
        super().__init__(Epsilon() if rule is None else rule)
        self.weight_first = weight_first
        self._ops = WeightMatmulOps(weight_first)

    @classmethod
    def from_module(cls, module: "WeightMatmul", rule: Rule) -> "WeightMatmul":
        return cls(rule, module.weight_first)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x, w = (b, a) if self.weight_first else (a, b)
        if x.dim() < 2 or w.dim() < 2:
            return a @ b  # a vector product: its gradient (no rule for this case)
        return lrp_apply(self._ops, self.rule, x, w.detach(), None)

    def extra_repr(self) -> str:
        return ("weight first, " if self.weight_first else "") + f"rule={self.rule!r}"


class Normalize(_OwnLayer):
    r"""``F.normalize(x, p, dim, eps)`` in forward code (cosine attention, normalised
    embeddings): :math:`x / \max(\lVert x\rVert_p, \epsilon)` along ``dim``, read as a division
    by a constant as the normalisation rule reads it, so ``Pass`` (the default) hands the
    relevance to :math:`x` unchanged."""

    lrp_kind = "elementwise"

    def __init__(self, p: float = 2.0, dim: int = 1, eps: float = 1e-12, rule: Rule | None = None) -> None:
        super().__init__(_PASS if rule is None else rule)
        self.p, self.dim, self.eps = p, dim, eps

    @classmethod
    def from_module(cls, module: "Normalize", rule: Rule) -> "Normalize":
        return cls(module.p, module.dim, module.eps, rule)

    def forward(self, x: Tensor) -> Tensor:
        return lrp_apply(ElementwiseOps(partial(F.normalize, p=self.p, dim=self.dim, eps=self.eps)), self.rule, x)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return inputs_nonnegative

    def extra_repr(self) -> str:
        return f"p={self.p}, dim={self.dim}, rule={self.rule!r}"
