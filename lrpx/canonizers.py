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
from torch import nn

from .layers import Add, batchnorm_affine

__all__ = ["canonize", "fold_batchnorm", "out_of_place", "rewrite_functional", "TraceError"]

_FOLDABLE = {nn.Linear: (nn.BatchNorm1d,), nn.Conv1d: (nn.BatchNorm1d,), nn.Conv2d: (nn.BatchNorm2d,),
             nn.Conv3d: (nn.BatchNorm3d,)}
_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_METHODS = {"add_": "add", "relu_": "relu", "mul_": "mul", "sigmoid_": "sigmoid", "clamp_": "clamp",
                    "hardtanh_": "hardtanh", "tanh_": "tanh"}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


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


@dataclass
class _Traced:
    name: str
    module: nn.Module
    graph: fx.Graph
    changed: bool = False


def _trace_all(model: nn.Module) -> list[_Traced]:
    traced = []
    for name, module in model.named_modules():
        if isinstance(module, _CONTAINERS) or not list(module.children()):
            continue
        try:
            graph = _ChildrenAsLeaves().trace(module)
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
        is_add = (node.op == "call_function" and node.target in _ADDS) or \
                 (node.op == "call_method" and node.target == "add")
        if not is_add or len(node.args) != 2 or node.kwargs:
            continue
        if not all(isinstance(a, fx.Node) for a in node.args):
            continue
        name = node.name
        while hasattr(t.module, name):
            name = f"{name}_"
        t.module.add_module(name, Add())
        with t.graph.inserting_after(node):
            new = t.graph.call_module(name, tuple(node.args))
        node.replace_all_uses_with(new)
        t.graph.erase_node(node)
        t.changed = True


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


def canonize(model: nn.Module, *, trace: bool = True) -> nn.Module:
    """Make ``model`` LRP-ready in place and return it (a new root if its forward changed).

    Refuses training mode (BatchNorm folding needs running statistics).
    """
    if any(m.training for m in model.modules()):
        raise ValueError("canonize needs an eval-mode model: call model.eval() first "
                         "(lrpx.convert does this on its copy)")
    out_of_place(model)
    if not trace:
        _fold_in_sequences(model)
        return model
    traced = _trace_all(model)
    _fold_in_graphs(model, traced)
    return rewrite_functional(model, traced)
