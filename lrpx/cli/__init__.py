"""The ``lrpx`` command: ``lrpx demo``, ``lrpx explain``, ``lrpx evaluate`` (also ``python -m lrpx``).

Bad input (a missing image, an unknown name, weights that do not fit the model, an output
folder that is a file) ends with a one-line message on stderr and exit code 2; an unexpected
failure with a one-line message and exit code 1 (``LRPX_DEBUG=1`` shows the traceback).

The package: this module parses the command line; :mod:`.commands` runs the commands,
:mod:`.models` loads torchvision classifiers and their weights, :mod:`.images` reads and
names image files, :mod:`.reports` writes what ``evaluate`` reports, :mod:`.common` holds
the checks they share.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from .. import datasets as ds
from . import commands
from .common import Parser, UsageError, first_line, positive

__all__ = ["main", "build_parser", "UsageError"]

DEFAULT_OUT = {"demo": "lrpx-demo", "explain": "lrpx-explain", "evaluate": "lrpx-evaluate"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrpx`` command line; returns the exit code (0 fine, 2 bad input, 1 failure)."""
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args) or 0
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0
    except UsageError as error:
        return _fail(f"lrpx: error: {error}", 2)
    except KeyboardInterrupt:
        return _fail("lrpx: interrupted", 130)
    except Exception as error:
        if os.environ.get("LRPX_DEBUG"):
            raise
        return _fail(f"lrpx: internal error: {type(error).__name__}: {first_line(error)} "
                     "(set LRPX_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lrpx`` and its three commands."""
    parser = Parser(prog="lrpx", description="Layer-wise Relevance Propagation: explain classifiers and "
                     "evaluate explanations.")
    parser.add_argument("--version", action="version", version=f"lrpx {__version__}")
    parser.set_defaults(handler=lambda args: parser.error("choose a command: demo, explain, evaluate or report"))
    subparsers = parser.add_subparsers(title="commands", metavar="{demo,explain,evaluate,report}")
    _add_demo(subparsers)
    _add_explain(subparsers)
    _add_evaluate(subparsers)
    _add_report(subparsers)
    from .concepts import add_concepts

    add_concepts(subparsers)
    from .text import add_text

    add_text(subparsers)
    return parser


def _add_demo(subparsers) -> None:
    from ..demo import DEMO_METHODS

    p = subparsers.add_parser("demo", help="offline demo on built-in data with ground truth",
                            description="Train (or load from the cache) two small CNNs on the built-in shapes "
                            "task, explain test images with LRP presets and gradient baselines, score them by "
                            "pixel flipping and against the object masks, and write figures and tables.")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT["demo"]), metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--images", type=positive, default=24, metavar="N",
                   help="test images per model (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=list(ds.MODELS), metavar="NAME",
                   help=f"models among {', '.join(ds.MODELS)} (default: all)")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), metavar="NAME",
                   help=f"LRP presets and baselines (default: {' '.join(DEMO_METHODS)})")
    p.add_argument("--fills", nargs="+", default=["inpaint", "random"], metavar="NAME",
                   help="pixel-flipping fills (default: inpaint random)")
    p.add_argument("--patch-size", type=positive, default=4, metavar="P",
                   help="side of the flipped regions (default: 4)")
    p.add_argument("--steps", type=positive, default=None, metavar="T",
                   help="pixel-flipping steps (default: all regions)")
    p.add_argument("--schedule", default="quadratic", metavar="NAME",
                   help="linear, quadratic or log (default: %(default)s)")
    p.add_argument("--show", type=positive, default=4, metavar="N",
                   help="images per model in the heatmap grid (default: 4)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random order, fill and baseline")
    p.add_argument("--epochs", type=positive, default=ds.TrainConfig.epochs, metavar="N",
                   help="training epochs when no cached model matches (default: %(default)s)")
    p.add_argument("--train-size", type=positive, default=ds.TrainConfig.train_size, metavar="N",
                   help="training images when no cached model matches (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train even if cached weights exist")
    p.add_argument("--threads", type=positive, default=1, metavar="N",
                   help="CPU threads for training and evaluation (default: 1; more rarely helps these small models)")
    _add_device(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(handler=commands.run_demo)


def _add_inputs(p: argparse.ArgumentParser, command: str) -> None:
    if command == "evaluate":
        p.add_argument("images", nargs="*", type=Path, metavar="IMAGE",
                       help="image files (anything Pillow reads), or --data")
    else:
        p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (anything Pillow reads)")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="a torchvision classification model, e.g. vgg16, or a built-in model trained on the "
                   "shapes data: shapes_vgg, shapes_resnet")
    p.add_argument("--weights", default="DEFAULT", metavar="DEFAULT|PATH",
                   help="DEFAULT: torchvision's weights (downloaded once, then cached by torch); PATH: a "
                   "local state-dict file (default: %(default)s)")
    p.add_argument("--target", type=int, default=None, metavar="K",
                   help="class to explain for every image (default: the top class of each)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT[command]), metavar="DIR",
                   help="output folder (default: %(default)s)")
    _add_device(p)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")


