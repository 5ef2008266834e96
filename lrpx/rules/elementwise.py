"""Rules for layers without weights: activations, pooling and sums."""
from __future__ import annotations


from .base import Rule, divide

__all__ = ["Pass", "Norm"]


class Pass(Rule):
    r"""Identity rule for element-wise layers: :math:`R_j = R_j`.

    Activations (ReLU and friends) and dropout pass relevance through unchanged.
    """

    saves = ()
    kinds = frozenset({"elementwise"})

    def __init__(self) -> None:
        self._freeze()

    def relevance(self, layer, relevance, input, weight, bias, output):
        return relevance


class Norm(Rule):
    r"""The z-rule with unit weights, for sum and average pooling and residual sums.

    .. math:: R_j = x_j\, g\big(R / \mathrm{stab}(f(x))\big)

    where ``f`` is the pooling (or sum) itself; for average pooling the ``1/n`` of ``f`` and
    ``g`` cancel, so relevance is split in proportion to the inputs.
    """

    saves = ("input", "output")
    kinds = frozenset({"sum"})
    fusable = True  # residual sums (lrpx.layers.Add) may apply a following ReLU

    def __init__(self, epsilon: float = 1e-6) -> None:
        epsilon = float(epsilon)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be a number >= 0, got {epsilon}")
        self.epsilon = epsilon
        self._freeze()

    def relevance(self, layer, relevance, input, weight, bias, output):
        return layer.vjp(divide(relevance, output, self.epsilon), None, input).mul_(input)
