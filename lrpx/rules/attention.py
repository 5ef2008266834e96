"""Rules of the non-linear operations inside attention and gates (AttnLRP, Achtibat et al.,
"AttnLRP: Attention-Aware Layer-wise Relevance Propagation for Transformers", ICML 2024)."""
from __future__ import annotations

import torch

from .base import Rule, divide, nonnegative_number

__all__ = ["Taylor", "Uniform"]


class Taylor(Rule):
    r"""First-order Taylor decomposition at the input itself with the bias absorbed (AttnLRP,
    Prop. 3.1), the softmax rule: for :math:`s = \mathrm{softmax}(x)` along ``dim``,

    .. math:: R_x = x \odot \Big(R - s \sum_{dim} R\Big).

    Relevance is not conserved (:math:`\sum R_x = \sum x R - \sum x s \sum R` per slice: the
    rest is what the bias of the expansion absorbs). The rule has no denominator and no
    stabilizer. Masked inputs (:math:`x = -\infty`) get relevance 0.
    """

    saves = ("input", "output")
    kinds = frozenset({"softmax"})

    def relevance(self, layer, relevance, input, weight, bias, output):
        total = relevance.sum(layer.dim, keepdim=True)
        relevance_in = torch.addcmul(relevance, output, total, value=-1).mul_(input)
        return relevance_in.masked_fill_(input == float("-inf"), 0)


class Uniform(Rule):
    r"""Relevance split evenly between the factors of a product of two activations.

    * ``bilinear`` layers, :math:`O = AB` (a matrix product; AttnLRP, Prop. 3.3): the epsilon
      rule on each factor with half of the relevance,

      .. math:: S = \frac{R}{\mathrm{stab}(2\,AB, \epsilon)}, \qquad
          R_A = A \odot (S B^\top), \qquad R_B = B \odot (A^\top S),

      batched over (broadcast) leading dimensions (for ``torch.einsum`` of two factors,
      :math:`S B^\top` and :math:`A^\top S` are the VJPs of the contraction), so :math:`\sum R_A + \sum R_B = \sum R` up to
      the stabilizer;
    * ``product`` layers, :math:`a \odot b` (AttnLRP, Prop. 3.2): :math:`R_a = R_b = R / 2` when
      both factors carry signal; when one of them is a gate (a sigmoid-like branch) or a
      constant factor (a number, parameter or buffer), the other takes all of :math:`R` (the
      signal-take-all rule of gates, Arras et al. 2017). Summed over broadcast dimensions.
    """

    saves = ("input", "output")
    kinds = frozenset({"bilinear", "product"})

    def saves_for(self, layer) -> tuple[str, ...]:
        return () if layer.kind == "product" else self.saves  # a product's split needs only shapes

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        if layer.kind == "product":
            return _split_product(layer.signal, relevance, layer.shapes)
        a, b = input
        s = divide(relevance, output * 2, self.epsilon)
        s_a, s_b = layer.pair_vjp(s, a, b)
        return s_a.mul_(a).sum_to_size(a.shape), s_b.mul_(b).sum_to_size(b.shape)


def _split_product(signal: int | None, relevance, shapes):
    if signal is None:
        half = relevance * 0.5
        return tuple(half.sum_to_size(shape) for shape in shapes)
    shares: list = [None, None]
    shares[signal] = relevance.sum_to_size(shapes[signal])
    return tuple(shares)
