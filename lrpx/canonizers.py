"""Canonizers: make a model LRP-ready without changing what it computes.

* :func:`fold_batchnorm` folds an eval-mode BatchNorm into the Conv/Linear before it;
* :func:`lrpx.rewrite.rewrite_functional` turns tensor additions, products and functional
  activations in forward code (ResNet's ``out += identity``) into layers that take a rule,
  and in-place functional calls into out-of-place ones, on the graphs of each module's own
  forward traced by ``torch.fx`` (:class:`lrpx.graph.ModelGraph`);
* :func:`out_of_place` switches ``inplace=True`` activations off;
* :func:`lrpx.precision.tunnel_all` lets relevance skip precision round trips (a float32
  section inside a float64 model), unrounded.

:func:`canonize` runs all four on a model it may modify (``convert`` passes a copy).
A module on which the user registered hooks is never folded away, and a module whose forward
is rewritten keeps its hooks.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from .detection import adopt
from .graph import ModelGraph, TraceError, join
from .layers.detection import FrozenBatchNorm2d
from .layers import batchnorm_affine, has_hooks, registry
from .precision import tunnel_all
from .rewrite import rewrite_functional
from .statistics import hold_all

__all__ = ["canonize", "canonize_graph", "fold_batchnorm", "fold_batchnorms", "out_of_place", "TraceError"]

_FOLDABLE = {nn.Linear: (nn.BatchNorm1d,), nn.Conv1d: (nn.BatchNorm1d,),
             nn.Conv2d: (nn.BatchNorm2d, FrozenBatchNorm2d), nn.Conv3d: (nn.BatchNorm3d,)}


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
        # a copy that shares the parameters until they are replaced (no copy of the weight)
        folded = copy.deepcopy(layer, memo={id(p): p for p in layer.parameters(recurse=False)})
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


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, field = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, field, module)


def fold_batchnorms(model: nn.Module, graph: ModelGraph) -> None:
    """Fold each BatchNorm that alone reads the output of a Conv/Linear into it (in place on
    ``model``), where both are called once and neither holds hooks; the BatchNorm becomes
    ``nn.Identity``."""
    calls = graph.calls()
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for owner, g in graph.items():
        module = model.get_submodule(owner) if owner else model
        for node in g.nodes:
            if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            prev = node.args[0]
            if prev.op != "call_module" or len(prev.users) != 1:
                continue
            bn_name, layer_name = join(owner, node.target), join(owner, prev.target)
            bn, layer = module.get_submodule(node.target), module.get_submodule(prev.target)
            if type(bn) not in _FOLDABLE.get(type(layer), ()) or bn.running_mean is None:
                continue
            if calls[bn_name] != 1 or calls[layer_name] != 1 or uses[id(bn)] != 1 or uses[id(layer)] != 1:
                continue
            if has_hooks(bn) or has_hooks(layer):  # the hooks would see other values
                continue
            _set(model, layer_name, fold_batchnorm(layer, bn))
            _set(model, bn_name, nn.Identity())


def canonize(model: nn.Module, *, trace: bool = True,
             twins: dict[type[nn.Module], type[nn.Module] | None] | None = None) -> nn.Module:
    """Make ``model`` LRP-ready in place and return it (a new root if its forward changed).

    Modules whose class has a twin (``lrpx.layers.default_twins()`` updated by ``twins``) are
    replaced whole, so their forward code is not traced (``nn.MultiheadAttention``).
    Refuses training mode (BatchNorm folding needs running statistics).
    """
    model, graph = canonize_graph(model, registry(twins, model), trace=trace)
    return graph.materialize(model)


def canonize_graph(model: nn.Module, twins: dict[type[nn.Module], type[nn.Module] | None], *,
                   trace: bool = True) -> tuple[nn.Module, ModelGraph]:
    """:func:`canonize` with the merged registry ``twins``, before the edited forwards are
    materialised: returns ``model`` (modified in place) and its model graph (each module traced
    once) for the passes that follow; ``graph.materialize(model)`` gives the canonized root."""
    if any(m.training for m in model.modules()):
        raise ValueError("canonize needs an eval-mode model: call model.eval() first "
                         "(lrpx.convert does this on its copy)")
    adopt(model)  # torchvision's detection modules (lrpx.detection)
    out_of_place(model)
    whole = tuple(cls for cls, twin in twins.items() if twin is not None)
    graph = ModelGraph.build(model, trace=trace, whole=whole, known=set(twins))
    fold_batchnorms(model, graph)
    hold_all(graph)  # normalising statistics as constants (lrpx.statistics)
    rewrite_functional(model, graph)
    tunnel_all(model, graph)  # precision round trips pass relevance unrounded (lrpx.precision)
    return model, graph
