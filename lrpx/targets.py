"""What to explain when the model is not a classifier: callables ``target(output) -> (B,)``
for :func:`lrpx.explain` that pick one score per sample from whatever the model returns.

>>> relevance = lrpx.explain(lrp_model, x, lrpx.targets.segment(15)).relevance   # class 15's pixels
>>> relevance = lrpx.explain(lrp_detector, x, lrpx.targets.detection(0)).relevance  # the top detection
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["segment", "logit", "detection", "matched_detection"]


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


def _detections(output: Any) -> list:
    if not isinstance(output, (list, tuple)) or not all(isinstance(r, Mapping) for r in output):
        raise TypeError(f"a detection target needs the list of dicts (one per image) a detection model returns, got "
                        f"{type(output).__name__}")
    return list(output)


def detection(index: int, class_index: int | None = None) -> Callable[..., Tensor]:
    r"""The class logit of detection ``index`` of each image of a converted detection model.

    .. math:: s_b = \ell_{b}[\,p_b(\mathrm{index}),\; c\,]

    where ``index`` counts the image's detections in the order the model returns them (by
    score, highest first), :math:`p_b(\mathrm{index})` is the proposal (two-stage models) or
    anchor (single-stage models) that detection came from, :math:`\ell_b` the class logits of
    the box head **before** softmax or sigmoid (``output[b]["class_logits"]``, which models
    returned by :func:`lrpx.convert` add; see :mod:`lrpx.detection`), and :math:`c` the
    detection's own label, or ``class_index``. With ``initial="logit"`` the relevance starts
    at that one logit and nothing else: the box regression, the other detections and the
    proposal network receive none. For FCOS the centre-ness that scales the score is not part
    of the logit.

    The callable is ``score(output, sample=None)``; an image with fewer than ``index + 1``
    detections raises ``ValueError`` (saying how many it has), as does a class outside the head.
    """
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a non-negative int (0 is the top detection), got {index!r}")
    if class_index is not None and (not isinstance(class_index, int) or class_index < 0):
        raise ValueError(f"class_index must be a non-negative int or None, got {class_index!r}")

    def score(output: Any, sample: Tensor | None = None) -> Tensor:
        rows = _detections(output)
        picked = []
        for image, r in enumerate(rows):
            if "class_logits" not in r:
                raise TypeError("the detections hold no 'class_logits': explain a model returned by lrpx.convert "
                                f"(keys of image {image}: {sorted(r)})")
            logits, count = r["class_logits"], len(r["class_logits"])
            if index >= count:
                found = "no detections" if count == 0 else \
                    f"{count} detection{'s' if count > 1 else ''} (indices 0..{count - 1})"
                raise ValueError(f"detection {index} does not exist: image {image} has {found}; lower the model's "
                                 "score threshold or pick a smaller index")
            label = int(r["labels"][index]) if class_index is None else class_index
            if label >= logits.shape[1]:
                raise ValueError(f"class {label} is outside the head's {logits.shape[1]} classes "
                                 f"(0..{logits.shape[1] - 1})")
            picked.append(logits[index, label])
        if not picked:
            raise ValueError("the model returned no images")
        return torch.stack(picked)

    score.__name__ = f"detection({index})"
    return score


def matched_detection(boxes: Tensor, labels: Tensor, *, iou: float = 0.5, key: str = "scores") -> Callable[..., Tensor]:
    """For pixel flipping of detections: per image, the score of the detection of the same class
    that best overlaps the reference box (largest IoU, at least ``iou``), or 0 if none does.

    ``boxes`` ``(B, 4)`` (x1, y1, x2, y2) and ``labels`` ``(B,)`` are the explained detection of
    each sample on the clean input; ``key`` names the score: ``"scores"`` (what the model
    reports, also for an unconverted model) or ``"class_logits"`` (the logit of the label, as
    :func:`detection` explains it). The callable is ``score(output, sample)`` as
    :mod:`lrpx.eval` calls it (``sample``: the sample of each output image).
    """
    if boxes.dim() != 2 or boxes.shape[1] != 4 or labels.shape != boxes.shape[:1]:
        raise ValueError(f"boxes must be (B, 4) and labels (B,), got {tuple(boxes.shape)} and {tuple(labels.shape)}")
    if key not in ("scores", "class_logits"):
        raise ValueError(f"key must be 'scores' or 'class_logits', got {key!r}")
    from torchvision.ops import box_iou

    def score(output: Any, sample: Tensor | None = None) -> Tensor:
        rows = _detections(output)
        which = torch.arange(len(rows)) if sample is None else sample.cpu()
        values = []
        for r, s in zip(rows, which.tolist()):
            ref_box, ref_label = boxes[s].to(r["boxes"]), int(labels[s])
            same = (r["labels"] == ref_label).nonzero().flatten()
            overlap = box_iou(ref_box[None], r["boxes"][same])[0] if len(same) else ref_box.new_zeros(0)
            if len(same) == 0 or float(overlap.max()) < iou:
                values.append(ref_box.new_zeros(()))
                continue
            best = same[overlap.argmax()]
            values.append(r["scores"][best] if key == "scores" else r["class_logits"][best, ref_label])
        return torch.stack(values)

    score.__name__ = "matched_detection"
    return score
