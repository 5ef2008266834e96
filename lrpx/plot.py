"""Matplotlib figures for perturbation evaluations (the optional ``plot`` extra).

Matplotlib is imported inside the functions. Every function builds a
:class:`matplotlib.figure.Figure` without pyplot, so nothing is shown and no global state
changes; save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .eval.result import FlippingResult
from .eval.scores import mean_std

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def plot_curves(
    results: FlippingResult | Mapping[str, FlippingResult],
    *,
    orders: Sequence[str] | None = None,
    band: bool = True,
    ax: Axes | None = None,
) -> Figure:
    """Perturbation curves: the mean over samples per method and order, with a ± std band.

    Parameters
    ----------
    results
        One result, or ``{method name: result}`` to compare methods (e.g. explainers or fills).
    orders
        Orders to draw; all orders of each result by default.
    band
        Shade mean ± standard deviation over the samples.
    ax
        Axes to draw on; a new figure by default.

    Returns
    -------
    Figure
        The legend gives each curve's AUC as mean ± std over the samples.
    """
    fig, ax = _figure_and_axes(ax)
    named = {"": results} if isinstance(results, FlippingResult) else dict(results)
    for method, result in named.items():
        for order in orders or result.orders:
            _draw_curve(ax, result, order, f"{method} {order}".strip(), band)
    ax.set_xlabel("share of regions removed")
    ax.set_ylabel(f"target {next(iter(named.values())).score}")
    ax.legend()
    return fig


def _draw_curve(ax: Axes, result: FlippingResult, order: str, label: str, band: bool) -> None:
    curves = result.curve(order).double().cpu()
    mean, std = curves.mean(dim=0), curves.std(dim=0, correction=0)
    auc, auc_std = mean_std(result.auc(order))
    x = result.fractions.cpu().numpy()
    (line,) = ax.plot(x, mean.numpy(), marker=".", label=f"{label}: AUC {auc:.3f} ± {auc_std:.3f}")
    if band:
        ax.fill_between(x, (mean - std).numpy(), (mean + std).numpy(), color=line.get_color(),
                        alpha=0.2)


def plot_schedule(result: FlippingResult, *, ax: Axes | None = None) -> Figure:
    """Bar chart of the regions removed in each step, with the cumulative share on the right.

    Parameters
    ----------
    result
        A :class:`~lrpx.eval.FlippingResult`.
    ax
        Axes to draw on; a new figure by default.
    """
    fig, ax = _figure_and_axes(ax)
    steps = range(1, len(result.counts))
    ax.bar(steps, result.removed_per_step.cpu().numpy(), color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("regions removed in the step")
    share = ax.twinx()
    share.plot(steps, result.fractions[1:].cpu().numpy(), color="tab:orange", marker=".")
    share.set_ylabel("share removed (cumulative)")
    share.set_ylim(0, 1.05)
    ax.set_title(f"{result.num_regions} regions of {result.patch_size}x{result.patch_size}")
    return fig


def plot_perturbations(
    x: Tensor,
    relevance: Tensor,
    inputs: Tensor,
    masks: Tensor,
    *,
    titles: Sequence[str] | None = None,
    samples: Sequence[int] = (0,),
    to_pixel: Callable[[Tensor], Tensor] | None = None,
    cmap: str = "bwr",
) -> Figure:
    """Grid of the input, its relevance heatmap and the perturbed inputs with the mask outline.

    Parameters
    ----------
    x
        ``(B, C, H, W)`` clean inputs.
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``; summed over channels.
    inputs, masks
        ``(S, B, C, H, W)`` perturbed inputs and ``(S, B, 1, H, W)`` masks, as returned by
        :func:`~lrpx.eval.perturbed_inputs`.
    titles
        One title per perturbed column (e.g. the steps); ``"step i"`` by default.
    samples
        Samples to show, one row each.
    to_pixel
        Map from model-input to pixel space for display; images are then scaled to the clean
        input's range.
    cmap
        Colour map of the heatmap (centred on zero).
    """
    from matplotlib.figure import Figure

    columns = 2 + inputs.shape[0]
    titles = list(titles or [f"step {i}" for i in range(inputs.shape[0])])
    fig = Figure(figsize=(2.2 * columns, 2.2 * len(samples)), layout="constrained")
    axes = fig.subplots(len(samples), columns, squeeze=False)
    for row, sample in zip(axes, samples):
        _draw_row(row, x, relevance, inputs, masks, sample, to_pixel, cmap)
    for ax, title in zip(axes[0], ["input", "relevance", *titles]):
        ax.set_title(title)
    return fig


def _draw_row(row, x, relevance, inputs, masks, sample, to_pixel, cmap) -> None:
    to_pixel = to_pixel or (lambda t: t)
    clean = to_pixel(x[sample : sample + 1]).detach().double().cpu()
    low, high = float(clean.min()), float(clean.max())
    row[0].imshow(_displayable(clean[0], low, high))
    heat = relevance[sample].detach().double().cpu()
    heat = heat.sum(dim=0) if heat.dim() == 3 else heat
    limit = float(heat.abs().max()) or 1.0
    row[1].imshow(heat.numpy(), cmap=cmap, vmin=-limit, vmax=limit)
    for ax, image, mask in zip(row[2:], inputs[:, sample], masks[:, sample]):
        pixels = to_pixel(image[None]).detach().double().cpu()[0]
        ax.imshow(_displayable(pixels, low, high))
        outline = mask[0].double().cpu().numpy()
        if 0 < outline.sum() < outline.size:
            ax.contour(outline, levels=[0.5], colors="yellow", linewidths=0.8)
    for ax in row:
        ax.set_axis_off()


def _displayable(image: Tensor, low: float, high: float):
    scaled = ((image - low) / ((high - low) or 1.0)).clamp(0, 1)
    if scaled.shape[0] == 3:
        return scaled.permute(1, 2, 0).numpy()
    return torch.stack([scaled[0]] * 3, dim=-1).numpy()


def _figure_and_axes(ax: Axes | None):
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    return fig, fig.add_subplot()
