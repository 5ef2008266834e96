r"""Faithfulness and complexity metrics beyond pixel flipping, as batched tensor operations.

* :func:`deletion` and :func:`insertion` (Petsiuk et al. 2018): the softmax probability of the
  target as the most relevant regions are removed from the image, or inserted into a filled
  one; the AUC summarises each curve.
* :func:`faithfulness_correlation` (Bhatt et al. 2020): the Pearson correlation, over random
  subsets of regions, between the relevance of a subset and the drop of the target score when
  it is replaced by a baseline.
* :func:`sparseness` (Chalasani et al. 2020): the Gini index of the absolute relevance.

Randomization tests (Adebayo et al. 2018) are in :mod:`lrpx.eval.randomization`; the
ground-truth scores (relevance mass / rank accuracy) in :mod:`lrpx.eval.ground_truth`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .draws import Generators, rand
from .flipping import (check_target, check_target_range, model_output, perturbation_curves, target_scores,
                       warn_if_training)
from .order import channel_sum, removal_rank
from .perturb import FillSpec, Normalizer, Perturbation, Schedule
from .result import FlippingResult
from .scores import as_score

__all__ = ["deletion", "insertion", "faithfulness_correlation", "sparseness", "pearson"]


def deletion(model: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, target=None, *,
             patch_size: int = 1, steps: int | None = None, schedule: Schedule = "linear",
             fill: FillSpec = 0.0, score: str | Callable = "softmax", normalizer: Normalizer | None = None,
             pixel_range: tuple[float, float] | None = None, batch_size: int = 32,
             generator: Generators = None, progress: bool = False) -> FlippingResult:
    r"""The deletion metric (Petsiuk et al. 2018, "RISE"): remove the most relevant regions
    first and track the target's softmax probability.

    With regions ranked by decreasing relevance (MoRF) and ``n_k`` regions removed after step
    ``k``, :math:`x_k = (1 - M_k) \odot x + M_k \odot \mathrm{fill}` and
    :math:`y_k = \mathrm{softmax}(f(x_k))_c`. ``result.auc()`` is the area under
    :math:`y` over the share removed (lower is better). It is :func:`~lrpx.eval.pixel_flipping`
    with ``order="morf"`` and ``score="softmax"``; the default fill ``0.0`` is zero in
    model-input space (the data set's mean colour for a normalised image), as in the paper.
    The other arguments are those of :func:`~lrpx.eval.pixel_flipping`.
    """
    return perturbation_curves(model, x, relevance, target, mode="delete", patch_size=patch_size, steps=steps,
                               schedule=schedule, order="morf", fill=fill, score=score, reduce="sum",
                               normalizer=normalizer, pixel_range=pixel_range, batch_size=batch_size,
                               generator=generator, progress=progress)


def insertion(model: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, target=None, *,
              patch_size: int = 1, steps: int | None = None, schedule: Schedule = "linear",
              fill: FillSpec = "blur", score: str | Callable = "softmax", normalizer: Normalizer | None = None,
              pixel_range: tuple[float, float] | None = None, batch_size: int = 32,
              generator: Generators = None, progress: bool = False) -> FlippingResult:
    r"""The insertion metric (Petsiuk et al. 2018, "RISE"): start from the filled image (a blur
    of the input by default, as in the paper) and insert the most relevant regions first.

    With ``M_k`` the first ``n_k`` regions in decreasing relevance,
    :math:`x_k = M_k \odot x + (1 - M_k) \odot \mathrm{fill}` and
    :math:`y_k = \mathrm{softmax}(f(x_k))_c`, so :math:`x_0` is all fill and :math:`x_T` the
    input (when the schedule reaches every region). ``result.auc()`` is the area under
    :math:`y` over the share inserted (higher is better); ``result.mode == "insert"``. The
    target is fixed on the clean input (its argmax when ``target`` is None). Other arguments as
    for :func:`~lrpx.eval.pixel_flipping`.
    """
    return perturbation_curves(model, x, relevance, target, mode="insert", patch_size=patch_size, steps=steps,
                               schedule=schedule, order="morf", fill=fill, score=score, reduce="sum",
                               normalizer=normalizer, pixel_range=pixel_range, batch_size=batch_size,
                               generator=generator, progress=progress)


def faithfulness_correlation(model: Callable[[Tensor], Tensor], x: Tensor, relevance: Tensor, target=None, *,
                             subsets: int = 100, subset_size: int | float = 0.1, patch_size: int = 1,
                             fill: FillSpec = 0.0, score: str | Callable = "logit",
                             normalizer: Normalizer | None = None, pixel_range: tuple[float, float] | None = None,
                             batch_size: int = 32, generator: Generators = None,
                             return_terms: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    r"""Faithfulness correlation (Bhatt et al. 2020, "Evaluating and aggregating feature-based
    model explanations", IJCAI).

    For each sample, ``subsets`` random subsets :math:`S_1, \dots, S_K` of ``subset_size``
    regions (a count, or a share of the regions) are drawn from ``generator``; each is replaced
    by the fill, and

    .. math:: \mu_F = \mathrm{corr}_{k}\Big(\sum_{i \in S_k} R_i,\;
        f_c(x) - f_c(x_{[S_k \leftarrow \mathrm{fill}]})\Big)

    is the Pearson correlation over the subsets between the relevance of the subset and the
    drop of the target score. Higher is better, in ``[-1, 1]``; a constant relevance sum or a
    constant drop gives 0. All ``B * subsets`` perturbed inputs are streamed through the model
    in chunks of ``batch_size`` (under ``torch.inference_mode``).

    Parameters
    ----------
    subsets
        Number of random subsets per sample (:math:`K \ge 2`).
    subset_size
        Regions per subset: an int, or a float in ``(0, 1)`` (a share of the regions).
    fill
        The baseline of removed regions (default ``0.0``, zero in model-input space); any fill
        of :func:`~lrpx.eval.pixel_flipping`.
    score
        ``"logit"`` (default) or ``"softmax"`` or a callable ``score(output, target)``; not used
        with a callable ``target`` (as for :func:`~lrpx.eval.pixel_flipping`).
    return_terms
        Also return the ``(B, K)`` relevance sums and score drops.

    Returns
    -------
    Tensor
        ``(B,)`` float64 correlations (and the terms, with ``return_terms``).
    """
    _, score_fn = as_score(score)
    if not isinstance(subsets, int) or subsets < 2:
        raise ValueError(f"subsets must be an int >= 2, got {subsets!r}")
    targets = check_target(target, x)
    warn_if_training(model)
    plan = Perturbation(x, relevance, patch_size=patch_size, steps=1, schedule="linear", orders=("morf",),
                        fill=fill, reduce="sum", normalizer=normalizer, pixel_range=pixel_range,
                        generator=generator)
    size = _subset_size(subset_size, plan.num_regions)
    batch, device = x.shape[0], x.device
    regions = plan.regions.flatten(1).double()  # (B, P)
    draws = rand((batch, subsets, plan.num_regions), generator, device=device)
    ranks = removal_rank(draws.flatten(0, 1).argsort(1)).view(batch, subsets, *plan.regions.shape[1:])
    chosen = ranks.flatten(2) < size  # (B, K, P)
    relevance_sums = (chosen.double() * regions[:, None]).sum(-1)
    with torch.inference_mode():
        if callable(targets):  # a callable target picks the scores from any output
            def scores_of(inputs: Tensor, samples: Tensor) -> Tensor:
                return target_scores(targets, model(inputs), samples)
        else:
            clean = torch.cat([model_output(model, chunk) for chunk in plan.x.split(batch_size)])
            targets = clean.argmax(1) if targets is None else targets
            check_target_range(targets, clean)

            def scores_of(inputs: Tensor, samples: Tensor) -> Tensor:
                return score_fn(model_output(model, inputs), targets[samples]).double()
        every = torch.arange(batch, device=device)
        y_clean = torch.cat([scores_of(plan.x[part], every[part])
                             for part in (slice(i, i + batch_size) for i in range(0, batch, batch_size))])
        drops = torch.empty(batch, subsets, dtype=torch.float64, device=device)
        sample = every.repeat_interleave(subsets)
        flat_ranks, count = ranks.flatten(0, 1), torch.full((batch * subsets,), size, device=device)
        for start in range(0, batch * subsets, batch_size):
            part = slice(start, start + batch_size)
            inputs, _ = plan.build(sample[part], flat_ranks[part], count[part])
            drops.view(-1)[part] = y_clean[sample[part]] - scores_of(inputs, sample[part])
    correlation = pearson(relevance_sums, drops)
    return (correlation, relevance_sums, drops) if return_terms else correlation


def _subset_size(subset_size: int | float, regions: int) -> int:
    if isinstance(subset_size, float) and not isinstance(subset_size, bool):
        if not 0 < subset_size < 1:
            raise ValueError(f"subset_size as a share must be in (0, 1), got {subset_size}")
        return max(1, round(subset_size * regions))
    if not isinstance(subset_size, int) or not 1 <= subset_size < regions:
        raise ValueError(f"subset_size must be an int in [1, {regions - 1}] (regions: {regions}) or a share in "
                         f"(0, 1), got {subset_size!r}")
    return subset_size


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the rows of ``a`` and ``b`` (``(B, K)`` each), float64; 0 where
    either row is constant."""
    a, b = a.double(), b.double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    norm = (a.square().sum(-1) * b.square().sum(-1)).sqrt()
    return torch.where(norm > 0, (a * b).sum(-1) / norm.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def sparseness(relevance: Tensor, *, channels: str = "sum") -> Tensor:
    r"""Sparseness: the Gini index of the absolute relevance (Chalasani et al. 2020, "Concise
    explanations of neural networks using adversarial training", ICML; the index of Hurley and
    Rickard 2009).

    With :math:`a_{(1)} \le \dots \le a_{(n)}` the sorted absolute relevance of one sample,

    .. math:: G = \frac{\sum_{i=1}^n (2i - n - 1)\, a_{(i)}}{n \sum_i a_{(i)}} \in [0, 1 - 1/n],

    0 for relevance spread evenly, close to 1 for relevance on few pixels (higher is sparser);
    an all-zero map gives 0.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``; any ``(B, ...)`` with ``channels="none"``.
    channels
        ``"sum"``: the index of ``|sum_c R|`` per pixel (the heatmap); ``"none"``: of every entry.

    Returns
    -------
    Tensor
        ``(B,)`` float64.
    """
    if channels not in ("sum", "none"):
        raise ValueError(f"channels must be 'sum' or 'none', got {channels!r}")
    values = channel_sum(relevance) if channels == "sum" and relevance.dim() in (3, 4) else relevance
    a = values.detach().double().flatten(1).abs().sort(1).values
    n = a.shape[1]
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64, device=a.device) - n - 1
    total = a.sum(1)
    return torch.where(total > 0, (a * weights).sum(1) / (n * total).clamp_min(torch.finfo(torch.float64).tiny), 0.0)
