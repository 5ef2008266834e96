"""ReLU fusion: a layer whose output only a ReLU reads applies that ReLU itself, in place.

The output the layer's rule saves is then the tensor the next layer reads anyway: one
activation-sized tensor per layer less, and no separate ReLU pass. The rule reads ``relu(z)``
for ``z``: equal where ``z > 0``, and units with ``z <= 0`` pass no relevance (see
:func:`lrpx.core.lrp_apply`).
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx
from torch import nn

from .graph import ModelGraph, join
from .layers import ACTIVATION_TWINS, FusedReLU, Twin, has_hooks

__all__ = ["fuse_relus"]

_RELU_TWIN = ACTIVATION_TWINS[nn.ReLU]


def fuse_relus(model: nn.Module, graph: ModelGraph) -> None:
    """Let each twin that can apply a ReLU (``lrp_fusable``, its rule ``fusable``) and whose
    output only a ReLU reads do so, in place on a converted ``model``.

    Only where the layer and the ReLU are called from the forward of an ``nn.Sequential`` (the
    ReLU becomes :class:`lrpx.layers.FusedReLU`) or of a module whose graph was rewritten (the
    ReLU's call leaves the graph, before it is materialised), the layer is called once and is
    not shared, and neither holds hooks the user registered.
    """
    calls = graph.calls()
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for owner, g in graph.items():
        parent = model.get_submodule(owner) if owner else model
        in_graph = owner in graph.changed
        if not (in_graph or type(parent) is nn.Sequential) or (owner and not calls[owner]):
            continue  # a forward that never runs as traced (its parent calls its children itself)
        for node in list(g.nodes):
            if node.op != "call_module":
                continue
            layer = parent.get_submodule(node.target)
            if not (isinstance(layer, Twin) and layer.lrp_fusable and layer.rule.fusable) or has_hooks(layer):
                continue
            if calls[join(owner, node.target)] != 1 or uses[id(layer)] != 1:
                continue
            relu = _only_relu_reader(parent, node)
            if relu is None:
                continue
            if in_graph:
                relu.replace_all_uses_with(relu.args[0])
                g.erase_node(relu)
            else:
                module = parent._modules[relu.target]
                parent._modules[relu.target] = FusedReLU.from_module(module, module.rule)
            layer.fused_relu = True


def _only_relu_reader(parent: nn.Module, node: fx.Node) -> fx.Node | None:
    """The ReLU call that alone reads ``node``'s output (through Identity calls), or None."""
    while len(node.users) == 1:
        (user,) = node.users
        if user.op != "call_module" or user.args != (node,) or user.kwargs:
            return None
        module = parent.get_submodule(user.target)
        if has_hooks(module):
            return None
        if type(module) is _RELU_TWIN:
            return user
        if type(module) is not nn.Identity:
            return None
        node = user
    return None
