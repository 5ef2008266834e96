"""What the atlas reads from one layer: the relevance and the activation of each channel of
each image, from one forward and one full backward pass from the prediction, and where in
the input a channel's evidence lies (the crop of a reference sample)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..record import Probes, check_names, forward_with_probes

__all__ = ["LayerScan", "check_layer", "scan_layer", "conditional_heatmaps", "mass_box", "position_box", "crop_box"]


@dataclass(frozen=True)
class LayerScan:
    """The channels of one layer on a batch of ``B`` inputs, for the top class of each.

    Attributes
    ----------
    prediction
        ``(B,)``: the top class, whose logit is explained.
    score
        ``(B,)``: its logit.
    relevance
        ``(B, C)``: the relevance of each channel (summed over the channel's positions).
    activation
        ``(B, C)``: the largest activation of each channel over its positions.
    position
        ``(B, C)``: the flat index, in the channel's spatial map, of that largest activation.
    spatial
        The shape of a channel's spatial map (e.g. ``(H', W')``).
    """

    prediction: Tensor
    score: Tensor
    relevance: Tensor
    activation: Tensor
    position: Tensor
    spatial: tuple[int, ...]


def check_layer(lrp_model: nn.Module, layer: str, x: Tensor) -> tuple[int, tuple[int, ...]]:
    """``(channels, spatial shape)`` of ``layer``'s output for the input ``x`` (``(1, ...)``).

    Raises
    ------
    ValueError
        No module of that name (close names suggested), or an output without a channel axis
        and at least one spatial axis after the batch axis, ``(B, C, ...)``.
    TypeError
        The module returns something other than a tensor.
    """
    check_names(lrp_model, [layer])
    probes = Probes(record=frozenset([layer]))
    with torch.no_grad():
        forward_with_probes(lrp_model, probes, x)
    output = probes.outputs.get(layer)
    if output is None:
        raise ValueError(f"the forward pass does not call {layer!r}")
    if output.dim() < 3:
        raise ValueError(f"{layer!r} gives outputs of shape {tuple(output.shape)}; a concept atlas needs channel maps "
                         "(B, C, ...) with at least one spatial axis, e.g. a convolution's (B, C, H, W)")
    return output.shape[1], tuple(output.shape[2:])


def scan_layer(lrp_model: nn.Module, x: Tensor, layer: str) -> LayerScan:
    """Explain the top class of each input of ``x`` with a full backward pass from the
    output and read, at ``layer``, each channel's relevance and its largest activation."""
    probes = Probes(record=frozenset([layer]))
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = forward_with_probes(lrp_model, probes, inp)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError("the concept atlas explains classifiers ((B, classes) outputs)")
        prediction = out.detach().argmax(1)
        start = torch.zeros_like(out).scatter_(1, prediction[:, None], 1.0) * out.detach()
        torch.autograd.grad(out, inp, grad_outputs=start)
    relevance, activation = probes.recorded()[layer], probes.outputs[layer]
    largest, position = activation.flatten(2).max(2)
    return LayerScan(prediction, out.detach().gather(1, prediction[:, None])[:, 0], relevance.flatten(2).sum(2),
                     largest, position, tuple(activation.shape[2:]))


def conditional_heatmaps(lrp_model: nn.Module, x: Tensor, target: Tensor, layer: str, channels: Tensor, *,
                         rows_per_pass: int = 16) -> Tensor:
    """Conditional heatmaps of many (input, channel) pairs: row ``i`` explains the class
    ``target[i]`` of ``x[i]`` with a full backward pass from the output that keeps, at the
    output of ``layer``, only the relevance of channel ``channels[i]``.

    Unlike :func:`lrpx.concepts.attribute` (every condition for every input), each row has its
    own input and channel, so the reference images of a batch share the passes. Returns the
    input relevance, shape of ``x``.
    """
    parts = []
    for start in range(0, x.shape[0], rows_per_pass):
        rows = slice(start, start + rows_per_pass)
        probes = Probes(conditions={layer: [[int(c)] for c in channels[rows].tolist()]})
        inp = x[rows].detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = forward_with_probes(lrp_model, probes, inp)
            start_relevance = torch.zeros_like(out).scatter_(1, target[rows, None].to(out.device), 1.0) * out.detach()
            (relevance,) = torch.autograd.grad(out, inp, grad_outputs=start_relevance)
        parts.append(relevance)
    return torch.cat(parts)


def mass_box(heatmap: Tensor, mass: float = 0.8, *, min_side: int = 1) -> tuple[int, int, int, int] | None:
    """The box ``(top, left, bottom, right)`` (bottom and right exclusive) that holds the
    central ``mass`` of ``|heatmap|`` along each axis: the rows from the ``(1 - mass) / 2``
    to the ``(1 + mass) / 2`` quantile of the row sums, the same for the columns; widened
    (about its centre, within the image) to at least ``min_side`` pixels. ``None`` for a
    heatmap without relevance."""
    if heatmap.dim() != 2:
        raise ValueError(f"heatmap must be (H, W), got shape {tuple(heatmap.shape)}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    weight = heatmap.detach().double().abs()
    total = float(weight.sum())
    if not total > 0:
        return None
    spans = []
    for marginal in (weight.sum(1), weight.sum(0)):
        share = marginal.cumsum(0) / total
        low = int((share <= (1 - mass) / 2 + 1e-12).sum())  # first index past the lower tail
        high = int((share < (1 + mass) / 2 - 1e-12).sum())  # the index that reaches the upper quantile
        spans.append(_widen(low, min(high, len(share) - 1) + 1, min_side, len(share)))
    (top, bottom), (left, right) = spans
    return top, left, bottom, right


def position_box(position: int, spatial: tuple[int, int], size: tuple[int, int], *,
                 cells: int = 3) -> tuple[int, int, int, int]:
    """The input box of ``cells`` x ``cells`` feature-map cells around the flat ``position`` in
    a ``spatial`` map of an input of ``size`` pixels (the map scaled onto the input)."""
    (h, w), (height, width) = spatial, size
    row, col = divmod(int(position), w)
    stride_y, stride_x = height / h, width / w
    top, bottom = math.floor((row - (cells - 1) / 2) * stride_y), math.ceil((row + (cells + 1) / 2) * stride_y)
    left, right = math.floor((col - (cells - 1) / 2) * stride_x), math.ceil((col + (cells + 1) / 2) * stride_x)
    return max(top, 0), max(left, 0), min(bottom, height), min(right, width)


def crop_box(heatmap: Tensor, position: int, spatial: tuple[int, ...], *, mass: float = 0.8) -> tuple[tuple[int, int, int, int], bool]:
    """The crop of a reference sample: :func:`mass_box` of its conditional heatmap (at least one
    feature-map cell wide), or, when the heatmap holds no relevance, :func:`position_box` of the
    channel's largest activation. Returns ``(box, whether it fell back to the position)``."""
    size = tuple(heatmap.shape)
    if len(spatial) != 2:
        return (0, 0, *size), False
    side = max(math.ceil(size[0] / spatial[0]), math.ceil(size[1] / spatial[1]))
    box = mass_box(heatmap, mass, min_side=side)
    if box is None:
        return position_box(position, spatial, size), True
    return box, False


def _widen(low: int, high: int, side: int, length: int) -> tuple[int, int]:
    missing = min(side, length) - (high - low)
    if missing <= 0:
        return low, high
    low = max(0, low - missing // 2)
    high = min(length, low + min(side, length))
    return high - min(side, length), high
