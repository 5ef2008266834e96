"""Twins of element-wise activation modules of other libraries, found by class name in the
model being converted (the library is never imported by lrpx itself).

Hugging Face ``transformers`` writes its activations as modules of its own
(``transformers.activations.NewGELUActivation``: the tanh approximation of GELU, written out);
each computes a function of each element alone, so its twin passes relevance through
unchanged (the ``Pass`` rule), as the twins of ``nn.GELU`` and ``nn.SiLU`` do.
"""
from __future__ import annotations

from torch import nn

from .activation import _ActivationTwin

__all__ = ["ELEMENTWISE_CLASSES", "external_twins"]

#: ``{module path: class names}`` of element-wise activation modules
ELEMENTWISE_CLASSES: dict[str, frozenset[str]] = {
    "transformers.activations": frozenset({
        "GELUActivation", "FastGELUActivation", "NewGELUActivation", "GELUTanh", "PytorchGELUTanh",
        "AccurateGELUActivation", "QuickGELUActivation", "SiLUActivation", "MishActivation", "LaplaceActivation",
        "ClippedGELUActivation", "LinearActivation", "ReLUSquaredActivation", "SqrtSoftplusActivation",
    }),
}

_MADE: dict[type[nn.Module], type[nn.Module]] = {}


def external_twins(model: nn.Module) -> dict[type[nn.Module], type[nn.Module]]:
    """``{class: twin class}`` for the element-wise activation classes of other libraries that
    ``model`` uses (one twin class per class, made once)."""
    found = {}
    for module in model.modules():
        cls = type(module)
        if cls.__name__ in ELEMENTWISE_CLASSES.get(cls.__module__, ()):
            if cls not in _MADE:
                doc = f"``{cls.__module__}.{cls.__name__}`` whose backward passes relevance through unchanged."
                _MADE[cls] = type(f"LRP{cls.__name__}", (_ActivationTwin, cls),
                                  {"_torch_class": cls, "__doc__": doc, "__module__": __name__})
            found[cls] = _MADE[cls]
    return found
