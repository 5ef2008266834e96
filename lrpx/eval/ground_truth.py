"""Ground-truth scores: how much of an attribution falls on the known evidence (Arras et al.
2022, CLEVR-XAI), for data sets with object masks such as :mod:`lrpx.datasets`."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relevance_mass_accuracy", "relevance_rank_accuracy"]


def _positive_map(relevance: Tensor) -> Tensor:
    """Channel sum ``(B, H, W)`` of a ``(B, C, H, W)`` / ``(B, 1, H, W)`` / ``(B, H, W)`` relevance."""
    return relevance.sum(1) if relevance.dim() == 4 else relevance


def _mask_map(mask: Tensor, like: Tensor) -> Tensor:
    mask = mask[:, 0] if mask.dim() == 4 else mask
    if mask.shape != like.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the relevance map {tuple(like.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def relevance_mass_accuracy(relevance: Tensor, mask: Tensor) -> Tensor:
    r"""Share of the positive relevance that falls inside the mask (Arras et al. 2022).

    .. math:: \mathrm{RMA} = \frac{\sum_{p \in M} \max(0, R_p)}{\sum_p \max(0, R_p)}

    with :math:`R_p` the relevance of pixel :math:`p` summed over channels.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``.
    mask
        ``(B, 1, H, W)`` or ``(B, H, W)`` bool ground truth.

    Returns
    -------
    Tensor
        ``(B,)`` float64 in ``[0, 1]``; 0 for a sample without positive relevance.
    """
    heat = _positive_map(relevance).double()
    inside = _mask_map(mask, heat)
    positive = heat.clamp_min(0).flatten(1)
    total = positive.sum(1)
    return torch.where(total > 0, (positive * inside.flatten(1)).sum(1) / total.clamp_min(1e-300), 0.0)


def relevance_rank_accuracy(relevance: Tensor, mask: Tensor) -> Tensor:
    r"""Share of the ``K = |M|`` most relevant pixels that lie in the mask (Arras et al. 2022).

    Pixels are ranked by their relevance summed over channels; ties go to the earlier pixel in
    raster order.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)``.
    mask
        ``(B, 1, H, W)`` or ``(B, H, W)`` bool ground truth.

    Returns
    -------
    Tensor
        ``(B,)`` float64 in ``[0, 1]``; 0 for an empty mask.
    """
    heat = _positive_map(relevance).double().flatten(1)
    inside = _mask_map(mask, _positive_map(relevance)).flatten(1)
    order = torch.sort(heat, dim=1, descending=True, stable=True).indices
    size = inside.sum(1, keepdim=True)
    top = torch.arange(heat.shape[1], device=heat.device).view(1, -1) < size
    hits = (inside.gather(1, order) & top).sum(1)
    return hits.double() / size.squeeze(1).clamp_min(1).double()
