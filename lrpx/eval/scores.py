r"""Model scores of the target class, and the summaries of perturbation curves.

A curve ``y`` holds the target score after each step, ``y_0`` on the clean input; its x axis is
the share of removed regions ``a_k = n_k / P``. All reductions are in float64.

- ``auc = sum_k (a_{k+1} - a_k) (y_k + y_{k+1}) / 2``: trapezoid on the fraction axis.
  MoRF: lower is better; LRF: higher is better.
- ``aopc = mean_{k=0..T} (y_0 - y_k)`` (Samek et al. 2017). MoRF: higher is better.
- ``srg = auc(LRF) - auc(MoRF)`` (symmetric relevance gain, Blücher et al. 2024); with a random
  order also ``mrg = auc(random) - auc(MoRF)`` and ``lrg = auc(LRF) - auc(random)``.
- :func:`unit_step_auc`: trapezoid with unit step over the step index on the batch-mean curve,
  the number earlier pixel-flipping code printed; for parity only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def logit(output: Tensor, target: Tensor) -> Tensor:
    """The target's output (logit), ``(N,)``."""
    return output.gather(1, target.view(-1, 1)).squeeze(1)


def softmax(output: Tensor, target: Tensor) -> Tensor:
    """The target's softmax probability, ``(N,)``."""
    return logit(output.softmax(dim=1), target)


SCORES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"logit": logit, "softmax": softmax}


def as_score(
    score: str | Callable[[Tensor, Tensor], Tensor],
) -> tuple[str, Callable[[Tensor, Tensor], Tensor]]:
    """Resolve the ``score`` argument to ``(name, function(output, target) -> (N,))``."""
    if isinstance(score, str):
        if score not in SCORES:
            raise ValueError(f"score must be one of {sorted(SCORES)} or a callable, got {score!r}")
        return score, SCORES[score]
    if callable(score):
        return getattr(score, "__name__", type(score).__name__), score
    raise TypeError(f"score must be a name or a callable, got {type(score)}")


def auc(curves: Tensor, fractions: Tensor) -> Tensor:
    """Area under the curves on the fraction axis (trapezoid), float64.

    Parameters
    ----------
    curves
        ``(..., T + 1)`` scores.
    fractions
        ``(T + 1,)`` share of regions removed after each step.

    Returns
    -------
    Tensor
        ``(...)`` areas.
    """
    return torch.trapezoid(curves.double(), x=fractions.double().to(curves.device), dim=-1)


def aopc(curves: Tensor) -> Tensor:
    """Area over the perturbation curve: ``mean_k (y_0 - y_k)`` over ``k = 0..T``, float64."""
    curves = curves.double()
    return (curves[..., :1] - curves).mean(dim=-1)


def unit_step_auc(curves: Tensor) -> float:
    """Trapezoid with unit step width over the step index, on the batch-mean curve.

    Parameters
    ----------
    curves
        ``(B, T + 1)`` curves of one order.
    """
    return float(torch.trapezoid(curves.double().mean(dim=0), dx=1.0))


def mean_std(values: Tensor) -> tuple[float, float]:
    """Mean and (population, ``ddof=0``) standard deviation over the samples."""
    values = values.double()
    return float(values.mean()), float(values.std(correction=0))
