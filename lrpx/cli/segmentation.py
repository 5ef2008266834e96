"""``lrpx explain --task segmentation``: heatmaps of one class of a segmentation model's
prediction, with the outline of the pixels predicted as that class."""
from __future__ import annotations

import argparse

import torch

from .common import UsageError, check_choice, check_out, device, out_dir
from .images import check_readable, load_images, output_names

__all__ = ["run_explain_segmentation"]


def run_explain_segmentation(args: argparse.Namespace) -> int:
    from .. import image
    from ..methods import method_names
    from ..targets import segment
    from .commands import attributors
    from .models import load_segmenter

    if args.target is not None:
        raise UsageError("--target is for classifiers; with --task segmentation choose the class with --class K")
    check_choice("composite", [args.composite], method_names())
    check_readable(args.images)
    where = device(args.device)
    check_out(args.out)
    model, prep = load_segmenter(args.model, args.weights)
    model = model.to(where)
    explainer = None
    out = None
    for path, name in zip(args.images, output_names(args.images)):
        x = load_images([path], prep.transform).to(where)  # one at a time: the transform keeps the aspect ratio
        with torch.no_grad():
            logits = model(x)["out"]
        classes = logits.shape[1]
        predicted = logits.argmax(1)
        chosen = _class(args.class_index, predicted, classes, args.model)
        if explainer is None:
            explainer = attributors(model, [args.composite], prep, where, args.model)[args.composite]
        relevance = explainer(x, segment(chosen))
        heat = image.heatmap(relevance, percentile=args.percentile, gamma=args.gamma)
        over = image.overlay(prep.to_pixels(x), relevance, percentile=args.percentile, gamma=args.gamma)
        over = image.mask_outline(over, (predicted == chosen).unsqueeze(1).cpu())
        out = out or out_dir(args.out)
        heat_path = image.save_png(heat[0], out / f"{name}_heatmap.png")
        over_path = image.save_png(over[0], out / f"{name}_overlay.png")
        label = prep.categories[chosen] if chosen < len(prep.categories) else f"class {chosen}"
        share = float((predicted == chosen).double().mean())
        print(f"{path}: explained class {chosen} {label} (predicted on {share:.1%} of the pixels, outlined)")
        print(f"  heatmap: {heat_path}  overlay: {over_path}")
    return 0


def _class(requested: int | None, predicted: torch.Tensor, classes: int, name: str) -> int:
    if requested is not None:
        if not 0 <= requested < classes:
            raise UsageError(f"--class {requested} is out of range: '{name}' has {classes} classes (0..{classes - 1})")
        return requested
    counts = torch.bincount(predicted.flatten(), minlength=classes)
    counts[0] = 0  # class 0 is the background of torchvision's segmentation models
    return int(counts.argmax()) if int(counts.max()) > 0 else 0
