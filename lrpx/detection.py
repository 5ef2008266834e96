r"""torchvision's detection models in converted form.

The forward code of a detection model routes feature maps through its parts and *selects*
detections (box decoding, score thresholds, non-maximum suppression, top-k). That code is not
traced: ``convert`` gives these modules (exact torchvision classes, listed in :data:`ROUTING`)
subclasses that compute the same forward, with three changes:

* the image transform (``GeneralizedRCNNTransform``) normalises with an element-wise layer
  whose relevance passes each pixel unchanged (a per-pixel affine map of one input) and
  resizes through an :class:`lrpx.layers.Interpolate` child (``Norm`` rule); the zero padding
  that batches images routes relevance back by its gradient;
* the feature pyramid (``FeaturePyramidNetwork``) upsamples through an ``Interpolate`` child
  and adds through an :class:`lrpx.layers.Add` child;
* the parts that select detections (``RoIHeads``, ``RetinaNet``, ``FCOS``, ``SSD``) return,
  next to ``boxes``, ``labels`` and ``scores``, the key ``"class_logits"``: per detection the
  row of class logits (before softmax or sigmoid) of the proposal or anchor it came from,
  connected to the input through the LRP layers. ``class_logits[i, labels[i]]`` is the logit
  of detection ``i``; :func:`lrpx.targets.detection` picks it. Detections themselves (boxes,
  labels, scores) are those of the original model.

Which proposal or anchor a detection came from is found by differentiating the score and
box of each detection, as the original post-processing computes them, with respect to the
head outputs: they depend on one row only.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from .core import lrp_apply
from .layers import Add, Interpolate
from .ops import ElementwiseOps
from .rules import Pass

__all__ = ["adopt", "ROUTING", "UNTRACED", "detection_logits"]

_PASS = Pass()

try:
    from torchvision.models.detection import fcos, retinanet, ssd, ssdlite
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork
except ImportError:  # pragma: no cover - torchvision is a dependency
    GeneralizedRCNN = None


def _normalise(mean: Tensor, std: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda image: (image - mean[:, None, None]) / std[:, None, None]


#: the arguments of ``F.interpolate`` after the input, in order
_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


class _Resize(TorchFunctionMode):
    """Sends the ``F.interpolate`` calls of torchvision's resize code to an Interpolate layer."""

    def __init__(self, layer: Interpolate) -> None:
        super().__init__()
        self.layer = layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.interpolate:
            return func(*args, **kwargs)
        bound = dict(zip(_INTERPOLATE, args[1:]), **kwargs)
        layer = self.layer
        flags = (bound.get("mode", "nearest"), bound.get("align_corners"), bound.get("recompute_scale_factor"),
                 bool(bound.get("antialias", False)))
        if flags != (layer.mode, layer.align_corners, layer.recompute_scale_factor, layer.antialias):
            raise RuntimeError(f"the image transform resizes with {flags}, its LRP layer with "
                               f"{(layer.mode, layer.align_corners, layer.recompute_scale_factor, layer.antialias)}")
        return layer(args[0], size=bound.get("size"), scale_factor=bound.get("scale_factor"))


class LRPTransform(GeneralizedRCNNTransform if GeneralizedRCNN is not None else nn.Module):
    """The detection models' image transform: normalisation passes relevance per pixel, the
    resize is the child :class:`Interpolate` ``resize_layer`` (bilinear, ``Norm`` rule)."""

    def _adopt(self) -> None:
        recompute = None if self.fixed_size is not None else True
        self.resize_layer = Interpolate("bilinear", False, recompute).train(self.training)

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"the image transform needs floating point images, got dtype {image.dtype}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return lrp_apply(ElementwiseOps(_normalise(mean, std)), _PASS, image)

    def resize(self, image: Tensor, target=None):
        with _Resize(self.resize_layer):
            return super().resize(image, target)


class LRPFeaturePyramid(FeaturePyramidNetwork if GeneralizedRCNN is not None else nn.Module):
    """A feature pyramid whose top-down path upsamples through the child ``upsample`` (nearest,
    ``Norm`` rule) and adds the lateral maps through the child ``add`` (``Norm`` rule)."""

    def _adopt(self) -> None:
        self.upsample = Interpolate("nearest").train(self.training)
        self.add = Add().train(self.training)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names, maps = list(x.keys()), list(x.values())
        inner = self.get_result_from_inner_blocks(maps[-1], -1)
        results = [self.get_result_from_layer_blocks(inner, -1)]
        for level in range(len(maps) - 2, -1, -1):
            lateral = self.get_result_from_inner_blocks(maps[level], level)
            inner = self.add(lateral, self.upsample(inner, size=lateral.shape[-2:]))
            results.insert(0, self.get_result_from_layer_blocks(inner, level))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, maps, names)
        return OrderedDict(zip(names, results))


