"""LRP twins of torch layers and the registry that maps a torch class to its twin.

A twin subclasses the exact torch class it replaces, shares its Parameters, and computes
the same forward; its backward applies an LRP rule. ``default_twins()`` returns the
registry as a plain dict (a copy): ``{torch class: twin class}``, where ``None`` means the
layer is kept as it is because its plain gradient already is the right relevance flow
(max pooling, dropout in eval, reshapes).
"""
from __future__ import annotations

from torch import nn

from ..rules.base import Rule
from .activation import ACTIVATION_TWINS, ACTIVATIONS, FusedReLU
from .base import Twin
from .attention import ATTENTION_TWINS
from .merge import Add, Product
from .normalization import NORM_TWINS
from .pooling import (LRPAdaptiveAvgPool1d, LRPAdaptiveAvgPool2d, LRPAdaptiveAvgPool3d, LRPAvgPool1d,
                      LRPAvgPool2d, LRPAvgPool3d, Mean)
from .weighted import (LRPBatchNorm1d, LRPBatchNorm2d, LRPBatchNorm3d, LRPConv1d, LRPConv2d, LRPConv3d,
                       LRPLinear, batchnorm_affine)

__all__ = ["Twin", "Add", "Mean", "Product", "FusedReLU", "twin", "default_twins", "kind_of", "batchnorm_affine",
           "WEIGHTED", "CONVOLUTIONS", "BATCHNORMS", "POOLS", "KEPT"]

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHTED = (nn.Linear,) + CONVOLUTIONS + BATCHNORMS
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _torchvision_kept() -> tuple[type[nn.Module], ...]:
    """torchvision's identity-in-eval and reshaping layers (stochastic depth, permute)."""
    try:
        from torchvision.ops import Permute, StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (StochasticDepth, Permute)


#: layers kept as they are: their gradient routes relevance correctly
KEPT = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.ChannelShuffle,
    Product,
) + _torchvision_kept()

_TWINS: dict[type[nn.Module], type[nn.Module] | None] = {
    nn.Linear: LRPLinear,
    nn.Conv1d: LRPConv1d,
    nn.Conv2d: LRPConv2d,
    nn.Conv3d: LRPConv3d,
    nn.BatchNorm1d: LRPBatchNorm1d,
    nn.BatchNorm2d: LRPBatchNorm2d,
    nn.BatchNorm3d: LRPBatchNorm3d,
    nn.AvgPool1d: LRPAvgPool1d,
    nn.AvgPool2d: LRPAvgPool2d,
    nn.AvgPool3d: LRPAvgPool3d,
    nn.AdaptiveAvgPool1d: LRPAdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d: LRPAdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d: LRPAdaptiveAvgPool3d,
    Add: Add,
    Mean: Mean,
    **ACTIVATION_TWINS,
    **NORM_TWINS,
    **ATTENTION_TWINS,
    # the output projection of MultiheadAttention, used by its twin's own forward
    nn.modules.linear.NonDynamicallyQuantizableLinear: None,
    **dict.fromkeys(KEPT),
}


def default_twins() -> dict[type[nn.Module], type[nn.Module] | None]:
    """The registry ``{torch class: twin class or None (kept)}``, as a new dict.

    Pass an extended copy to ``lrpx.convert(..., twins=...)`` to support a custom layer.
    """
    return dict(_TWINS)


def kind_of(module: nn.Module, twins: dict | None = None) -> str | None:
    """"weighted", "elementwise" or "sum" for a layer that takes a rule; None otherwise.

    A class from a user registry ``twins`` takes the ``lrp_kind`` of its twin class.
    """
    cls = type(module)
    if cls is Add:
        return "sum"
    if twins and twins.get(cls) is not None and cls not in _TWINS:
        return getattr(twins[cls], "lrp_kind", None)
    if issubclass(cls, Twin):
        cls = next((c for c in cls.__mro__[1:] if c in _TWINS), cls)
    if cls in WEIGHTED:
        return "weighted"
    if cls in ACTIVATIONS:
        return "elementwise"
    if cls in POOLS:
        return "sum"
    if _TWINS.get(cls) is not None:
        return getattr(_TWINS[cls], "lrp_kind", None)
    return getattr(module, "lrp_kind", None)


def twin(module: nn.Module, rule: Rule) -> nn.Module:
    """The LRP twin of one layer with ``rule``, sharing the layer's Parameters.

    The lookup is by exact type: a subclass of a torch layer is not silently replaced.
    """
    if type(module) in _TWINS and _TWINS[type(module)] is None:
        raise TypeError(f"{type(module).__name__} takes no rule: convert keeps it as it is, since its plain "
                        "gradient already routes relevance")
    cls = _TWINS.get(type(module))
    if cls is None:
        raise TypeError(
            f"lrpx has no twin for {type(module).__module__}.{type(module).__qualname__}; "
            "register one with lrpx.convert(..., twins={YourModule: YourTwin})"
        )
    return cls.from_module(module, rule)
