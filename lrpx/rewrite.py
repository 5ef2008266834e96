"""Functional operations in forward code become layers that take a rule.

Tensor additions (ResNet's ``out += identity``) become :class:`lrpx.layers.Add`, products
:class:`lrpx.layers.Product`, ``F.relu``/``torch.sigmoid``/... activation layers,
``F.avg_pool2d``/``F.adaptive_avg_pool2d`` pooling layers, ``x.mean(dims)``
:class:`lrpx.layers.Mean` and ``F.softmax`` ``nn.Softmax``; in-place calls become out-of-place.
:func:`rewrite_functional` edits the graphs of a :class:`lrpx.graph.ModelGraph`; the modules
whose forward changed become ``torch.fx.GraphModule`` objects when the graph is materialised.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph import ModelGraph
from .layers import Add, Interpolate, Mean, Normalize, Product

__all__ = ["rewrite_functional", "RESHAPES", "tags"]

_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_METHODS = {"add_": "add", "relu_": "relu", "mul_": "mul", "sigmoid_": "sigmoid", "clamp_": "clamp",
                    "hardtanh_": "hardtanh", "tanh_": "tanh"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div}
_GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
#: tensor methods that only reshape, view or repeat their input
RESHAPES = frozenset({"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "permute",
                      "transpose", "contiguous"})
_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
#: functional calls that become layers: ``{function: (module class, its arguments after the input)}``
_FUNCTIONS: dict = {
    F.relu: (nn.ReLU, ("inplace",)), torch.relu: (nn.ReLU, ()), F.relu6: (nn.ReLU6, ("inplace",)),
    F.gelu: (nn.GELU, ("approximate",)), F.silu: (nn.SiLU, ("inplace",)), F.mish: (nn.Mish, ("inplace",)),
    F.hardswish: (nn.Hardswish, ("inplace",)), F.hardsigmoid: (nn.Hardsigmoid, ("inplace",)),
    torch.sigmoid: (nn.Sigmoid, ()), F.sigmoid: (nn.Sigmoid, ()), torch.tanh: (nn.Tanh, ()), F.tanh: (nn.Tanh, ()),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")), F.elu: (nn.ELU, ("alpha", "inplace")),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace")), F.softplus: (nn.Softplus, ("beta", "threshold")),
    F.softmax: (nn.Softmax, ("dim", "_stacklevel", "dtype")), torch.softmax: (nn.Softmax, ("dim", "dtype")),
    F.avg_pool1d: (nn.AvgPool1d, _POOL_ARGS[:-1]), F.avg_pool2d: (nn.AvgPool2d, _POOL_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _POOL_ARGS), F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)), torch.mean: (Mean, ("dim", "keepdim", "dtype")),
    F.normalize: (Normalize, ("p", "dim", "eps", "out")),
}
#: the parameters of ``F.interpolate`` after the input, in order
_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_METHODS: dict = {"relu": (nn.ReLU, ()), "sigmoid": (nn.Sigmoid, ()), "tanh": (nn.Tanh, ()),
                  "softmax": (nn.Softmax, ("dim", "dtype")), "mean": (Mean, ("dim", "keepdim", "dtype"))}


def rewrite_functional(model: nn.Module, graph: ModelGraph) -> None:
    """Rewrite the functional operations in the forward code of every traced module of
    ``model`` into layers: the graphs are edited, the new layers become children of their
    modules (in place), and the edited modules are marked ``changed`` (see
    :meth:`lrpx.graph.ModelGraph.materialize`)."""
    for name, g in graph.items():
        module = model.get_submodule(name) if name else model
        if _rewrite_graph(module, g):
            graph.changed.add(name)


def _rewrite_graph(module: nn.Module, graph: fx.Graph) -> bool:
    """Edit ``graph`` (the forward of ``module``); whether anything changed."""
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
        if node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]
            changed = True
    for node in list(graph.nodes):
        layer = _as_module(node)
        if layer is not None:
            _replace(module, graph, node, layer, (node.args[0],))
            changed = True
        elif node.op == "call_function" and node.target is F.interpolate:
            changed = _rewrite_interpolate(module, graph, node) or changed
    kinds = tags(graph)
    for node in list(graph.nodes):
        new = None
        if _is_product(node):
            new = _rewrite_product(module, graph, node, kinds)
        elif _is_add(node) and all(isinstance(a, fx.Node) and kinds[a] != "meta" for a in node.args) \
                and "input" in (kinds[a] for a in node.args):
            new = _replace(module, graph, node, Add(), tuple(node.args))
        if new is not None:
            kinds[new] = kinds[node]
            changed = True
    return changed


def _replace(module: nn.Module, graph: fx.Graph, node: fx.Node, layer: nn.Module, args: tuple,
             kwargs: dict | None = None) -> fx.Node:
    """Put a call of the new child ``layer`` of ``module`` in place of ``node``."""
    name = node.name
    while hasattr(module, name):
        name = f"{name}_"
    module.add_module(name, layer)
    with graph.inserting_after(node):
        new = graph.call_module(name, args, kwargs or {})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _rewrite_interpolate(module: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    """``F.interpolate(x, ...)`` as an :class:`Interpolate` layer; the size and scale may be
    computed at run time (they become arguments of the layer's forward), the mode and flags
    must be constants."""
    if not node.args or len(node.args) - 1 > len(_INTERPOLATE):
        return False
    bound = dict(zip(_INTERPOLATE, node.args[1:]))
    bound.update(node.kwargs)
    if set(bound) - set(_INTERPOLATE):
        return False
    flags = {k: bound.get(k, default) for k, default in
             (("mode", "nearest"), ("align_corners", None), ("recompute_scale_factor", None), ("antialias", False))}
    if any(isinstance(v, fx.Node) for v in flags.values()):
        return False
    runtime = {k: bound[k] for k in ("size", "scale_factor") if bound.get(k) is not None}
    _replace(module, graph, node, Interpolate(**flags), (node.args[0],), runtime)
    return True


def _call_args(node: fx.Node, names: tuple[str, ...]) -> dict | None:
    """The arguments after the input by name, or None if one is computed at run time."""
    if len(node.args) - 1 > len(names) or not node.args:
        return None
    bound = dict(zip(names, node.args[1:]))
    bound.update(node.kwargs)
    if any(isinstance(v, fx.Node) for v in bound.values()) or set(bound) - set(names):
        return None
    return bound


def _as_module(node: fx.Node) -> nn.Module | None:
    """The module equal to a functional activation, pooling or mean call; None if none."""
    if node.op == "call_function":
        spec = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        spec = _METHODS.get(node.target)
    else:
        return None
    if spec is None:
        return None
    cls, names = spec
    bound = _call_args(node, names)
    if bound is None or bound.pop("dtype", None) is not None:
        return None
    for ignored in ("inplace", "_stacklevel"):
        bound.pop(ignored, None)
    if cls is Mean and bound.get("dim", None) is None and "dim" in bound:
        bound.pop("dim")
    return cls(**bound)


def tags(graph: fx.Graph) -> dict[fx.Node, str]:
    """"input" for values computed from the forward's inputs, "meta" for sizes read off
    them (``x.shape``), "constant" for parameters, buffers and what only they determine."""
    found_tags: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            found_tags[node] = "input"
        elif node.op == "get_attr":
            found_tags[node] = "constant"
        elif (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")) or \
                (node.op == "call_method" and node.target in ("size", "dim")):
            found_tags[node] = "meta"
        else:
            found = {found_tags[n] for n in node.all_input_nodes}
            found_tags[node] = next((k for k in ("input", "meta") if k in found), "constant")
    return found_tags


def _is_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
             (node.op == "call_method" and node.target == "add")
    return is_add and len(node.args) == 2 and not node.kwargs


def _is_product(node: fx.Node) -> bool:
    is_product = (node.op == "call_function" and node.target in _PRODUCTS) or \
                 (node.op == "call_method" and node.target in ("mul", "div"))
    return is_product and len(node.args) == 2 and not node.kwargs


def _rewrite_product(module: nn.Module, graph: fx.Graph, node: fx.Node, kinds: dict[fx.Node, str]) -> fx.Node | None:
    divide = node.target in (operator.truediv, operator.itruediv, torch.div, "div")
    signal = [isinstance(a, fx.Node) and kinds[a] == "input" for a in node.args]
    if not any(signal) or (divide and signal[1]):
        return None  # nothing from the input, or a division by an activation: plain gradient
    if all(signal):
        gates = [_is_gate(module, a) for a in node.args]
        index = gates.index(False) if gates.count(False) == 1 else None
    else:
        index = signal.index(True)
    return _replace(module, graph, node, Product(index, divide), tuple(node.args))


def _is_gate(module: nn.Module, node: fx.Node) -> bool:
    """A value squashed into a gate: the output of a sigmoid-like activation, possibly reshaped."""
    while (node.op == "call_method" and node.target in RESHAPES) or \
            (node.op == "call_function" and node.target is operator.getitem):  # g[:, :, None, None]
        node = node.args[0]
    return node.op == "call_module" and isinstance(module.get_submodule(node.target), _GATES)
