r"""Model-parameter randomization (Adebayo et al. 2018, "Sanity checks for saliency maps",
NeurIPS): an explanation that depends on what the model learned changes when the learned
parameters are replaced by random ones.

:func:`randomization` randomizes the parameterised layers of a copy of the model one at a time
from the output down (cascading: each step keeps the layers randomized before it), explains
the same inputs after each step, and compares each explanation with the trained model's by
Spearman rank correlation and SSIM (:func:`spearman`, :func:`ssim`). Low similarity is what a
faithful explanation shows.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .metrics import pearson
from .order import channel_sum

__all__ = ["randomization", "RandomizationResult", "spearman", "ssim", "rank_average"]


@dataclass(frozen=True, eq=False)
class RandomizationResult:
    """Similarity of each cascading step's explanation with the trained model's.

    Attributes
    ----------
    layers
        The layers randomized, in order (top first); step ``i`` has ``layers[:i + 1]`` random.
    spearman, ssim
        ``(len(layers), B)`` float64.
    target
        ``(B,)`` the explained classes.
    """

    layers: tuple[str, ...]
    spearman: Tensor
    ssim: Tensor
    target: Tensor


def randomization(model: nn.Module, x: Tensor, explain: Callable[[nn.Module, Tensor, Tensor], Tensor],
                  target=None, *, layers: Sequence[str] | None = None, absolute: bool = True,
                  generator: torch.Generator | None = None) -> RandomizationResult:
    r"""Cascading model-parameter randomization test.

    Parameters
    ----------
    model
        The trained model (not modified; a copy is randomized).
    x
        ``(B, C, H, W)`` inputs.
    explain
        ``explain(model, x, target) -> relevance`` of the shape of ``x`` (or ``(B, H, W)``), e.g.
        ``lambda m, x, t: lrpx.explain(lrpx.convert(m, composite), x, t).relevance``.
    target
        Classes to explain (an int or ``(B,)``); ``None``: the trained model's argmax. Fixed for
        every step.
    layers
        Qualified names of the modules to randomize, in the order to randomize them; default:
        every module that holds parameters of its own, from the last in module order to the
        first (Adebayo et al.'s top-down cascade).
    absolute
        Compare absolute relevance (the heatmap's magnitude; the paper reports both).
    generator
        Source of the random parameters (on the CPU). Each parameter :math:`p` is redrawn as
        :math:`\mathcal N(0, \sigma_p^2)` with :math:`\sigma_p` the standard deviation of the
        trained :math:`p` (or :math:`1/\sqrt{\text{fan-in}}` where that is 0, e.g. zero biases);
        buffers (BatchNorm statistics) are kept.

    Returns
    -------
    RandomizationResult
        Spearman rank correlation and SSIM per layer and sample (see :func:`spearman`,
        :func:`ssim`; maps summed over channels, absolute with ``absolute``, each scaled to
        ``[0, 1]`` for SSIM).
    """
    names = _layers(model) if layers is None else list(layers)
    known = dict(model.named_modules())
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"randomization: no module named {missing[0]!r}; modules with parameters: "
                         f"{_layers(model)[:8]}")
    if target is None:
        with torch.no_grad():
            target = model(x).argmax(1)
    target = torch.as_tensor(target, device=x.device).long().expand(x.shape[0])
    reference = _map(explain(model, x, target), absolute)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    randomized = copy.deepcopy(model)
    rho, structure = [], []
    for name in names:
        _randomize(randomized.get_submodule(name), generator)
        current = _map(explain(randomized, x, target), absolute)
        rho.append(spearman(reference, current))
        structure.append(ssim(_unit(reference), _unit(current)))
    return RandomizationResult(tuple(names), torch.stack(rho), torch.stack(structure), target)


def _layers(model: nn.Module) -> list[str]:
    owners = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    return owners[::-1]


@torch.no_grad()
def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    for p in module.parameters(recurse=False):
        std = float(p.detach().double().std()) if p.numel() > 1 else 0.0
        if not std > 0:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            std = 1.0 / math.sqrt(max(fan_in, 1))
        draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * std
        p.copy_(draw.to(dtype=p.dtype, device=p.device))


def _map(relevance: Tensor, absolute: bool) -> Tensor:
    values = channel_sum(relevance.detach()).double()
    return values.abs() if absolute else values


def _unit(maps: Tensor) -> Tensor:
    """Each map scaled to ``[0, 1]`` by its minimum and maximum (a constant map becomes 0)."""
    flat = maps.flatten(1)
    low, high = flat.amin(1).view(-1, 1, 1), flat.amax(1).view(-1, 1, 1)
    return torch.where(high > low, (maps - low) / (high - low).clamp_min(torch.finfo(maps.dtype).tiny), 0.0)


def rank_average(values: Tensor) -> Tensor:
    """Ranks ``1..n`` of each row of ``(B, n)``, ties given the mean of their ranks."""
    order = values.argsort(dim=1, stable=True)
    ordered = values.gather(1, order)
    ranks = torch.empty_like(values, dtype=torch.float64)
    for row in range(values.shape[0]):
        _, inverse, counts = torch.unique_consecutive(ordered[row], return_inverse=True, return_counts=True)
        last = counts.cumsum(0).double()
        mean_rank = last - (counts.double() - 1) / 2
        ranks[row, order[row]] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of ``a`` and ``b`` per sample (``(B, ...)`` each, flattened):
    the Pearson correlation of their average ranks. ``(B,)`` float64."""
    return pearson(rank_average(a.flatten(1)), rank_average(b.flatten(1)))


def ssim(a: Tensor, b: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    r"""Structural similarity (Wang et al. 2004) of two ``(B, H, W)`` maps per sample.

    Local means, variances and the covariance are taken under a Gaussian window (side
    ``window``, shrunk to the largest odd size that fits the map; standard deviation
    ``sigma``) at every position where it fits (no padding), and

    .. math:: \mathrm{SSIM} = \mathrm{mean}\,\frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
        {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)},
        \quad C_1 = (0.01 L)^2,\; C_2 = (0.03 L)^2

    with :math:`L` = ``data_range``. ``(B,)`` float64.
    """
    a, b = a.double().unsqueeze(1), b.double().unsqueeze(1)
    side = min(window, a.shape[-2], a.shape[-1])
    side -= 1 - side % 2
    taps = torch.arange(side, dtype=torch.float64, device=a.device) - (side - 1) / 2
    g = torch.exp(-taps.square() / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).view(1, 1, side, side)

    def local(t: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(t, kernel)

    mu_a, mu_b = local(a), local(b)
    var_a = local(a * a) - mu_a.square()
    var_b = local(b * b) - mu_b.square()
    cov = local(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)
