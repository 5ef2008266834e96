"""What to explain when the model is not a classifier: callables ``target(output) -> (B,)``
for :func:`lrpx.explain` that pick one score per sample from whatever the model returns.

>>> relevance = lrpx.explain(lrp_model, x, lrpx.targets.segment(15)).relevance   # class 15's pixels
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["segment", "logit"]


def _map(output: Any, key: str) -> Tensor:
    """The ``(B, C, H, W)`` map of a segmentation output: the tensor itself, or ``output[key]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and key in output:
        return output[key]
    raise TypeError(f"segment() needs a (B, C, H, W) tensor or a dict with key {key!r} as the model's output, got "
                    f"{type(output).__name__}" + (f" with keys {list(output)}" if isinstance(output, Mapping) else ""))


def segment(class_index: int, mask: Tensor | None = None, *, key: str = "out",
            reduce: str = "sum") -> Callable[..., Tensor]:
    r"""The logits of class ``class_index`` summed (or averaged) over a region of a segmentation map.

    .. math:: s_b = \sum_{i,j} m_{b,i,j}\; y_{b,c,i,j}
        \quad\text{or, with } \texttt{reduce="mean"},\quad s_b / \sum_{i,j} m_{b,i,j}

    where ``y`` is the model's ``(B, C, H, W)`` output (or ``output[key]`` for a dict output,
    as torchvision's segmentation models return) and ``m`` the ``mask``: ``(H, W)`` or
    ``(B, H, W)``, bool or float weights; ``None`` is the whole map. With ``initial="logit"``
    the relevance starts at those logits and sums to :math:`s_b` up to what biases absorb.

    The callable takes the output and, from :mod:`lrpx.eval`, the index of the sample each
    output row belongs to (to pick its row of a ``(B, H, W)`` mask): ``score(output, sample=None)``.
    """
    if not isinstance(class_index, int) or class_index < 0:
        raise ValueError(f"class_index must be a non-negative int, got {class_index!r}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")

    def score(output: Any, sample: Tensor | None = None) -> Tensor:
        y = _map(output, key)
        if y.dim() != 4:
            raise ValueError(f"segment() needs a (B, C, H, W) output, got shape {tuple(y.shape)}")
        if class_index >= y.shape[1]:
            raise ValueError(f"class {class_index} is outside the head's {y.shape[1]} classes "
                             f"(0..{y.shape[1] - 1})")
        logits = y[:, class_index]
        if mask is None:
            total = logits.sum((1, 2))
            return total / logits[0].numel() if reduce == "mean" else total
        weights = mask.to(device=y.device, dtype=y.dtype)
        if weights.dim() == 3 and sample is not None and weights.shape[0] > 1:
            weights = weights[sample.to(weights.device)]
        if weights.shape[-2:] != logits.shape[-2:] or weights.dim() not in (2, 3) or \
                (weights.dim() == 3 and weights.shape[0] not in (1, logits.shape[0])):
            raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (H, W) or (B, H, W) with (H, W) = "
                             f"{tuple(logits.shape[-2:])} and B = {logits.shape[0]}")
        total = (logits * weights).sum((1, 2))
        return total / weights.expand_as(logits).sum((1, 2)).clamp_min(1e-12) if reduce == "mean" else total

    score.__name__ = f"segment({class_index})"
    return score


def logit(class_index: int | Tensor, *, key: str | None = None) -> Callable[[Any], Tensor]:
    """The logit of ``class_index`` (an int, or ``(B,)`` per sample) of a ``(B, classes)``
    output, or of ``output[key]``: the callable form of a class target."""

    def score(output: Any, sample: Tensor | None = None) -> Tensor:
        y = output if key is None else output[key]
        if isinstance(class_index, Tensor):
            index = class_index if sample is None else class_index.to(sample.device)[sample]
        else:
            index = y.new_full((y.shape[0],), class_index).long()
        if bool(((index < 0) | (index >= y.shape[1])).any()):
            raise ValueError(f"class {index.tolist()} outside the head's {y.shape[1]} classes")
        return y.gather(1, index.view(-1, 1).to(y.device)).squeeze(1)

    return score
