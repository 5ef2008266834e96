r"""Twins of LayerNorm, GroupNorm and torchvision's LayerNorm2d (AttnLRP's normalisation rule).

The layer is read as :math:`y = c / \sigma \cdot w + b` with :math:`c = x - \mathrm{mean}(x)`
over the normalised set and :math:`\sigma = \sqrt{\mathrm{var}(x) + \mathrm{eps}}` held constant
(Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
Transformers", ICML, Prop. 3.4 and Eq. 8): the division by :math:`\sigma` and the product with
:math:`w` pass relevance through, the bias takes its share of the sum :math:`n + b`, and the
linear centring takes the epsilon rule. Twins accept ``Norm(epsilon)`` (that rule) and
``Pass()`` (relevance passes the whole layer unchanged).
"""
from __future__ import annotations

from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import GroupNormOps, LayerNormOps
from .base import Twin

try:
    from torchvision.models.convnext import LayerNorm2d
except (ImportError, AttributeError):  # no torchvision, or convnext changed
    LayerNorm2d = None

__all__ = ["LRPLayerNorm", "LRPGroupNorm", "NORM_TWINS"]


def _doc(head: str, where: str) -> str:
    return head + r"""

    The layer is :math:`y = c / \sigma \cdot w + b` with :math:`c = x - \bar x` and :math:`\sigma`
    held constant; bars are means over the normalised set, """ + where + r""". Without affine
    parameters :math:`w = 1`, :math:`b = 0`. With ``Norm(epsilon)``, :math:`n = y - b` and
    :math:`\mathrm{stab}(z) = z + \epsilon\,\mathrm{sign}_0(z)`:

    .. math::

        R^n_i = n_i \frac{R_i}{\mathrm{stab}(y_i)}, \qquad
        s_i = \frac{R^n_i}{\mathrm{stab}(c_i)}, \qquad
        R^x_i = x_i \,(s_i - \bar s).

    With ``Pass()``, :math:`R^x = R`; ``from_module`` raises ``TypeError`` for a rule that fits
    no normalisation layer.

    References
    ----------
    Achtibat et al. 2024, "AttnLRP", ICML, Prop. 3.4 and Eq. 8.
    """


class _NormTwin(Twin):
    lrp_kind = "normalization"

    def _ops(self) -> LayerNormOps | GroupNormOps:
        return LayerNormOps(tuple(self.normalized_shape), self.eps)

    def forward(self, input: Tensor) -> Tensor:
        return lrp_apply(self._ops(), self.rule, input, self.weight, self.bias)


class LRPLayerNorm(_NormTwin, nn.LayerNorm):
    __doc__ = _doc("``nn.LayerNorm`` whose backward applies AttnLRP's normalisation rule.",
                   "the trailing ``normalized_shape`` dimensions")


class LRPGroupNorm(_NormTwin, nn.GroupNorm):
    __doc__ = _doc("``nn.GroupNorm`` whose backward applies AttnLRP's normalisation rule.",
                   "per sample the channels of one group at all positions")

    def _ops(self) -> GroupNormOps:
        return GroupNormOps(self.num_groups, self.eps)


#: ``{torch class: twin class}`` of the normalisation layers
NORM_TWINS: dict[type[nn.Module], type[nn.Module]] = {nn.LayerNorm: LRPLayerNorm, nn.GroupNorm: LRPGroupNorm}

if LayerNorm2d is not None:

    class LRPLayerNorm2d(_NormTwin, LayerNorm2d):
        __doc__ = _doc("torchvision's ConvNeXt ``LayerNorm2d`` (LayerNorm over the channels of NCHW) "
                       "whose backward applies AttnLRP's normalisation rule.", "the channels at one position")

        def forward(self, input: Tensor) -> Tensor:  # NCHW -> NHWC, LayerNorm over C, back
            return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    NORM_TWINS[LayerNorm2d] = LRPLayerNorm2d
    __all__.append("LRPLayerNorm2d")
