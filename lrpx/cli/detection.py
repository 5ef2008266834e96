"""``lrpx explain --task detection``: heatmaps of one detection of a torchvision detection model
(the class logit of that detection, see :func:`lrpx.targets.detection`), with its box drawn on
the overlay and the boxes of up to 10 other detections with a score of at least 0.5 in grey."""
from __future__ import annotations

import argparse
import inspect

import torch
from torch import Tensor, nn

from .common import UsageError, check_choice, check_out, device, first_line, out_dir
from .images import check_readable, output_names

__all__ = ["run_explain_detection", "detection_models", "load_detector", "draw_boxes"]

#: colours of the explained detection's box and of the others
_CHOSEN, _OTHER = (1.0, 0.85, 0.0), (0.55, 0.55, 0.55)
#: the other detections outlined: at most this many, with at least this score
_OTHERS, _OTHERS_SCORE = 10, 0.5


def detection_models() -> list[str]:
    """Names of torchvision's detection models."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models.detection)


def load_detector(name: str, weights: str, min_size: int | None = None) -> tuple[nn.Module, tuple[str, ...]]:
    """A torchvision detection model in eval mode with ``weights`` ("DEFAULT" or a state-dict path;
    the number of classes of a Faster / Mask R-CNN box head is read from the file) and its class
    names. ``min_size`` sets the length the transform resizes the shorter image side to."""
    import torchvision

    from .models import load_task_model

    def build(state):
        kwargs: dict = {"weights": None, "weights_backbone": None}
        rows = state.get("roi_heads.box_predictor.cls_score.weight")
        if rows is not None:
            kwargs["num_classes"] = rows.shape[0]
        model = torchvision.models.get_model(name, **kwargs)
        # BatchNorm counters are absent from files saved with frozen BatchNorms: not needed in eval
        own = model.state_dict()
        return model, {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state}, **state}

    model, default = load_task_model("detection model", name, weights, detection_models(), build)
    if min_size is not None:
        model.transform.min_size = (min_size,)
        model.transform.max_size = max(int(model.transform.max_size * min_size / 800), min_size)
        if model.transform.fixed_size is not None:
            model.transform.fixed_size = (min_size, min_size)
    return model.eval(), tuple(default.meta.get("categories") or ())


def draw_boxes(images: Tensor, boxes: Tensor, colour: tuple[float, float, float], width: int = 1) -> Tensor:
    """``(1, 3, H, W)`` image with the outlines of ``(N, 4)`` boxes (x1, y1, x2, y2, pixels) in ``colour``."""
    out = images.clone()
    h, w = out.shape[-2:]
    paint = torch.tensor(colour, dtype=out.dtype).view(3, 1, 1)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        out[0, :, y1:y2 + 1, x1:x1 + width] = paint
        out[0, :, y1:y2 + 1, max(x2 - width + 1, 0):x2 + 1] = paint
        out[0, :, y1:y1 + width, x1:x2 + 1] = paint
        out[0, :, max(y2 - width + 1, 0):y2 + 1, x1:x2 + 1] = paint
    return out


def run_explain_detection(args: argparse.Namespace) -> int:
    from .. import composites, image
    from ..convert import convert
    from ..explain import explain
    from ..methods import BASELINES, method_names
    from ..targets import detection

    if args.target is not None:
        raise UsageError("--target is for classifiers; with --task detection choose the detection with --detection N")
    check_choice("composite", [args.composite], method_names())
    if args.composite in BASELINES:
        raise UsageError(f"--task detection explains with an LRP preset ({', '.join(composites.presets())}); the "
                         f"baseline '{args.composite}' has no class logit of a detection to differentiate")
    index = 0 if args.detection is None else args.detection
    if index < 0:
        raise UsageError(f"--detection must be >= 0 (0 is the top detection), got {index}")
    check_readable(args.images)
    where = device(args.device)
    check_out(args.out)
    model, categories = load_detector(args.model, args.weights, args.min_size)
    mean = torch.tensor(model.transform.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(model.transform.image_std).view(1, -1, 1, 1)
    preset = composites.presets()[args.composite]
    kwargs = {"low": ((0 - mean) / std).to(where), "high": ((1 - mean) / std).to(where)} \
        if "low" in inspect.signature(preset).parameters else {}
    try:
        lrp_model = convert(model, preset(**kwargs)).to(where)
    except Exception as error:  # unsupported layers or untraceable code in a custom detector
        raise UsageError(f"model '{args.model}' cannot be converted for LRP: {first_line(error)}") from None
    import torchvision.transforms.functional as TF

    from .images import read_rgb

    out = None
    for path, name in zip(args.images, output_names(args.images)):
        x = TF.to_tensor(read_rgb(path)).unsqueeze(0).to(where)  # pixels in [0, 1]: the model normalises
        with torch.no_grad():
            found = lrp_model(x)[0]
        count = len(found["boxes"])
        if index >= count:
            what = "no detections" if count == 0 else f"{count} detection{'s' if count > 1 else ''} (0..{count - 1})"
            raise UsageError(f"--detection {index}: '{args.model}' found {what} in {path}")
        classes = found["class_logits"].shape[1]
        if args.class_index is not None and not 0 <= args.class_index < classes:
            raise UsageError(f"--class {args.class_index} is out of range: '{args.model}' has {classes} classes "
                             f"(0..{classes - 1})")
        result = explain(lrp_model, x, detection(index, args.class_index))
        relevance = result.relevance
        heat = image.heatmap(relevance, percentile=args.percentile, gamma=args.gamma)
        over = image.overlay(x, relevance, percentile=args.percentile, gamma=args.gamma)
        keep = (found["scores"] >= _OTHERS_SCORE).nonzero().flatten()
        keep = keep[keep != index][:_OTHERS]
        others = found["boxes"][keep].cpu()
        over = draw_boxes(draw_boxes(over, others, _OTHER), found["boxes"][index:index + 1].cpu(), _CHOSEN, 2)
        out = out or out_dir(args.out)
        heat_path = image.save_png(heat[0], out / f"{name}_heatmap.png")
        over_path = image.save_png(over[0], out / f"{name}_overlay.png")
        label = int(found["labels"][index])
        explained = label if args.class_index is None else args.class_index
        known = explained < len(categories) and classes == len(categories)
        text = f"{categories[explained]} (class {explained})" if known else f"class {explained}"
        box = ", ".join(f"{v:.1f}" for v in found["boxes"][index].tolist())
        print(f"{path}: explained detection {index} of {count}: {text}, score "
              f"{float(found['scores'][index]):.3f}, box ({box}); logit {float(result.score[0]):.3f}")
        print(f"  heatmap: {heat_path}  overlay: {over_path}")
    return 0
