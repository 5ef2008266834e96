"""The one autograd Function of lrpx: forward is the layer, backward is the rule.

Every twin computes its output through :func:`lrp_apply`: the layer description (``lrpx.ops``)
gives the forward and the primitives of its kind, the rule (``lrpx.rules``) turns the
relevance arriving at the output into the relevance of each input. Parameters get no
gradient; an input that is a tuple (the operands of a sum or product) gets one relevance per
operand.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .rules.base import Layer, Rule, batched, compiling, stabilize

__all__ = ["LRPFunction", "lrp_apply", "fused_relu", "stabilize"]


class LRPFunction(torch.autograd.Function):
    """Runs ``layer.forward`` and, in backward, ``rule.relevance``.

    Per-call state lives on ``ctx`` only, so a rule and a layer may be shared by many
    modules, calls and threads.
    """

    #: forward and backward are torch code on tensors, so ``torch.func.vmap`` batches them; the
    #: rules write into no saved tensor when the relevance holds the rows of a batched backward
    #: (one forward, many relevances at the output: ``lrpx.concepts.attribute``)
    generate_vmap_rule = True

    @staticmethod
    def forward(layer: Layer, rule: Rule, relu: bool, weight: Tensor | None, bias: Tensor | None,
                *inputs: Tensor) -> Tensor:
        output = layer.forward(inputs[0] if len(inputs) == 1 else inputs, weight, bias)
        return fused_relu(output) if relu else output

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        layer, rule, relu, weight, bias, *operands = inputs
        names = rule.saves_for(layer)
        saved: list = []
        for name in names:
            if name == "input":
                saved.extend(operands)
            else:
                saved.append(weight if name == "weight" else bias if name == "bias" else output)
        ctx.save_for_backward(*saved)
        ctx.names, ctx.count = names, len(operands)
        ctx.layer, ctx.rule, ctx.relu = layer, rule, relu

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        saved = {"input": None, "weight": None, "bias": None, "output": None}
        values, count, at = ctx.saved_tensors, ctx.count, 0
        for name in ctx.names:
            if name == "input":
                saved[name] = values[at] if count == 1 else values[at:at + count]
                at += count
            else:
                saved[name] = values[at]
                at += 1
        rule = ctx.rule.relevance_after_relu if ctx.relu else ctx.rule.relevance
        live = _live_rows(ctx.layer, ctx.rule, relevance) if ctx.count == 1 and saved["input"] is not None else None
        if live is not None:  # the rule on the rows that carry relevance; the others get none
            shape = saved["input"].shape
            saved = {k: _rows(v, live) if k in ("input", "output") and v is not None else v
                     for k, v in saved.items()}
            relevance = _rows(relevance, live)
        dtype = relevance.dtype
        if dtype in _HALF:  # the rule in float32, its result in the dtype of the inputs
            saved = {k: _float(v) for k, v in saved.items()}
            relevance_in = rule(ctx.layer, relevance.float(), **saved)
            relevance_in = relevance_in.to(dtype) if isinstance(relevance_in, Tensor) else \
                tuple(None if r is None else r.to(dtype) for r in relevance_in)
        else:
            relevance_in = rule(ctx.layer, relevance, **saved)
        if live is not None:
            rows = relevance_in.new_zeros((shape.numel() // shape[-1], shape[-1]))
            relevance_in = rows.index_copy_(0, live, relevance_in).view(shape)
        if ctx.count == 1:
            return None, None, None, None, None, relevance_in
        return (None, None, None, None, None, *relevance_in)


_HALF = (torch.float16, torch.bfloat16)

#: off the CPU, reading which rows are live makes the host wait for the device: worth it only
#: for relevance this large (a language model's head: tokens x vocabulary)
_LARGE = 1 << 22


def _live_rows(layer: Layer, rule: Rule, relevance: Tensor) -> Tensor | None:
    """The indices of the rows (last axis) of ``relevance`` that are not all zero, when at most
    half of them are and both the layer and the rule act on each row alone (``row_local``): a
    language model's head, of whose tokens x vocabulary logits one row is explained. ``None``
    (all rows) otherwise, and in batched backward passes and under ``torch.compile``."""
    if not (getattr(layer, "row_local", False) and getattr(rule, "row_local", False)) or relevance.dim() < 2:
        return None
    rows = relevance.numel() // max(relevance.shape[-1], 1)
    if rows < 2 or compiling() or batched(relevance):
        return None
    if relevance.device.type != "cpu" and relevance.numel() < _LARGE:
        return None
    flat = relevance.reshape(rows, -1)
    if rows > 16:  # 8 rows spread over all first: most of them live, the layer is dense (the usual)
        sample = flat[::rows // 8][:8]
        if 2 * int(_live(sample).sum()) > sample.shape[0]:
            return None
    live = _live(flat).nonzero().squeeze(1)
    return live if 2 * live.numel() <= rows else None


def _live(rows: Tensor) -> Tensor:
    """Which rows are not all zero (NaN counts as not zero): two vectorised reductions."""
    return (rows.amax(-1) != 0).logical_or_(rows.amin(-1) != 0)


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """The rows ``index`` of ``t`` flattened to (rows, last axis)."""
    return t.reshape(-1, t.shape[-1]).index_select(0, index)


def _float(value):
    """Half-precision tensors (alone or in a tuple) as float32."""
    if isinstance(value, tuple):
        return tuple(_float(v) for v in value)
    return value.float() if isinstance(value, Tensor) and value.dtype in _HALF else value


def fused_relu(output: Tensor) -> Tensor:
    """The ReLU a layer applies to its own output: in place in eager mode; out of place in a
    traced graph (torch 2.11's compiled backward on CUDA saw a zero output after an in-place
    one)."""
    return torch.relu(output) if compiling() else output.relu_()


def lrp_apply(layer: Layer, rule: Rule, input: Tensor | tuple[Tensor, ...], weight: Tensor | None = None,
              bias: Tensor | None = None, *, relu: bool = False) -> Tensor:
    """Apply ``layer`` to ``input`` (a tensor, or a tuple of operands); relevance flows back
    through ``rule``.

    ``relu=True`` applies a ReLU to the layer's output in place (``convert`` fuses a ReLU that
    alone reads a layer's output), so that the output the rule saves is the tensor the next
    layer reads anyway: the rule sees ``relu(z)`` for ``z``, the same where ``z > 0``, and the
    relevance of dead units (``z <= 0``) is zero, which it is whenever the next layers' rules
    are proportional to their inputs (all but Flat and WSquare).
    """
    inputs = input if isinstance(input, tuple) else (input,)
    return LRPFunction.apply(layer, rule, relu, weight, bias, *inputs)
