"""Canonizers: make a model LRP-ready without changing what it computes.

* :func:`fold_batchnorm` folds an eval-mode BatchNorm into the Conv/Linear before it;
* :func:`rewrite_functional` turns tensor additions in forward code (ResNet's
  ``out += identity``) into :class:`lrpx.layers.Add` modules and in-place functional calls
  into out-of-place ones, by tracing each module's own forward with ``torch.fx``;
* :func:`out_of_place` switches ``inplace=True`` activations off.

:func:`canonize` runs all three on a model it may modify (``convert`` passes a copy).
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .layers import WEIGHTED, Add, Mean, Product, batchnorm_affine, default_twins

__all__ = ["canonize", "fold_batchnorm", "out_of_place", "rewrite_functional", "TraceError"]

_FOLDABLE = {nn.Linear: (nn.BatchNorm1d,), nn.Conv1d: (nn.BatchNorm1d,), nn.Conv2d: (nn.BatchNorm2d,),
             nn.Conv3d: (nn.BatchNorm3d,)}
_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_METHODS = {"add_": "add", "relu_": "relu", "mul_": "mul", "sigmoid_": "sigmoid", "clamp_": "clamp",
                    "hardtanh_": "hardtanh", "tanh_": "tanh"}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
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
}
_METHODS: dict = {"relu": (nn.ReLU, ()), "sigmoid": (nn.Sigmoid, ()), "tanh": (nn.Tanh, ()),
                  "softmax": (nn.Softmax, ("dim", "dtype")), "mean": (Mean, ("dim", "keepdim", "dtype"))}


class TraceError(RuntimeError):
    """A module's forward code could not be traced by ``torch.fx``."""


def fold_batchnorm(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new layer equal to ``bn(layer(x))`` for an eval-mode BatchNorm (``eps`` kept).

    ``layer`` is a Conv1d/2d/3d or Linear; neither argument is modified.
    """
    if bn.training:
        raise ValueError("fold_batchnorm needs the BatchNorm in eval mode (its running statistics); "
                         "call model.eval() first")
    if type(layer) not in _FOLDABLE or type(bn) not in _FOLDABLE[type(layer)]:
        raise TypeError(f"cannot fold {type(bn).__name__} into {type(layer).__name__}")
    with torch.no_grad():
        scale, shift = batchnorm_affine(bn)  # refuses a BatchNorm without running statistics
        folded = copy.deepcopy(layer)
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        folded.weight = nn.Parameter(layer.weight * scale.view(shape), layer.weight.requires_grad)
        bias = shift if layer.bias is None else layer.bias * scale + shift
        folded.bias = nn.Parameter(bias.to(layer.weight.dtype), layer.weight.requires_grad)
    return folded


def out_of_place(model: nn.Module) -> nn.Module:
    """Set ``inplace=False`` on every module that has the flag (in place on ``model``)."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward code; every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_children_as_leaves(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s own forward, each submodule call one node."""
    tracer = _ChildrenAsLeaves()
    try:
        return tracer.trace(module)
    finally:
        # fx leaves the tracer in a reference cycle (closures of its patched calls); emptied,
        # it no longer keeps the traced module and its parameters alive until a cyclic gc
        vars(tracer).clear()


@dataclass
class _Traced:
    name: str
    module: nn.Module
    graph: fx.Graph
    changed: bool = False


def _trace_all(model: nn.Module, leaves: tuple[type[nn.Module], ...] = ()) -> list[_Traced]:
    traced = []
    for name, module in model.named_modules():
        if isinstance(module, _CONTAINERS) or not list(module.children()) or type(module) in leaves:
            continue
        try:
            graph = trace_children_as_leaves(module)
        except Exception as err:  # fx raises many types
            label = f"'{name}'" if name else "the model itself"
            raise TraceError(
                f"torch.fx cannot trace the forward of {label} ({type(module).__qualname__}): "
                f"{type(err).__name__}: {err}\nlrpx traces forward code to give functional operations "
                "such as `a + b` their LRP rule. Make that forward traceable, or pass trace=False to "
                "only swap layers (additions then keep their plain gradient, which does not conserve "
                "relevance)."
            ) from err
        traced.append(_Traced(name, module, graph))
    return traced


def _join(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, field = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, field, module)


def _fold_in_graphs(model: nn.Module, traced: list[_Traced]) -> None:
    calls = Counter(
        id(t.module.get_submodule(n.target)) for t in traced for n in t.graph.nodes if n.op == "call_module"
    )
    for t in traced:
        for node in t.graph.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            prev = node.args[0]
            if prev.op != "call_module" or len(prev.users) != 1:
                continue
            bn, layer = t.module.get_submodule(node.target), t.module.get_submodule(prev.target)
            if type(bn) not in _FOLDABLE.get(type(layer), ()) or calls[id(bn)] != 1 or calls[id(layer)] != 1:
                continue
            if bn.running_mean is None:
                continue
            _set(model, _join(t.name, prev.target), fold_batchnorm(layer, bn))
            _set(model, _join(t.name, node.target), nn.Identity())


def _fold_in_sequences(model: nn.Module) -> None:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for name, seq in list(model.named_modules()):
        if type(seq) is not nn.Sequential:
            continue
        keys = list(seq._modules)
        for a, b in zip(keys, keys[1:]):
            layer, bn = seq._modules[a], seq._modules[b]
            if type(bn) in _FOLDABLE.get(type(layer), ()) and uses[id(layer)] == uses[id(bn)] == 1 \
                    and bn.running_mean is not None:
                seq._modules[a] = fold_batchnorm(layer, bn)
                seq._modules[b] = nn.Identity()


def _rewrite_graph(t: _Traced) -> None:
    for node in list(t.graph.nodes):
        if node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            t.changed = True
        if node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]
            t.changed = True
    for node in list(t.graph.nodes):
        module = _as_module(node)
        if module is not None:
            _replace(t, node, module, (node.args[0],))
    tags = _tags(t.graph)
    for node in list(t.graph.nodes):
        new = None
        if _is_product(node):
            new = _rewrite_product(t, node, tags)
        elif _is_add(node) and all(isinstance(a, fx.Node) and tags[a] != "meta" for a in node.args) \
                and "input" in (tags[a] for a in node.args):
            new = _replace(t, node, Add(), tuple(node.args))
        if new is not None:
            tags[new] = tags[node]


