"""The one autograd Function of lrpx: forward is the layer, backward is the rule."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .rules.base import Layer, Rule, _compiling, stabilize

__all__ = ["LRPFunction", "lrp_apply", "fused_relu", "stabilize"]

_SLOTS = ("input", "weight", "bias", "output")


class LRPFunction(torch.autograd.Function):
    """Runs ``layer.forward`` and, in backward, ``rule.relevance``.

    Per-call state lives on ``ctx`` only, so a rule and a layer may be shared by many
    modules, calls and threads. Parameters get no gradient.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor | None, bias: Tensor | None, layer: Layer, rule: Rule,
                relu: bool = False) -> Tensor:
        output = layer.forward(input, weight, bias)
        if relu:
            output = fused_relu(output)
        values = {"input": input, "weight": weight, "bias": bias, "output": output}
        ctx.names = rule.saves
        ctx.save_for_backward(*(values[name] for name in rule.saves))
        ctx.layer, ctx.rule, ctx.relu = layer, rule, relu
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        saved = dict.fromkeys(_SLOTS)
        saved.update(zip(ctx.names, ctx.saved_tensors))
        rule = ctx.rule.relevance_after_relu if ctx.relu else ctx.rule.relevance
        relevance_in = rule(ctx.layer, relevance, **saved)
        return relevance_in, None, None, None, None, None


def fused_relu(output: Tensor) -> Tensor:
    """The ReLU a layer applies to its own output: in place in eager mode; out of place in a
    traced graph (torch 2.11's compiled backward on CUDA saw a zero output after an in-place
    one)."""
    return torch.relu(output) if _compiling() else output.relu_()


def lrp_apply(layer: Layer, rule: Rule, input: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
              *, relu: bool = False) -> Tensor:
    """Apply ``layer`` to ``input``; relevance flows back through ``rule``.

    ``relu=True`` applies a ReLU to the layer's output in place (``convert`` fuses a ReLU that
    alone reads a layer's output), so that the output the rule saves is the tensor the next
    layer reads anyway: the rule sees ``relu(z)`` for ``z``, the same where ``z > 0``, and the
    relevance of dead units (``z <= 0``) is zero, which it is whenever the next layers' rules
    are proportional to their inputs (all but Flat and WSquare).
    """
    return LRPFunction.apply(input, weight, bias, layer, rule, relu)