def _add_explain(subparsers) -> None:
    p = subparsers.add_parser("explain", help="heatmaps of images for a torchvision model",
                            description="Explain the prediction of a torchvision classifier for each image: "
                            "writes a heatmap and an overlay PNG per image and prints the top classes.")
    _add_inputs(p, "explain")
    p.add_argument("--composite", required=True, metavar="NAME",
                   help="an LRP preset (e.g. epsilon_gamma_box, epsilon_plus_flat) or a baseline (gradient, "
                   "gradient_x_input)")
    p.add_argument("--percentile", type=float, default=99.5, metavar="Q",
                   help="clip |relevance| above it (default: 99.5)")
    p.add_argument("--gamma", type=float, default=1.0, metavar="G",
                   help="exponent on the heatmap's magnitude (default: 1)")
    p.add_argument("--top", type=positive, default=5, metavar="N", help="classes to print per image (default: 5)")
    p.add_argument("--task", choices=("classification", "segmentation", "detection"), default="classification",
                   help="classification (default), segmentation or detection: --model is then a torchvision "
                   "segmentation model (fcn_resnet50, deeplabv3_resnet50, lraspp_mobilenet_v3_large, ...) or "
                   "detection model (fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn, ssd300_vgg16, ...)")
    p.add_argument("--detection", type=int, default=None, metavar="N",
                   help="detection: which detection of each image to explain, by rank of score (default: 0, the "
                   "top one); its class logit is explained")
    p.add_argument("--min-size", type=positive, default=None, metavar="S",
                   help="detection: resize the shorter image side to S pixels (default: the model's own, e.g. 800)")
    p.add_argument("--class", dest="class_index", type=int, default=None, metavar="K",
                   help="segmentation: the class whose logits over the predicted map are explained (default: the "
                   "class, other than class 0, that covers most of the prediction); detection: explain this "
                   "class's logit for the detection's proposal (default: its own class)")
    p.set_defaults(handler=commands.run_explain)


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="pixel-flipping evaluation of explanations",
                            description="Explain each image and score the explanation by pixel flipping: "
                            "writes curves, regions per step and AUC/AOPC/SRG per image and method.")
    _add_inputs(p, "evaluate")
    p.add_argument("--composite", required=True, nargs="+", metavar="NAME",
                   help="one or more LRP presets or baselines (gradient, gradient_x_input) to compare")
    p.add_argument("--fill", nargs="+", default=["random"], metavar="NAME",
                   help="fills of removed regions, e.g. random inpaint road (default: random)")
    p.add_argument("--order", nargs="+", default=["morf", "lrf", "random"], metavar="NAME",
                   help="removal orders (default: morf lrf random)")
    p.add_argument("--patch-size", type=positive, default=16, metavar="P",
                   help="side of the regions in pixels (default: 16)")
    p.add_argument("--steps", type=positive, default=None, metavar="T", help="number of steps (default: by schedule)")
    p.add_argument("--schedule", default="quadratic", metavar="NAME",
                   help="linear, quadratic or log (default: %(default)s)")
    p.add_argument("--score", default="logit", metavar="NAME", help="logit or softmax (default: %(default)s)")
    p.add_argument("--batch-size", type=positive, default=32, metavar="N", help="inputs per model call (default: 32)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random order and fills (default: 0)")
    d = p.add_argument_group("data sets", "Evaluate a whole data set instead of IMAGE...: streamed, split over the "
                             "processes of `torchrun --nproc-per-node N -m lrpx evaluate --data ...`, resumable.")
    d.add_argument("--data", type=Path, default=None, metavar="DIR|LIST.csv",
                   help="an image folder (class sub-folders give labels; a flat folder has none and the target "
                   "is the top class) or a CSV of path[,label] rows")
    d.add_argument("--metrics", nargs="+", default=["pixel_flipping"], metavar="NAME",
                   help="pixel_flipping, insertion, deletion, faithfulness_correlation, randomization, sparseness, "
                   "localisation (default: pixel_flipping)")
    d.add_argument("--masks", type=Path, default=None, metavar="DIR",
                   help="object masks at the images' relative paths, for localisation")
    d.add_argument("--limit", type=positive, default=None, metavar="N", help="the first N images only")
    d.add_argument("--workers", type=int, default=0, metavar="K", help="DataLoader processes decoding images "
                   "(default: 0, in the main process)")
    d.add_argument("--images-per-batch", type=positive, default=16, metavar="N",
                   help="images explained together (default: 16)")
    d.add_argument("--save-relevance", action="store_true",
                   help="also store the relevance maps (float16, safetensors) under OUT/relevance")
    d.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=commands.run_evaluate)


def _add_report(subparsers) -> None:
    p = subparsers.add_parser("report", help="summary of an `lrpx evaluate --data` run",
                              description="Rebuild summary.json, summary.md, failures.csv and the figures of an "
                              "`lrpx evaluate --data` run from whatever result parts exist (also of a run that is "
                              "going on or was stopped).")
    p.add_argument("out", type=Path, metavar="OUT", help="the run's output folder")
    p.set_defaults(handler=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    from .dataset import run_report

    return run_report(args)
