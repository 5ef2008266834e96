"""``lrpx evaluate --data`` (a data set, streamed, sharded under ``torchrun``, resumable) and
``lrpx report`` (its summary, rebuilt from the result parts)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .common import UsageError, check_choice, check_out, device, first_line

__all__ = ["run_evaluate_data", "run_report"]


def run_evaluate_data(args: argparse.Namespace) -> int:
    from ..eval import FILLS, ORDERS, SCHEDULES, SCORES
    from ..eval.dataset import ImageFiles, MetricSettings, RunMismatch, evaluate_dataset, image_records
    from ..eval.dataset.sources import by_class_name
    from ..eval.dataset.metrics import check_metrics
    from ..eval.dataset.store import pyarrow
    from ..methods import method_names
    from .models import load_classifier

    if args.images:
        raise UsageError("give image files or --data, not both")
    if args.target is not None:
        raise UsageError("--target does not go with --data: each image's target is its label (the class folder), "
                         "or its top class where the data has no labels")
    methods = list(dict.fromkeys(args.composite))
    check_choice("composite", methods, method_names())
    for kind, names, valid in (("fill", args.fill, FILLS), ("order", args.order, ORDERS),
                               ("schedule", [args.schedule], SCHEDULES), ("score", [args.score], SCORES)):
        check_choice(kind, names, list(valid))
    try:
        metrics = check_metrics(args.metrics)
        pyarrow()
        root, records, classes = image_records(args.data, limit=args.limit)
    except (ValueError, ImportError) as error:
        raise UsageError(first_line(error)) from None
    if args.masks is not None and not args.masks.is_dir():
        raise UsageError(f"--masks {args.masks} is not a folder")
    check_out(args.out)
    where = device(args.device)
    model, prep = load_classifier(args.model, args.weights)
    records = by_class_name(records, classes, prep.categories)
    dataset = ImageFiles(root, records, prep.transform, masks=args.masks, mask_transform=_mask_transform(prep))
    settings = MetricSettings(fills=tuple(dict.fromkeys(args.fill)), orders=tuple(dict.fromkeys(args.order)),
                              patch_size=args.patch_size, steps=args.steps, schedule=args.schedule, score=args.score,
                              chunk=args.batch_size, normalizer=(prep.mean, prep.std))
    low, high = (b.to(where) for b in prep.bounds())
    run = {"model": args.model, "weights": str(args.weights), "data": str(Path(args.data).resolve()),
           "limit": args.limit, "masks": None if args.masks is None else str(args.masks.resolve())}
    try:
        evaluate_dataset(model, dataset, methods, metrics, out=args.out, settings=settings,
                         batch_size=args.images_per_batch, workers=args.workers, device=where, seed=args.seed,
                         low=low, high=high, save_relevance=args.save_relevance, overwrite=args.overwrite,
                         progress=not args.no_progress, run=run)
    except RunMismatch as error:
        raise UsageError(str(error)) from None
    except ValueError as error:  # labels outside the model's classes, settings the metrics refuse
        raise UsageError(first_line(error)) from None
    if _rank() == 0:
        _print_summary(args.out)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _mask_transform(prep):
    """The image transform's resizing and cropping, without the normalisation."""
    import torchvision.transforms as T

    nearest = T.InterpolationMode.NEAREST
    steps = getattr(prep.transform, "transforms", None)
    if steps is not None:  # a Compose: keep what moves pixels, resizing without blending
        keep = [T.Resize(t.size, interpolation=nearest) if isinstance(t, T.Resize) else t
                for t in steps if isinstance(t, (T.Resize, T.CenterCrop))]
        return T.Compose([*keep, T.PILToTensor()])
    size = getattr(prep.transform, "crop_size", None)
    resize = getattr(prep.transform, "resize_size", None)
    if size is None:
        return T.PILToTensor()
    return T.Compose([T.Resize(resize, interpolation=nearest), T.CenterCrop(size), T.PILToTensor()])


def _print_summary(out: Path) -> None:
    import json

    summary = json.loads((out / "summary.json").read_text())
    print((out / "summary.md").read_text())
    print(f"{summary['images']} images evaluated, {summary['failures']} failed (see {out / 'failures.csv'}); "
          f"wrote {out / 'summary.md'}, {out / 'summary.json'} and the figures")


def run_report(args: argparse.Namespace) -> int:
    from ..eval.dataset import write_report
    from ..eval.dataset.store import pyarrow

    out = args.out
    if not (out / "results").is_dir():
        raise UsageError(f"{out} holds no results of lrpx evaluate --data (no results/ folder)")
    try:
        pyarrow()
    except ImportError as error:
        raise UsageError(str(error)) from None
    write_report(out)
    _print_summary(out)
    return 0
