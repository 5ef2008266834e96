"""LRP twins of torch layers and the registry that maps a torch class to its twin.

A twin subclasses the exact torch class it replaces, shares its Parameters, and computes
the same forward; its backward applies an LRP rule. Its class declares what ``convert``
needs to know: its kind of layer (``lrp_kind``), whether it can apply a following ReLU
(``lrp_fusable``) and whether its output is non-negative (``output_nonnegative``).

``default_twins()`` returns the registry as a plain dict (a copy): ``{torch class: twin
class}``, where ``None`` means the layer is kept as it is because its plain gradient already
is the right relevance flow (max pooling, dropout in eval, reshapes).
"""
from __future__ import annotations

from torch import nn

from ..rules.base import Rule
from .activation import ACTIVATION_TWINS, ACTIVATIONS, NONNEGATIVE_ACTIVATIONS, FusedReLU
from .attention import ATTENTION_TWINS
from .base import Twin, copy_hooks, has_hooks
from .detection import DETECTION_KEPT, DETECTION_TWINS
from .embedding import LRPEmbedding
from .external import external_twins
from .merge import Add, Matmul, Normalize, Product, WeightMatmul
from .normalization import NORM_TWINS
from .pooling import (UPSAMPLE_TWINS, Interpolate, LRPAdaptiveAvgPool1d, LRPAdaptiveAvgPool2d,
                      LRPAdaptiveAvgPool3d, LRPAvgPool1d, LRPAvgPool2d, LRPAvgPool3d, Mean, Sum)
from .sdpa import ScaledDotProductAttention
from .weighted import (LRPBatchNorm1d, LRPBatchNorm2d, LRPBatchNorm3d, LRPConv1d, LRPConv2d, LRPConv3d,
                       LRPLinear, batchnorm_affine)

__all__ = ["Twin", "LRPEmbedding", "external_twins", "Add", "Mean", "Sum", "Product", "Matmul", "WeightMatmul",
           "Normalize", "ScaledDotProductAttention", "Interpolate",
           "FusedReLU", "twin", "default_twins", "registry", "kind_of", "inherited", "batchnorm_affine",
           "copy_hooks", "has_hooks", "WEIGHTED", "CONVOLUTIONS", "BATCHNORMS", "POOLS", "KEPT", "SIGN_KEEPING",
           "ACTIVATIONS", "NONNEGATIVE_ACTIVATIONS"]

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


_CONSTANT_PADS = (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
#: kept layers whose output is >= 0 when their input is (a constant pad may pad with a negative value)
SIGN_KEEPING = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
    nn.Identity, nn.Flatten, nn.Unflatten, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.ChannelShuffle,
) + _torchvision_kept()
#: layers kept as they are: their gradient routes relevance correctly
KEPT = SIGN_KEEPING + _CONSTANT_PADS

_TWINS: dict[type[nn.Module], type[nn.Module] | None] = {
    nn.Linear: LRPLinear,
    nn.Embedding: LRPEmbedding,
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
    Sum: Sum,
    Product: Product,
    Matmul: Matmul,
    WeightMatmul: WeightMatmul,
    Normalize: Normalize,
    **UPSAMPLE_TWINS,
    **ACTIVATION_TWINS,
    **NORM_TWINS,
    **ATTENTION_TWINS,
    ScaledDotProductAttention: ScaledDotProductAttention,
    **DETECTION_TWINS,
    **dict.fromkeys(DETECTION_KEPT),
    # the output projection of MultiheadAttention, used by its twin's own forward
    nn.modules.linear.NonDynamicallyQuantizableLinear: None,
    **dict.fromkeys(KEPT),
}


def default_twins() -> dict[type[nn.Module], type[nn.Module] | None]:
    """The registry ``{torch class: twin class or None (kept)}``, as a new dict.

    Pass an extended copy to ``lrpx.convert(..., twins=...)`` to support a custom layer.
    """
    return dict(_TWINS)


def registry(twins: dict[type[nn.Module], type[nn.Module] | None] | None = None, model: nn.Module | None = None
             ) -> dict[type[nn.Module], type[nn.Module] | None]:
    """The default registry updated by a user's ``twins`` (checked: each twin class declares a
    kind of layer and can be built ``from_module``), and, given a ``model``, with the subclasses
    it uses that compute what a registered class computes (see :func:`inherited`)."""
    merged = default_twins()
    if model is not None:  # element-wise activations of other libraries (lrpx.layers.external)
        merged.update(external_twins(model))
    for cls, twin_cls in (twins or {}).items():
        if twin_cls is not None and (not isinstance(twin_cls, type) or not issubclass(twin_cls, Twin)):
            raise TypeError(f"twins[{cls.__name__}] must be a subclass of lrpx.layers.Twin (or None to keep the "
                            f"layer), got {twin_cls!r}")
        if twin_cls is not None and getattr(twin_cls, "lrp_kind", None) is None:
            raise TypeError(f"twin class {twin_cls.__name__} must declare lrp_kind, one of "
                            "'weighted', 'elementwise', 'sum', 'normalization', 'softmax', 'bilinear', 'product'")
        merged[cls] = twin_cls
    for module in () if model is None else model.modules():
        base = inherited(type(module), merged)
        if base is not None:
            merged[type(module)] = merged[base]
    return merged


def inherited(cls: type[nn.Module], table: dict) -> type[nn.Module] | None:
    """The registered class whose twin a subclass ``cls`` takes: its nearest base in ``table``,
    if ``cls`` is not registered itself and runs that base's ``forward`` (a subclass that only
    adds attributes or methods computes the same). A subclass with a forward of its own is
    not adopted; ``convert`` traces that forward instead, so that what it computes is what
    gets rules. Twins are never adopted (a converted model is not converted again)."""
    if cls in table or issubclass(cls, Twin):
        return None
    for base in cls.__mro__[1:]:
        if base in table:
            return base if cls.forward is base.forward else None
    return None


def kind_of(module: nn.Module, twins: dict | None = None) -> str | None:
    """The kind of layer (``lrpx.rules.KINDS``) of ``module``: that of its twin class in the
    registry ``twins`` (default: :func:`default_twins`), or its own if it is a twin; ``None``
    for a layer that takes no rule (kept, a container, unknown)."""
    if isinstance(module, Twin):
        return type(module).lrp_kind
    twin_cls = (default_twins() if twins is None else twins).get(type(module))
    return None if twin_cls is None else twin_cls.lrp_kind


def twin(module: nn.Module, rule: Rule, twins: dict | None = None) -> nn.Module:
    """The LRP twin of one layer with ``rule``, sharing the layer's Parameters.

    The lookup is by exact type: a subclass of a torch layer is not silently replaced.
    """
    table = default_twins() if twins is None else twins
    if type(module) in table and table[type(module)] is None:
        raise TypeError(f"{type(module).__name__} takes no rule: convert keeps it as it is, since its plain "
                        "gradient already routes relevance")
    cls = table.get(type(module))
    if cls is None:
        raise TypeError(
            f"lrpx has no twin for {type(module).__module__}.{type(module).__qualname__}; "
            "register one with lrpx.convert(..., twins={YourModule: YourTwin})"
        )
    return cls.from_module(module, rule)
