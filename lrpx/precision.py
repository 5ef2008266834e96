"""Precision round trips: forward code that casts an activation to a lower precision, scales it
by constants and casts it back (transformers' RMSNorm computes in float32 inside a float64 or
bfloat16 model). Each link passes all of its relevance on, so the relevance of the chain's end
is that of its start; through the chain it would be rounded to the lower precision. The chain
keeps its forward and hands its relevance to its start unrounded.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor, nn

from .graph import ModelGraph
from .layers import Product
from .rewrite import CASTS, tags
from .rules.attention import Uniform
from .statistics import held

__all__ = ["tunnel_all", "tunnel_round_trips", "relevance_to"]


def tunnel_all(model: nn.Module, graph: ModelGraph) -> None:
    """:func:`tunnel_round_trips` on the forward of every traced module of ``model`` (after
    :func:`lrpx.rewrite.rewrite_functional`); edited modules are marked ``changed``."""
    for name, g in graph.items():
        if tunnel_round_trips(model.get_submodule(name) if name else model, g):
            graph.changed.add(name)


def tunnel_round_trips(module: nn.Module, graph: fx.Graph) -> bool:
    """Let relevance skip a precision round trip: a chain that casts an activation (say float64 to
    float32), multiplies it by constants (a held statistic, a norm's weight) and casts it back
    (Hugging Face's RMSNorm computes so) passes all of its relevance from end to start, link by
    link; through the chain itself it would be rounded to the lower precision on the way.
    The chain then runs on the detached activation (its forward unchanged) and its end passes
    its relevance straight to the start (:func:`relevance_to`). Whether anything changed."""
    kinds, changed = tags(graph), False
    for start in [n for n in graph.nodes if _is_cast(n) and kinds.get(n.args[0]) == "input"]:
        chain = [start]
        while True:
            users = [u for u in chain[-1].users if not _reads_as_constant(u)]
            if len(users) != 1 or not _passes_all(module, users[0], chain[-1], kinds):
                break
            chain.append(users[0])
        if sum(_is_cast(n) for n in chain) < 2:
            continue
        source, end = start.args[0], chain[-1]
        with graph.inserting_before(start):
            start.replace_input_with(source, graph.call_function(held, (source,)))
        with graph.inserting_after(end):
            tunnel = graph.call_function(relevance_to, (end, source))
        end.replace_all_uses_with(tunnel, delete_user_cb=lambda user: user is not tunnel)
        changed = True
    return changed


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in CASTS and bool(node.args)


def _reads_as_constant(node: fx.Node) -> bool:
    """A reader that takes no relevance: a statistic's ``held`` or a size/dtype attribute."""
    return (node.op == "call_function" and node.target in (held, getattr)) or \
        (node.op == "call_method" and node.target in ("size", "dim"))


def _passes_all(module: nn.Module, node: fx.Node, source: fx.Node, kinds: dict[fx.Node, str]) -> bool:
    """Whether ``node`` gives all of its relevance to ``source``: a cast of it, or a product
    (:class:`Product` with the built-in rule) whose other factor is a constant."""
    if _is_cast(node):
        return node.args[0] is source
    if node.op != "call_module" or not isinstance(layer := module.get_submodule(node.target), Product):
        return False
    if type(layer.rule) is not Uniform or layer.signal is None or node.args[layer.signal] is not source:
        return False
    other = node.args[1 - layer.signal]
    return not isinstance(other, fx.Node) or kinds.get(other) == "constant"


def relevance_to(value: Tensor, source: Tensor) -> Tensor:
    """``value`` (computed from ``source`` through operations that each pass all relevance on),
    whose relevance goes to ``source`` unchanged, in ``source``'s dtype."""
    return _RelevanceTo.apply(value, source)


class _RelevanceTo(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(value: Tensor, source: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.shape, ctx.dtype = inputs[1].shape, inputs[1].dtype

    @staticmethod
    def backward(ctx, relevance: Tensor):
        if relevance.shape != ctx.shape:
            relevance = relevance.sum_to_size(ctx.shape)
        return None, relevance.to(ctx.dtype)
