"""``Add``: the LRP-aware residual sum that replaces ``a + b`` in traced forward code."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..rules.base import Rule, divide
from ..rules.elementwise import Norm

__all__ = ["Add"]


class _AddFunction(torch.autograd.Function):
    """Sum of broadcastable operands; backward splits relevance in proportion to each
    operand's contribution: ``R_i = x_i * R / stab(sum_i x_i)`` (the Norm rule)."""

    @staticmethod
    def forward(ctx, epsilon: float, *operands: Tensor) -> Tensor:
        output = operands[0]
        for t in operands[1:]:
            output = output + t
        ctx.epsilon = epsilon
        ctx.save_for_backward(output, *operands)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        output, *operands = ctx.saved_tensors
        s = divide(relevance, output, ctx.epsilon)
        return (None, *((t * s).sum_to_size(t.shape) for t in operands))


class Add(nn.Module):
    """``operands[0] + operands[1] + ...`` with relevance split by the ``Norm`` rule.

    Non-tensor operands (a Python number added in traced code) fall back to ``+``.
    """

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
            return out
        return _AddFunction.apply(self.rule.epsilon, *operands)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"
