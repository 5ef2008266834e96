"""Which layers of a converted model read inputs that are ``>= 0`` by construction.

Gamma, z+ and alpha-beta have a cheap form for non-negative inputs (one extra forward
instead of two or four). Deciding it from the data costs a reduction and, on a GPU, a
host synchronisation per layer (and a graph break under ``torch.compile``). This module
decides it from the model instead, reading the model graph that ``convert`` built: each twin
declares whether its output is ``>= 0`` given its inputs (``Twin.output_nonnegative``: ReLU,
sigmoid and softmax always, pooling and sums when their inputs are, a layer that applies a
fused ReLU), kept layers such as max pooling or dropout keep the sign, and so do reshapes,
indexing and concatenation in forward code. :func:`mark_nonnegative_inputs` sets
``input_nonnegative`` on each weighted twin whose every call reads such an input; the other
twins keep checking their input.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .graph import ModelGraph, join
from .layers import SIGN_KEEPING, Twin
from .rewrite import RESHAPES

__all__ = ["mark_nonnegative_inputs"]

#: forward-code operations whose output is >= 0 when their tensor inputs are
_FUNCTIONS = {torch.flatten, torch.cat, torch.stack, torch.concat, operator.getitem, torch.squeeze,
              torch.unsqueeze, torch.reshape, torch.permute, torch.transpose, torch.chunk, torch.split}
_METHODS = RESHAPES | {"chunk", "split", "__getitem__", "mean"}


def mark_nonnegative_inputs(model: nn.Module, graph: ModelGraph, *, input_nonnegative: bool = False) -> None:
    """Set ``input_nonnegative`` on each weighted twin whose every call reads a tensor that is
    ``>= 0`` by construction (in place on a converted model). ``input_nonnegative`` says
    whether the model's own input is."""
    verdicts: dict[int, bool] = {}
    _visit(model, "", input_nonnegative, verdicts, graph)
    for module in model.modules():
        if id(module) in verdicts and isinstance(module, Twin):
            module.input_nonnegative = verdicts[id(module)]


def _visit(module: nn.Module, name: str, nonneg: bool, verdicts: dict[int, bool], graph: ModelGraph) -> bool:
    """Whether ``module``'s output is >= 0 given whether its input is; records, per weighted
    twin, whether all its calls read non-negative inputs."""
    if isinstance(module, Twin):
        if module.lrp_kind == "weighted":
            verdicts[id(module)] = verdicts.get(id(module), True) and nonneg
        return module.output_nonnegative(nonneg)
    if isinstance(module, SIGN_KEEPING):
        return nonneg
    g = graph.graphs.get(name)
    if g is None:  # a leaf we know nothing of, or a module without a graph
        for child_name, child in module.named_children():
            _visit(child, join(name, child_name), False, verdicts, graph)
        return False
    return _visit_graph(module, name, g, nonneg, verdicts, graph)


def _visit_graph(module: nn.Module, name: str, g: fx.Graph, nonneg: bool, verdicts: dict[int, bool],
                 graph: ModelGraph) -> bool:
    signs: dict[fx.Node, bool] = {}
    first = True
    for node in g.nodes:
        inputs = [signs.get(a, False) for a in node.all_input_nodes]
        if node.op == "placeholder":
            signs[node], first = nonneg and first, False
        elif node.op == "call_module":
            tensors = [signs.get(a, False) for a in node.args if isinstance(a, fx.Node)]
            numbers = [a >= 0 for a in node.args if isinstance(a, (int, float))]  # x * 2, x / -1
            flag = bool(tensors) and all(tensors) and all(numbers) and len(tensors) + len(numbers) == len(node.args)
            child = module.get_submodule(node.target)
            signs[node] = _visit(child, join(name, node.target), flag, verdicts, graph)
        elif node.op == "call_function" and node.target in _FUNCTIONS or \
                node.op == "call_method" and node.target in _METHODS:
            signs[node] = bool(inputs) and all(inputs)
        elif node.op == "output":
            out = node.args[0]
            return isinstance(out, fx.Node) and signs.get(out, False)
        else:
            signs[node] = False
    return False
