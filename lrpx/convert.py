"""``convert``: a copy of a model whose backward pass computes LRP relevance."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import nn

from .canonizers import RESHAPES, ReluSite, canonize_with_sites, trace_children_as_leaves
from .composites import Composite
from .layers import Add, FusedReLU, Product, Twin, default_twins
from .rules import Rule
from .signs import mark_nonnegative_inputs

__all__ = ["convert", "rule_table", "UnsupportedModuleError"]


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class UnsupportedModuleError(TypeError):
    """The model holds layers lrpx has no twin for."""


def convert(
    model: nn.Module,
    composite: Composite | None = None,
    *,
    inplace: bool = False,
    trace: bool = True,
    twins: dict[type[nn.Module], type[nn.Module] | None] | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Return a model that computes ``model``'s forward and whose gradient is LRP relevance.

    Parameters
    ----------
    model
        Any ``nn.Module``; left unchanged unless ``inplace``.
    composite
        Which rule each layer gets; ``None`` means ``Epsilon(1e-6)`` on every weighted layer.
    inplace
        Convert ``model`` itself instead of a deep copy (its layers are replaced).
    trace
        Trace forward code with ``torch.fx`` so that tensor additions get the ``Norm`` rule.
        ``False`` only swaps layers (additions keep their plain gradient).
    twins
        Extra ``{module class: twin class}`` entries (``None`` keeps a layer as it is), on top
        of :func:`lrpx.layers.default_twins`. A twin class needs ``from_module(module, rule)``
        and, to receive a rule, an ``lrp_kind`` of "weighted", "elementwise" or "sum".

    fuse
        Let a Linear/Conv/BatchNorm layer or a residual sum whose output only a ReLU reads
        apply that ReLU in place (the ReLU becomes :class:`lrpx.layers.FusedReLU`, or leaves the traced forward
        code): the same forward and relevance with less memory and time. The relevance of
        units with a non-positive pre-activation is then zero, as it is without fusing
        unless a Flat or WSquare layer follows. ``False`` keeps every layer separate (e.g. to
        read pre-activations with hooks).

    Returns
    -------
    nn.Module
        The converted model, in eval mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    registry = default_twins()
    registry.update(twins or {})
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    _check_supported(target, registry, traced=None)  # leaves first: before tracing can fail on them
    target, sites = canonize_with_sites(target, trace=trace, twins=twins)
    _check_supported(target, registry, traced=trace)
    table = (composite or Composite()).assign(target, canonize_copy=False, twins=twins)
    for name, rule in table.items():
        module = target.get_submodule(name)
        twin_cls = registry.get(type(module))
        if twin_cls is None:  # already a twin, or kept by the user's registry
            if isinstance(module, Twin) and type(module) not in registry:
                raise ValueError(f"'{name}' is already an LRP twin: convert the original model, not a converted one")
            continue
        parent, _, field = name.rpartition(".")
        setattr(target.get_submodule(parent) if parent else target, field, twin_cls.from_module(module, rule))
    if fuse:
        _fuse_relus(target, sites)
    mark_nonnegative_inputs(target)
    return target.eval()


def _fuse_relus(model: nn.Module, sites: list[ReluSite]) -> None:
    """Let each weighted twin whose output only a ReLU reads apply that ReLU in place (its
    rule permitting): the saved output is then the tensor the next layer reads anyway, which
    saves one activation-sized tensor per layer and a pass over it."""
    edited = set()
    for site in sites:
        layer = model.get_submodule(site.layer)
        if not (isinstance(layer, (Twin, Add)) and layer.rule.fusable):
            continue
        parent = model.get_submodule(site.parent) if site.parent else model
        if isinstance(parent, fx.GraphModule):
            node = next(n for n in parent.graph.nodes if n.name == site.relu)
            node.replace_all_uses_with(node.args[0])
            parent.graph.erase_node(node)
            edited.add(parent)
        else:
            relu = parent._modules[site.relu]
            parent._modules[site.relu] = FusedReLU.from_module(relu, relu.rule)
        layer.fused_relu = True
    for parent in edited:
        parent.recompile()


def _check_supported(model: nn.Module, registry: dict, *, traced: bool | None) -> None:
    """Every leaf has a twin or is kept; a module with parameters of its own is a leaf with a
    twin or, once ``traced``, uses them only in operations the trace rewrote (layer scale).
    ``traced=None`` checks the leaves only."""
    bad = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in registry or isinstance(module, Twin) or cls in _CONTAINERS:
            continue  # an empty container is the identity
        is_leaf = not any(True for _ in module.children())
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if is_leaf or (owns_parameters and traced is not None and not (traced and _parameters_rewritten(module))):
            bad.append(f"  '{name or '<root>'}' ({cls.__module__}.{cls.__qualname__})")
    if bad:
        raise UnsupportedModuleError(
            "lrpx has no LRP twin for these modules:\n" + "\n".join(bad) + "\n"
            "Register one per class: lrpx.convert(model, composite, twins={YourModule: YourTwin}) where "
            "YourTwin subclasses YourModule and lrpx.layers.Twin (see the README, 'Custom layers'), "
            "or map a class to None to keep it as it is (its plain gradient then carries the relevance)."
        )


def _parameters_rewritten(module: nn.Module) -> bool:
    """A traced module whose own parameters only feed rewritten operations (Product, Add) or
    are reshaped and concatenated to the activations (ViT's class token), so that the
    relevance they receive is absorbed like a bias's."""
    try:
        graph = module.graph if isinstance(module, fx.GraphModule) else trace_children_as_leaves(module)
    except Exception:  # fx raises many types; convert's own trace reports why
        return False
    own = {name for name, _ in module.named_parameters(recurse=False)}
    uses = [n for n in graph.nodes if n.op == "get_attr" and n.target in own]
    return len(uses) > 0 and all(_absorbs(module, n) for n in uses)


_JOINS = {torch.cat, torch.stack, torch.concat}


def _absorbs(module: nn.Module, node: fx.Node) -> bool:
    for user in node.users:
        if user.op == "call_module" and isinstance(module.get_submodule(user.target), (Product, Add)):
            continue
        if user.op == "call_function" and user.target in _JOINS:
            continue
        if user.op == "call_method" and user.target in RESHAPES and user.args[0] is node and _absorbs(module, user):
            continue
        return False
    return True


def rule_table(model: nn.Module) -> dict[str, object]:
    """``{qualified name: rule}`` of the twins in a converted model."""
    return {name: m.rule for name, m in model.named_modules() if isinstance(getattr(m, "rule", None), Rule)}