def _source_rows(run: Callable[[Any], list[tuple[Tensor, Tensor]]], head: dict[str, Any],
                 rows: Callable[[dict[str, Any], int], Tensor], score_keys: tuple[str, ...] = ()
                 ) -> tuple[Any, list[Tensor]]:
    """Run the post-processing ``run`` on detached copies of the head outputs ``head`` and find,
    per image, the row (proposal or anchor) each detection came from.

    ``run(copies)`` returns what the original post-processing returns and the ``(scores,
    boxes)`` of each image; ``rows(tensors, image)`` lays a structure like ``head`` (or the part
    of it named by ``score_keys``), with a leading dimension of detections, out as one
    ``(detections, rows, features)`` tensor of an image. Returns the post-processing's result
    and, per image, the row index of each detection.

    The row is where the derivative of the detection's score plus box sum is largest. With
    ``score_keys`` (the head outputs the scores are computed from), the derivative of the score
    with respect to those alone is tried first, a much smaller Jacobian; detections whose
    score does not change with them (saturated) take the full one.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also under inference mode: on plain copies
        copies = tree_map(lambda t: _plain(t).requires_grad_(True), head)
        result, per_image = run(copies)
        scored = {k: copies[k] for k in score_keys}
        found = []
        for image, (scores, boxes) in enumerate(per_image):
            index = torch.zeros(len(scores), dtype=torch.long)
            rest = torch.arange(len(scores))
            if scored:
                first, known = _argmax_rows(scores, scored, rows, image, strict=False)
                index[known], rest = first[known], rest[~known]
            if len(rest):
                total = (scores + boxes.sum(-1))[rest.to(scores.device)]
                index[rest] = _argmax_rows(total, copies, rows, image, strict=True, numbers=rest.tolist())[0]
            found.append(index)
    return result, found


def _argmax_rows(total: Tensor, tree: dict[str, Any], rows: Callable[[dict[str, Any], int], Tensor], image: int, *,
                 strict: bool, numbers: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """Per entry of ``total``, the row of ``tree`` (laid out by ``rows``) where ``|d total /
    d tree|`` summed over the features is largest, and whether that derivative is finite and not
    zero everywhere; ``strict`` raises where it is not (``numbers``: the detections' numbers)."""
    leaves = [t for v in tree.values() for t in (v if isinstance(v, list) else [v])]
    # the Jacobian, a few detections per backward pass
    chunk = max(1, _JACOBIAN_ENTRIES // max(1, sum(t.numel() for t in leaves)))
    index, known = [], []
    for start in range(0, len(total), chunk):
        picks = torch.arange(start, min(start + chunk, len(total)), device=total.device)
        it = iter(_jacobian_rows(total, picks, leaves))
        grads = {k: [next(it) for _ in v] if isinstance(v, list) else next(it) for k, v in tree.items()}
        weight = rows(grads, image).abs().sum(-1)  # (detections, rows)
        finite, moves = torch.isfinite(weight).all(-1), (weight > 0).any(-1)
        if strict and not bool((finite & moves).all()):
            bad = int((~(finite & moves)).nonzero()[0])
            i = start + bad if numbers is None else numbers[start + bad]
            if not bool(finite[bad]):
                raise FloatingPointError(f"the head outputs behind detection {i} of image {image} are not finite")
            raise RuntimeError(f"cannot tell which proposal or anchor detection {i} of image {image} came from: its "
                               "score and box do not change with any (saturated)")
        index.append(weight.argmax(-1).cpu())
        known.append((finite & moves).cpu())
    if not index:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    return torch.cat(index), torch.cat(known)


#: entries of the head outputs' Jacobian computed per backward pass (memory: 8 bytes each)
_JACOBIAN_ENTRIES = 1 << 23


def _jacobian_rows(total: Tensor, picks: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    """``d total[picks] / d leaf`` for each leaf, ``(len(picks), *leaf.shape)`` (zeros where unused):
    one batched backward pass, or one pass per pick where autograd cannot batch."""
    grad_outputs = torch.zeros(len(picks), len(total), dtype=total.dtype, device=total.device)
    grad_outputs[torch.arange(len(picks)), picks] = 1
    try:
        grads = torch.autograd.grad(total, leaves, grad_outputs, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
    except RuntimeError:  # an operation without a batching rule
        each = [torch.autograd.grad(total, leaves, g, retain_graph=True, allow_unused=True) for g in grad_outputs]
        grads = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*each))
    return [torch.zeros((len(picks),) + t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(grads, leaves)]


def _plain(t: Any) -> Any:
    """A tensor detached, and copied out of inference mode if it was made there (the
    post-processing runs on copies with autograd); other values as they are."""
    if not isinstance(t, Tensor):
        return t
    return t.detach().clone() if t.is_inference() else t.detach()


def _per_image(tree: dict[str, Any], image: int) -> Tensor:
    """Single-stage head outputs with a leading dimension of detections (``(D, B, rows,
    features)`` tensors, or lists of them per level) as one ``(D, rows, features)`` tensor of
    ``image``."""
    parts = []
    for value in tree.values():
        levels = value if isinstance(value, list) else [value]
        parts.append(torch.cat([t[:, image] for t in levels], dim=1))
    return torch.cat(parts, dim=-1)


def _class_rows(head_logits: Tensor | list[Tensor], image: int) -> Tensor:
    levels = head_logits if isinstance(head_logits, list) else [head_logits]
    return torch.cat([t[image] for t in levels], dim=0)


class _SingleStage:
    """Post-processing of RetinaNet, FCOS and SSD with the ``class_logits`` of each detection."""

    def postprocess_detections(self, head_outputs, anchors, image_sizes):
        def run(copies):
            plain = tree_map(_plain, anchors)
            result = super(_SingleStage, self).postprocess_detections(copies, plain, image_sizes)
            return result, [(r["scores"], r["boxes"]) for r in result]

        result, found = _source_rows(run, dict(head_outputs), _per_image, ("cls_logits",))
        for image, (r, index) in enumerate(zip(result, found)):
            for key in ("boxes", "scores"):
                r[key] = r[key].detach()
            r["class_logits"] = _class_rows(head_outputs["cls_logits"], image)[index.to(r["labels"].device)]
        return result


class LRPRoIHeads(RoIHeads if GeneralizedRCNN is not None else nn.Module):
    """The box (and mask) heads of Faster / Mask R-CNN; each result also holds
    ``class_logits``, the class logits of the proposal each detection came from."""

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        counts = [len(p) for p in proposals]
        starts = [sum(counts[:i]) for i in range(len(counts))]

        def run(copies):
            boxes, scores, labels = super(LRPRoIHeads, self).postprocess_detections(
                copies["class_logits"], copies["box_regression"], tree_map(_plain, proposals), image_shapes)
            return (boxes, scores, labels), list(zip(scores, boxes))

        def rows(tree, image):
            matrix = torch.cat(list(tree.values()), dim=-1)
            return matrix[:, starts[image]:starts[image] + counts[image]]

        (boxes, scores, labels), found = _source_rows(
            run, {"class_logits": class_logits, "box_regression": box_regression}, rows, ("class_logits",))
        out_scores = []
        for image, index in enumerate(found):
            score = scores[image].detach()
            score.lrpx_class_logits = class_logits[starts[image] + index.to(class_logits.device)]
            out_scores.append(score)
        return [b.detach() for b in boxes], out_scores, labels

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        for r in result:
            logits = r["scores"].__dict__.pop("lrpx_class_logits", None)
            if logits is not None:
                r["class_logits"] = logits
        return result, losses


#: ``{torchvision class: the class convert gives its instances}``
ROUTING: dict[type[nn.Module], type[nn.Module]] = {}
#: classes whose forward code is not traced (it routes children and selects detections)
UNTRACED: tuple[type[nn.Module], ...] = ()

if GeneralizedRCNN is not None:
    def _single_stage(base: type[nn.Module]) -> type[nn.Module]:
        return type(f"LRP{base.__name__}", (_SingleStage, base), {
            "__doc__": f"torchvision's {base.__name__}; each result also holds ``class_logits``, the class "
                       "logits of the anchor each detection came from.", "__module__": __name__})

    LRPRetinaNet = _single_stage(retinanet.RetinaNet)
    LRPFCOS = _single_stage(fcos.FCOS)
    LRPSSD = _single_stage(ssd.SSD)
    ROUTING.update({GeneralizedRCNNTransform: LRPTransform, FeaturePyramidNetwork: LRPFeaturePyramid,
                    RoIHeads: LRPRoIHeads, retinanet.RetinaNet: LRPRetinaNet, fcos.FCOS: LRPFCOS, ssd.SSD: LRPSSD})
    UNTRACED = (GeneralizedRCNN, GeneralizedRCNNTransform, FeaturePyramidNetwork, RegionProposalNetwork, RPNHead,
                RoIHeads, FastRCNNPredictor, retinanet.RetinaNet, retinanet.RetinaNetHead,
                retinanet.RetinaNetClassificationHead, retinanet.RetinaNetRegressionHead, fcos.FCOS, fcos.FCOSHead,
                fcos.FCOSClassificationHead, fcos.FCOSRegressionHead, ssd.SSD, ssd.SSDHead, ssd.SSDScoringHead,
                ssdlite.SSDLiteHead)


def adopt(model: nn.Module) -> nn.Module:
    """Give each module of ``model`` whose exact class is in :data:`ROUTING` its routing class
    (in place; the module keeps its parameters, buffers and children) and the children that
    class adds. Returns ``model``."""
    for module in list(model.modules()):
        cls = ROUTING.get(type(module))
        if cls is not None:
            module.__class__ = cls
            adopt_children = getattr(module, "_adopt", None)
            if adopt_children is not None:
                adopt_children()
    return model


def detection_logits(output: Any) -> list[Tensor]:
    """The ``class_logits`` of each image of a converted detection model's output (a list of
    dicts), or a ``TypeError`` that says what the output is instead."""
    if not isinstance(output, (list, tuple)) or not all(isinstance(r, dict) for r in output):
        raise TypeError(f"a detection target needs the list of dicts a detection model returns, got "
                        f"{type(output).__name__}")
    missing = [i for i, r in enumerate(output) if "class_logits" not in r]
    if missing:
        raise TypeError("the detections hold no 'class_logits': explain a model returned by lrpx.convert "
                        f"(keys of image {missing[0]}: {sorted(output[missing[0]])})")
    return [r["class_logits"] for r in output]
