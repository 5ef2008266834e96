"""``Add``: the LRP-aware residual sum that replaces ``a + b`` in traced forward code."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core import fused_relu
from ..rules.base import Rule, divide, divide_after_relu
from ..rules.elementwise import Norm

__all__ = ["Add", "Product"]


class _AddFunction(torch.autograd.Function):
    """Sum of broadcastable operands; backward splits relevance in proportion to each
    operand's contribution: ``R_i = x_i * R / stab(sum_i x_i)`` (the Norm rule)."""

    @staticmethod
    def forward(ctx, epsilon: float, relu: bool, *operands: Tensor) -> Tensor:
        output = operands[0] + operands[1]
        for t in operands[2:]:
            output = output.add_(t)
        if relu:  # a fused ReLU: the saved sum is the ReLU output the next layer reads
            output = fused_relu(output)
        ctx.epsilon, ctx.relu = epsilon, relu
        ctx.save_for_backward(output, *operands)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        output, *operands = ctx.saved_tensors
        divide_ = divide_after_relu if ctx.relu else divide  # a fused ReLU: dead units pass nothing
        s = divide_(relevance, output, ctx.epsilon)
        *first, last = operands
        shares = [(t * s).sum_to_size(t.shape) for t in first]
        # the last share may take s's own buffer (no broadcast: s is not read again)
        shares.append(s.mul_(last) if last.shape == s.shape else (last * s).sum_to_size(last.shape))
        return (None, None, *shares)


class Add(nn.Module):
    """``operands[0] + operands[1] + ...`` with relevance split by the ``Norm`` rule.

    Non-tensor operands (a Python number added in traced code) fall back to ``+``.
    """

    #: apply the ReLU that alone reads the sum (set by ``convert``, as for weighted twins)
    fused_relu: bool = False

    def __init__(self, rule: Rule | None = None) -> None:
        super().__init__()
        self.rule = Norm() if rule is None else rule

    @classmethod
    def from_module(cls, module: "Add", rule: Rule) -> "Add":
        return cls(rule)

    def forward(self, *operands):
        if len(operands) < 2 or not all(isinstance(t, Tensor) for t in operands):
            out = operands[0]
            for t in operands[1:]:
                out = out + t
            return out.relu() if self.fused_relu else out
        return _AddFunction.apply(self.rule.epsilon, self.fused_relu, *operands)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}" + (", then ReLU (fused)" if self.fused_relu else "")


class _ProductFunction(torch.autograd.Function):
    """``a * b`` (or ``a / b``); backward gives all relevance to operand ``signal`` or, with
    ``signal=None``, half of it to each operand."""

    @staticmethod
    def forward(ctx, signal: int | None, divide_: bool, a: Tensor | float, b: Tensor | float) -> Tensor:
        ctx.signal = signal
        ctx.shapes = tuple(t.shape if isinstance(t, Tensor) else None for t in (a, b))
        return a / b if divide_ else a * b

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        if ctx.signal is None:
            half = relevance * 0.5
            return (None, None, *(half.sum_to_size(shape) for shape in ctx.shapes))
        out: list = [None, None]
        out[ctx.signal] = relevance.sum_to_size(ctx.shapes[ctx.signal])
        return (None, None, *out)


class Product(nn.Module):
    r"""``a * b`` or ``a / b`` in forward code, with the relevance going where it belongs.

    * ``signal=i``: operand ``i`` gets all the relevance, the other none. This is the rule
      for a gate, ``x * sigmoid(...)`` in squeeze-excitation (signal-take-all, Arras et al.
      2017), and for a constant factor: layer scale ``gamma * x``, ``x / 255`` (a diagonal
      linear layer without bias, whose epsilon rule is the identity up to the stabilizer).
    * ``signal=None``: two activations multiplied, each gets half (the uniform rule, AttnLRP,
      Achtibat et al. 2024, Prop. 3.2).

    .. math:: R_{\text{signal}} = R \quad\text{or}\quad R_a = R_b = R / 2

    summed over broadcast dimensions. A Python number operand makes the tensor the signal.
    """

    def __init__(self, signal: int | None = 0, divide: bool = False) -> None:
        super().__init__()
        if signal not in (0, 1, None):
            raise ValueError(f"signal is 0, 1 or None, got {signal!r}")
        self.signal, self.divide = signal, bool(divide)

    def forward(self, a, b):
        tensors = [isinstance(t, Tensor) for t in (a, b)]
        if not all(tensors):
            if not any(tensors):
                return a / b if self.divide else a * b
            # one tensor and a number: the tensor takes all relevance
            return _ProductFunction.apply(0 if tensors[0] else 1, self.divide, a, b)
        return _ProductFunction.apply(self.signal, self.divide, a, b)

    def extra_repr(self) -> str:
        who = "half each" if self.signal is None else f"signal={self.signal}"
        return f"{'divide' if self.divide else 'multiply'}, {who}"
