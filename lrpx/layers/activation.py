"""Twins of element-wise activations: forward is the activation, backward passes relevance
through unchanged (the Pass rule). Never in-place."""
from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import ElementwiseOps
from .base import Twin

#: the activations that get a pass-through twin
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.ReLU6,
    nn.Softplus, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.PReLU, nn.SELU, nn.CELU,
)
#: the activations whose output is >= 0 whatever their input
NONNEGATIVE_ACTIVATIONS = frozenset({nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid})


class _ActivationTwin(Twin):
    lrp_kind = "elementwise"
    _torch_class: type[nn.Module]

    def forward(self, input: Tensor) -> Tensor:
        return lrp_apply(ElementwiseOps(partial(self._torch_class.forward, self)), self.rule, input)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return self._torch_class in NONNEGATIVE_ACTIVATIONS


def _activation_twin(cls: type[nn.Module]) -> type[nn.Module]:
    doc = f"``nn.{cls.__name__}`` whose backward passes relevance through unchanged."
    return type(f"LRP{cls.__name__}", (_ActivationTwin, cls),
                {"_torch_class": cls, "__doc__": doc, "__module__": __name__})


#: ``{torch activation class: twin class}``
ACTIVATION_TWINS: dict[type[nn.Module], type[nn.Module]] = {cls: _activation_twin(cls) for cls in ACTIVATIONS}
globals().update({twin.__name__: twin for twin in ACTIVATION_TWINS.values()})


class FusedReLU(ACTIVATION_TWINS[nn.ReLU]):  # type: ignore[misc, valid-type]
    """A ReLU that the layer before it applies (``convert`` fuses the pair when this ReLU alone
    reads that layer's output): forward returns its input, which is already ``>= 0``."""

    def forward(self, input: Tensor) -> Tensor:
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", applied by the layer before (fused)"


__all__ = [twin.__name__ for twin in ACTIVATION_TWINS.values()] + [
    "ACTIVATIONS", "ACTIVATION_TWINS", "NONNEGATIVE_ACTIVATIONS", "FusedReLU"]
