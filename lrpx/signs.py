"""Which layers of a converted model read inputs that are ``>= 0`` by construction.

Gamma, z+ and alpha-beta have a cheap form for non-negative inputs (one extra forward
instead of two or four). Deciding it from the data costs a reduction and, on a GPU, a
host synchronisation per layer (and a graph break under ``torch.compile``). This module
decides it from the model instead: an input is non-negative when it comes from a ReLU (or
another activation with non-negative range), possibly through max or average pooling,
reshapes, dropout, concatenation of such tensors or a layer that applies a fused ReLU.
:func:`mark_nonnegative_inputs` sets ``input_nonnegative`` on each such twin; the other
twins keep checking their input.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from .canonizers import RESHAPES, trace_children_as_leaves
from .layers import KEPT, Add, FusedReLU, Mean, Product, Twin, kind_of

__all__ = ["mark_nonnegative_inputs"]

#: activations whose output is >= 0
_NONNEGATIVE = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
#: layers whose output is >= 0 when their (first) input is; padding layers need a zero fill
_KEEPS_SIGN = tuple(c for c in KEPT if not issubclass(c, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)))
_KEEPS_SIGN += (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveAvgPool3d, Mean)
#: forward-code operations whose output is >= 0 when their tensor inputs are
_FUNCTIONS = {torch.flatten, torch.cat, torch.stack, torch.concat, operator.getitem, torch.squeeze,
              torch.unsqueeze, torch.reshape, torch.permute, torch.transpose, torch.chunk, torch.split}
_METHODS = RESHAPES | {"chunk", "split", "__getitem__", "mean"}


def mark_nonnegative_inputs(model: nn.Module, *, input_nonnegative: bool = False) -> None:
    """Set ``input_nonnegative`` on each weighted twin whose every call reads a tensor that is
    ``>= 0`` by construction (in place on a converted model). ``input_nonnegative`` says
    whether the model's own input is."""
    verdicts: dict[int, bool] = {}
    _visit(model, input_nonnegative, verdicts)
    for module in model.modules():
        if id(module) in verdicts and isinstance(module, Twin):
            module.input_nonnegative = verdicts[id(module)]


def _visit(module: nn.Module, nonneg: bool, verdicts: dict[int, bool]) -> bool:
    """Whether ``module``'s output is >= 0 given whether its input is; records, per weighted
    twin, whether all its calls read non-negative inputs."""
    if isinstance(module, Twin) and kind_of(module) == "weighted":
        verdicts[id(module)] = verdicts.get(id(module), True) and nonneg
        return module.fused_relu
    if isinstance(module, FusedReLU):  # the layer before applied it: its output is the input
        return nonneg
    if isinstance(module, _NONNEGATIVE):
        return True
    if isinstance(module, Add) and module.fused_relu:
        return True
    if isinstance(module, (Add, Product)) or isinstance(module, _KEEPS_SIGN):
        return nonneg
    if type(module) is nn.Sequential:
        for child in module:
            nonneg = _visit(child, nonneg, verdicts)
        return nonneg
    if not any(True for _ in module.children()):
        return False
    graph = _graph(module)
    if graph is None:
        for child in module.children():
            _visit(child, False, verdicts)
        return False
    return _visit_graph(module, graph, nonneg, verdicts)


def _graph(module: nn.Module) -> fx.Graph | None:
    if isinstance(module, fx.GraphModule):
        return module.graph
    try:
        return trace_children_as_leaves(module)
    except Exception:  # fx raises many types: the module is then analysed without its graph
        return None


def _visit_graph(module: nn.Module, graph: fx.Graph, nonneg: bool, verdicts: dict[int, bool]) -> bool:
    signs: dict[fx.Node, bool] = {}
    first = True
    for node in graph.nodes:
        inputs = [signs.get(a, False) for a in node.all_input_nodes]
        if node.op == "placeholder":
            signs[node], first = nonneg and first, False
        elif node.op == "call_module":
            tensors = [signs.get(a, False) for a in node.args if isinstance(a, fx.Node)]
            numbers = [a >= 0 for a in node.args if isinstance(a, (int, float))]  # x * 2, x / -1
            flag = bool(tensors) and all(tensors) and all(numbers) and len(tensors) + len(numbers) == len(node.args)
            signs[node] = _visit(module.get_submodule(node.target), flag, verdicts)
        elif node.op == "call_function" and node.target in _FUNCTIONS or \
                node.op == "call_method" and node.target in _METHODS:
            signs[node] = bool(inputs) and all(inputs)
        elif node.op == "output":
            out = node.args[0]
            return isinstance(out, fx.Node) and signs.get(out, False)
        else:
            signs[node] = False
    return False
