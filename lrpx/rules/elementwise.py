"""Rules for layers without weights: activations, pooling, sums and normalisations."""
from __future__ import annotations

from torch import Tensor

from .base import Layer, Rule, divide, divide_after_relu, nonnegative_number

__all__ = ["Pass", "Norm"]


class Pass(Rule):
    r"""Identity rule: :math:`R_j = R_j`.

    Activations (ReLU and friends) and dropout pass relevance through unchanged; on a
    normalisation layer (LayerNorm, GroupNorm) the whole layer passes it unchanged.
    """

    saves = ()
    kinds = frozenset({"elementwise", "normalization"})

    def relevance(self, layer, relevance, input, weight, bias, output):
        return relevance


class Norm(Rule):
    r"""The z-rule with unit weights: relevance in proportion to each input's contribution.

    On a linear map :math:`f` without parameters (``sum`` layers: average pooling, means,
    residual sums :math:`f(x_1, \dots, x_n) = \sum_i x_i`):

    .. math:: R_i = x_i\, g_i\big(R / \mathrm{stab}(f(x))\big)

    where :math:`g_i` is the VJP of :math:`f` for input :math:`i`; for average pooling the
    :math:`1/n` of :math:`f` and :math:`g` cancel.

    On a normalisation layer read as :math:`y = c / \sigma \cdot w + b` with the centring
    :math:`c = x - \bar x` and :math:`\sigma` held constant (AttnLRP, Achtibat et al. 2024,
    Prop. 3.4): the scaling by :math:`w / \sigma` passes relevance, the bias keeps its share
    of :math:`y`, and the centring takes the same z-rule,

    .. math:: R^c = (y - b)\, R / \mathrm{stab}(y), \qquad
        R^x = x\,\big(s - \bar s\big), \quad s = R^c / \mathrm{stab}(c).
    """

    saves = ("input", "bias", "output")
    kinds = frozenset({"sum", "normalization"})
    fusable = True  # residual sums (lrpx.layers.Add) may apply a following ReLU

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        if layer.kind == "normalization":
            return self._normalization(layer, relevance, input, bias, output)
        return _in_proportion(layer, divide(relevance, output, self.epsilon), input)

    def relevance_after_relu(self, layer, relevance, input, weight, bias, output):
        return _in_proportion(layer, divide_after_relu(relevance, output, self.epsilon), input)

    def _normalization(self, layer: Layer, relevance: Tensor, input: Tensor, bias: Tensor | None,
                       output: Tensor) -> Tensor:
        centred_output = output if bias is None else output - layer.bias_like(bias, output)
        relevance_c = divide(relevance, output, self.epsilon).mul_(centred_output)
        s = divide(relevance_c, layer.centre(input), self.epsilon)
        return layer.centre_vjp(s).mul_(input)


def _in_proportion(layer: Layer, s: Tensor, input: Tensor | tuple[Tensor, ...]) -> Tensor | tuple[Tensor, ...]:
    """``x_i * g_i(s)`` for each input of a parameter-free linear map; ``s`` is not read again,
    so the last operand's share may take its buffer."""
    shares = layer.vjp(s, None, input)
    if isinstance(input, Tensor):
        return shares.mul_(input)
    *first, last = zip(input, shares)
    out = [x * g for x, g in first]
    x, g = last
    out.append(g.mul_(x) if g.shape == x.shape else x * g)
    return tuple(out)
