"""``convert``: a copy of a model whose backward pass computes LRP relevance."""
from __future__ import annotations

import copy

from torch import nn

from .canonizers import canonize
from .composites import Composite
from .layers import Add, Twin, default_twins

__all__ = ["convert", "rule_table", "UnsupportedModuleError"]


class UnsupportedModuleError(TypeError):
    """The model holds layers lrpx has no twin for."""


def convert(
    model: nn.Module,
    composite: Composite | None = None,
    *,
    inplace: bool = False,
    trace: bool = True,
    twins: dict[type[nn.Module], type[nn.Module] | None] | None = None,
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
    _check_supported(target, registry)
    target = canonize(target, trace=trace)
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
    return target.eval()


def _check_supported(model: nn.Module, registry: dict) -> None:
    bad = []
    for name, module in model.named_modules():
        cls = type(module)
        if cls in registry or isinstance(module, Twin):
            continue
        is_leaf = not any(True for _ in module.children())
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if is_leaf or owns_parameters:
            bad.append(f"  '{name or '<root>'}' ({cls.__module__}.{cls.__qualname__})")
    if bad:
        raise UnsupportedModuleError(
            "lrpx has no LRP twin for these modules:\n" + "\n".join(bad) + "\n"
            "Register one per class: lrpx.convert(model, composite, twins={YourModule: YourTwin}) where "
            "YourTwin subclasses YourModule and lrpx.layers.Twin (see the README, 'Custom layers'), "
            "or map a class to None to keep it as it is (its plain gradient then carries the relevance)."
        )


def rule_table(model: nn.Module) -> dict[str, object]:
    """``{qualified name: rule}`` of the twins in a converted model."""
    return {name: m.rule for name, m in model.named_modules() if isinstance(m, (Twin, Add))}
