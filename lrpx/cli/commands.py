"""What ``lrpx demo``, ``lrpx explain`` and ``lrpx evaluate`` do once their arguments are parsed."""
from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import datasets as ds
from .common import UsageError, check_choice, check_out, device, first_line, out_dir
from .images import check_readable, load_images, output_names
from .models import Preprocessing, classification_models, load_classifier

__all__ = ["run_demo", "run_explain", "run_evaluate", "attributors"]


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoOptions, run_demo as demo
    from ..eval import FILLS, SCHEDULES
    from ..methods import method_names

    check_choice("model", args.models, list(ds.MODELS))
    check_choice("method", args.methods, method_names())
    check_choice("fill", args.fills, list(FILLS))
    check_choice("schedule", [args.schedule], list(SCHEDULES))
    _check_demo_steps(args)
    where = device(args.device)
    out = out_dir(args.out)
    options = DemoOptions(
        out=out, images=args.images, models=tuple(dict.fromkeys(args.models)),
        methods=tuple(dict.fromkeys(args.methods)), fills=tuple(dict.fromkeys(args.fills)),
        patch_size=args.patch_size, steps=args.steps, schedule=args.schedule, show=args.show, seed=args.seed,
        device=str(where), train=ds.TrainConfig(epochs=args.epochs, train_size=args.train_size),
        progress=not args.no_progress, retrain=args.retrain, threads=args.threads)
    start = time.perf_counter()
    try:
        demo(options)
    except ValueError as error:  # settings the evaluation rejects
        raise UsageError(f"{first_line(error)} (files in {out} may be incomplete)") from None
    except OSError as error:
        raise UsageError(f"writing to {out} failed: {error.strerror or error} (files there may be incomplete)"
                         ) from None
    print(f"done in {time.perf_counter() - start:.0f} s; open {out / 'summary.md'} and {out / 'heatmaps.png'}")
    return 0


def _check_demo_steps(args: argparse.Namespace) -> None:
    from ..eval.order import schedule_counts

    size = 64  # side of the built-in images
    if args.patch_size > size:
        raise UsageError(f"--patch-size {args.patch_size} is larger than the {size}x{size} images")
    regions = math.ceil(size / args.patch_size) ** 2
    try:
        schedule_counts(args.schedule, regions, args.steps)
    except ValueError as error:
        raise UsageError(f"--steps {args.steps}: {first_line(error)}") from None


def _prepare(args: argparse.Namespace, methods: Sequence[str]):
    """Check every input before anything is written; returns model, preprocessing, inputs, logits, targets."""
    from ..methods import method_names

    check_choice("composite", methods, method_names())
    check_choice("model", [args.model], classification_models())
    check_readable(args.images)
    where = device(args.device)
    check_out(args.out)
    model, prep = load_classifier(args.model, args.weights)
    x = load_images(args.images, prep.transform)
    model, x = model.to(where), x.to(where)
    with torch.no_grad():
        logits = model(x)
    classes = logits.shape[1]
    if len(prep.categories) != classes:  # a fine-tuned head
        prep = replace(prep, categories=tuple(f"class {k}" for k in range(classes)))
    if args.target is not None and not 0 <= args.target < classes:
        raise UsageError(f"--target {args.target} is out of range: '{args.model}' has {classes} classes "
                         f"(0..{classes - 1})")
    target = logits.argmax(1) if args.target is None else torch.full_like(logits[:, 0], args.target, dtype=torch.long)
    return model, prep, x, logits, target


def attributors(model: nn.Module, methods: Sequence[str], prep: Preprocessing, where: torch.device, name: str):
    from ..convert import UnsupportedModuleError
    from ..graph import TraceError
    from ..methods import attributor

    low, high = (b.to(where) for b in prep.bounds())
    try:
        return {m: attributor(model, m, low=low, high=high) for m in methods}
    except UnsupportedModuleError as error:
        types = sorted({cls.__name__ for _, cls in error.modules})
        reason = (f"no LRP rule for {len(error.modules)} layers of type {', '.join(types)} "
                  f"(e.g. '{error.modules[0][0]}')")
    except TraceError as error:
        reason = first_line(error)
    raise UsageError(f"model '{name}' cannot be converted for LRP: {reason}; use a baseline (gradient, "
                     "gradient_x_input) or a model of plain layers (VGG, ResNet, DenseNet, ...)")