def _replace(t: _Traced, node: fx.Node, module: nn.Module, args: tuple) -> fx.Node:
    """Put a call of the new submodule ``module`` in place of ``node``."""
    name = node.name
    while hasattr(t.module, name):
        name = f"{name}_"
    t.module.add_module(name, module)
    with t.graph.inserting_after(node):
        new = t.graph.call_module(name, args)
    node.replace_all_uses_with(new)
    t.graph.erase_node(node)
    t.changed = True
    return new


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


def _tags(graph: fx.Graph) -> dict[fx.Node, str]:
    """"input" for values computed from the forward's inputs, "meta" for sizes read off
    them (``x.shape``), "constant" for parameters, buffers and what only they determine."""
    tags: dict[fx.Node, str] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            tags[node] = "input"
        elif node.op == "get_attr":
            tags[node] = "constant"
        elif (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")) or \
                (node.op == "call_method" and node.target in ("size", "dim")):
            tags[node] = "meta"
        else:
            found = {tags[n] for n in node.all_input_nodes}
            tags[node] = next((k for k in ("input", "meta") if k in found), "constant")
    return tags


def _is_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
             (node.op == "call_method" and node.target == "add")
    return is_add and len(node.args) == 2 and not node.kwargs


def _is_product(node: fx.Node) -> bool:
    is_product = (node.op == "call_function" and node.target in _PRODUCTS) or \
                 (node.op == "call_method" and node.target in ("mul", "div"))
    return is_product and len(node.args) == 2 and not node.kwargs


def _rewrite_product(t: _Traced, node: fx.Node, tags: dict[fx.Node, str]) -> fx.Node | None:
    divide = node.target in (operator.truediv, operator.itruediv, torch.div, "div")
    signal = [isinstance(a, fx.Node) and tags[a] == "input" for a in node.args]
    if not any(signal) or (divide and signal[1]):
        return None  # nothing from the input, or a division by an activation: plain gradient
    if all(signal):
        gates = [_is_gate(t.module, a) for a in node.args]
        index = gates.index(False) if gates.count(False) == 1 else None
    else:
        index = signal.index(True)
    return _replace(t, node, Product(index, divide), tuple(node.args))


def _is_gate(module: nn.Module, node: fx.Node) -> bool:
    """A value squashed into a gate: the output of a sigmoid-like activation, possibly reshaped."""
    while (node.op == "call_method" and node.target in RESHAPES) or \
            (node.op == "call_function" and node.target is operator.getitem):  # g[:, :, None, None]
        node = node.args[0]
    return node.op == "call_module" and isinstance(module.get_submodule(node.target), _GATES)


def rewrite_functional(model: nn.Module, traced: list[_Traced] | None = None) -> nn.Module:
    """Replace tensor additions in forward code by ``Add`` modules (in place on ``model``).

    Each module whose own forward changes becomes a ``torch.fx.GraphModule`` that keeps the
    same children; the returned root is ``model`` unless its own forward changed.
    """
    traced = _trace_all(model) if traced is None else traced
    for t in traced:
        _rewrite_graph(t)
    # deepest first, so a parent's GraphModule picks up its rewritten children
    for t in sorted((t for t in traced if t.changed), key=lambda t: -t.name.count(".") - bool(t.name)):
        t.graph.lint()
        gm = fx.GraphModule(t.module, t.graph, class_name=type(t.module).__name__)
        gm.training = t.module.training
        if not t.name:
            return gm
        _set(model, t.name, gm)
    return model


def canonize(model: nn.Module, *, trace: bool = True,
             twins: dict[type[nn.Module], type[nn.Module] | None] | None = None) -> nn.Module:
    """Make ``model`` LRP-ready in place and return it (a new root if its forward changed).

    Modules whose class has a twin (``lrpx.layers.default_twins()`` updated by ``twins``) are
    replaced whole, so their forward code is not traced (``nn.MultiheadAttention``).
    Refuses training mode (BatchNorm folding needs running statistics).
    """
    return canonize_with_sites(model, trace=trace, twins=twins)[0]


@dataclass(frozen=True)
class ReluSite:
    """A weighted layer whose output only a ReLU reads: ``layer`` (qualified name) is called
    once, in the forward of ``parent`` (a Sequential or a traced GraphModule), and ``relu``
    is that ReLU's key in the Sequential or its node's name in the graph."""

    parent: str
    layer: str
    relu: str


def canonize_with_sites(model: nn.Module, *, trace: bool = True,
                        twins: dict[type[nn.Module], type[nn.Module] | None] | None = None
                        ) -> tuple[nn.Module, list[ReluSite]]:
    """:func:`canonize`, plus the places where a weighted layer feeds only a ReLU (which
    ``convert`` lets the layer apply in place; none without tracing)."""
    if any(m.training for m in model.modules()):
        raise ValueError("canonize needs an eval-mode model: call model.eval() first "
                         "(lrpx.convert does this on its copy)")
    out_of_place(model)
    if not trace:
        _fold_in_sequences(model)
        return model, []
    registry = default_twins()
    registry.update(twins or {})
    traced = _trace_all(model, tuple(cls for cls, twin in registry.items() if twin is not None))
    _fold_in_graphs(model, traced)
    root = rewrite_functional(model, traced)
    return root, _relu_sites(root, traced)


def _relu_sites(root: nn.Module, traced: list[_Traced]) -> list[ReluSite]:
    called = Counter(_join(t.name, n.target) for t in traced for n in t.graph.nodes if n.op == "call_module")
    uses = Counter(id(m) for _, m in root.named_modules(remove_duplicate=False))
    sites = []
    for t in traced:
        parent = root.get_submodule(t.name) if t.name else root
        graph_parent = isinstance(parent, fx.GraphModule)
        if not (graph_parent or type(parent) is nn.Sequential) or (t.name and not called[t.name]):
            continue  # a forward that never runs as traced (its parent iterates its children)
        for node in t.graph.nodes:
            if node.op != "call_module":
                continue
            layer_name = _join(t.name, node.target)
            layer = root.get_submodule(layer_name)
            if type(layer) not in WEIGHTED + (Add,) or called[layer_name] != 1 or uses[id(layer)] != 1:
                continue
            relu = _only_reader(parent, node)
            if relu is not None:
                sites.append(ReluSite(t.name, layer_name, relu.name if graph_parent else relu.target))
    return sites


def _only_reader(parent: nn.Module, node: fx.Node) -> fx.Node | None:
    """The ReLU call that alone reads ``node``'s output (through Identity calls), or None."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            return None
        module = parent.get_submodule(user.target)
        if type(module) is nn.ReLU:
            return user
        if type(module) is not nn.Identity:
            return None
        node = user
    return None