def run_explain(args: argparse.Namespace) -> int:
    from .. import image
    from ..methods import explain_batches

    if not 0 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {args.percentile}")
    if not args.gamma > 0:
        raise UsageError(f"--gamma must be positive, got {args.gamma}")
    if args.task == "segmentation":
        from .segmentation import run_explain_segmentation

        return run_explain_segmentation(args)
    if args.task == "detection":
        from .detection import run_explain_detection

        return run_explain_detection(args)
    if args.detection is not None or args.min_size is not None:
        raise UsageError("--detection and --min-size go with --task detection")
    if args.class_index is not None:
        raise UsageError("--class goes with --task segmentation; for a classifier use --target K")
    model, prep, x, logits, target = _prepare(args, [args.composite])
    explainer = attributors(model, [args.composite], prep, x.device, args.model)[args.composite]
    relevance = explain_batches(explainer, x, target)
    heat = image.heatmap(relevance, percentile=args.percentile, gamma=args.gamma)
    over = image.overlay(prep.to_pixels(x), relevance, percentile=args.percentile, gamma=args.gamma)
    out = out_dir(args.out)
    written: list[Path] = []
    try:
        for i, name in enumerate(output_names(args.images)):
            written.append(image.save_png(heat[i], out / f"{name}_heatmap.png"))
            written.append(image.save_png(over[i], out / f"{name}_overlay.png"))
            _print_top(args.images[i], logits[i], int(target[i]), prep.categories, args.top)
            print(f"  heatmap: {written[-2]}  overlay: {written[-1]}")
    except OSError as error:
        raise UsageError(f"writing to {out} failed after {len(written)} files: {error.strerror or error}") from None
    return 0


def _print_top(path: Path, logits: Tensor, target: int, categories: Sequence[str], top: int) -> None:
    indices = logits.topk(min(top, logits.numel())).indices  # ranked by logit, as the target
    probs = logits.float().softmax(0)[indices]
    ranked = ", ".join(f"{int(k)} {categories[int(k)]} ({float(p):.3f})" for p, k in zip(probs, indices))
    print(f"{path}: {ranked}; explained: {target} {categories[target]}")


def run_evaluate(args: argparse.Namespace) -> int:
    if args.data is not None:
        from .dataset import run_evaluate_data

        return run_evaluate_data(args)
    if not args.images:
        raise UsageError("give image files to evaluate, or --data DIR|LIST.csv for a data set")
    from ..eval import FILLS, ORDERS, SCHEDULES, SCORES
    from ..methods import explain_batches
    from .reports import evaluation_report, write_evaluation

    methods = list(dict.fromkeys(args.composite))
    check_choice("fill", args.fill, list(FILLS))
    check_choice("order", args.order, list(ORDERS))
    check_choice("schedule", [args.schedule], list(SCHEDULES))
    check_choice("score", [args.score], list(SCORES))
    model, prep, x, _, target = _prepare(args, methods)
    explainers = attributors(model, methods, prep, x.device, args.model)
    results = {}
    for method, explainer in explainers.items():
        relevance = explain_batches(explainer, x, target)
        for fill in dict.fromkeys(args.fill):
            results[method, fill] = _flip(args, model, x, relevance, target, fill, prep)
    out = out_dir(args.out)
    report = evaluation_report(args, results, target, prep.categories)
    try:
        write_evaluation(out, results, report)
    except OSError as error:
        raise UsageError(f"writing to {out} failed: {error.strerror or error} (files there may be incomplete)"
                         ) from None
    return 0


def _flip(args, model, x, relevance, target, fill, prep):
    from ..eval import pixel_flipping

    generator = torch.Generator(x.device).manual_seed(args.seed)
    try:
        return pixel_flipping(model, x, relevance, target, patch_size=args.patch_size, steps=args.steps,
                              schedule=args.schedule, order=tuple(dict.fromkeys(args.order)), fill=fill,
                              score=args.score, normalizer=(prep.mean, prep.std), pixel_range=(0.0, 1.0),
                              batch_size=args.batch_size, generator=generator, progress=True)
    except ValueError as error:
        raise UsageError(first_line(error)) from None
