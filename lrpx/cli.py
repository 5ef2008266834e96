"""The ``lrpx`` command: ``lrpx demo``, ``lrpx explain``, ``lrpx evaluate`` (also ``python -m lrpx``).

Bad input (a missing image, an unknown name, weights that do not fit the model, an output
folder that is a file) ends with a one-line message on stderr and exit code 2; an unexpected
failure with a one-line message and exit code 1 (``LRPX_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from . import datasets as ds

__all__ = ["main", "build_parser", "UsageError"]

DEFAULT_OUT = {"demo": "lrpx-demo", "explain": "lrpx-explain", "evaluate": "lrpx-evaluate"}


class UsageError(Exception):
    """Bad input from the user: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors become :class:`UsageError` (one line, exit code 2)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


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
        return _fail(f"lrpx: internal error: {type(error).__name__}: {_first_line(error)} "
                     "(set LRPX_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lrpx`` and its three commands."""
    parser = _Parser(prog="lrpx", description="Layer-wise Relevance Propagation: explain classifiers and "
                     "evaluate explanations.")
    parser.add_argument("--version", action="version", version=f"lrpx {__version__}")
    parser.set_defaults(handler=lambda args: parser.error("choose a command: demo, explain or evaluate"))
    commands = parser.add_subparsers(title="commands", metavar="{demo,explain,evaluate}")
    _add_demo(commands)
    _add_explain(commands)
    _add_evaluate(commands)
    return parser


def _add_demo(commands) -> None:
    from .demo import DEMO_METHODS

    p = commands.add_parser("demo", help="offline demo on built-in data with ground truth",
                            description="Train (or load from the cache) two small CNNs on the built-in shapes "
                            "task, explain test images with LRP presets and gradient baselines, score them by "
                            "pixel flipping and against the object masks, and write figures and tables.")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT["demo"]), metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--images", type=_positive, default=24, metavar="N",
                   help="test images per model (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=list(ds.MODELS), metavar="NAME",
                   help=f"models among {', '.join(ds.MODELS)} (default: all)")
    p.add_argument("--methods", nargs="+", default=list(DEMO_METHODS), metavar="NAME",
                   help=f"LRP presets and baselines (default: {' '.join(DEMO_METHODS)})")
    p.add_argument("--fills", nargs="+", default=["inpaint", "random"], metavar="NAME",
                   help="pixel-flipping fills (default: inpaint random)")
    p.add_argument("--patch-size", type=_positive, default=4, metavar="P",
                   help="side of the flipped regions (default: 4)")
    p.add_argument("--steps", type=_positive, default=None, metavar="T",
                   help="pixel-flipping steps (default: all regions)")
    p.add_argument("--schedule", default="quadratic", metavar="NAME",
                   help="linear, quadratic or log (default: %(default)s)")
    p.add_argument("--show", type=_positive, default=4, metavar="N",
                   help="images per model in the heatmap grid (default: 4)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random order, fill and baseline")
    p.add_argument("--epochs", type=_positive, default=ds.TrainConfig.epochs, metavar="N",
                   help="training epochs when no cached model matches (default: %(default)s)")
    p.add_argument("--train-size", type=_positive, default=ds.TrainConfig.train_size, metavar="N",
                   help="training images when no cached model matches (default: %(default)s)")
    p.add_argument("--retrain", action="store_true", help="train even if cached weights exist")
    p.add_argument("--threads", type=_positive, default=1, metavar="N",
                   help="CPU threads for training and evaluation (default: 1; more rarely helps these small models)")
    _add_device(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(handler=_run_demo)


def _add_inputs(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (anything Pillow reads)")
    p.add_argument("--model", required=True, metavar="NAME", help="a torchvision classification model, e.g. vgg16")
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


def _add_explain(commands) -> None:
    p = commands.add_parser("explain", help="heatmaps of images for a torchvision model",
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
    p.add_argument("--top", type=_positive, default=5, metavar="N", help="classes to print per image (default: 5)")
    p.set_defaults(handler=_run_explain)


def _add_evaluate(commands) -> None:
    p = commands.add_parser("evaluate", help="pixel-flipping evaluation of explanations",
                            description="Explain each image and score the explanation by pixel flipping: "
                            "writes curves, regions per step and AUC/AOPC/SRG per image and method.")
    _add_inputs(p, "evaluate")
    p.add_argument("--composite", required=True, nargs="+", metavar="NAME",
                   help="one or more LRP presets or baselines (gradient, gradient_x_input) to compare")
    p.add_argument("--fill", nargs="+", default=["random"], metavar="NAME",
                   help="fills of removed regions, e.g. random inpaint road (default: random)")
    p.add_argument("--order", nargs="+", default=["morf", "lrf", "random"], metavar="NAME",
                   help="removal orders (default: morf lrf random)")
    p.add_argument("--patch-size", type=_positive, default=16, metavar="P",
                   help="side of the regions in pixels (default: 16)")
    p.add_argument("--steps", type=_positive, default=None, metavar="T", help="number of steps (default: by schedule)")
    p.add_argument("--schedule", default="quadratic", metavar="NAME",
                   help="linear, quadratic or log (default: %(default)s)")
    p.add_argument("--score", default="logit", metavar="NAME", help="logit or softmax (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=32, metavar="N", help="inputs per model call (default: 32)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the random order and fills (default: 0)")
    p.set_defaults(handler=_run_evaluate)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# ---------------------------------------------------------------------------------------- checks


def _check_choice(kind: str, names: Sequence[str], valid: Sequence[str]) -> None:
    for name in names:
        if name not in valid:
            raise UsageError(f"unknown {kind} '{name}'; valid: {', '.join(valid)}")


def _out_dir(path: Path) -> Path:
    """Create the output folder; an existing file or an unwritable place is a usage error."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create output folder {path}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable")
    return path


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device '{name}'; use e.g. cpu, cuda or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' is not available: torch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device '{name}' does not exist: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device '{name}' is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device '{name}' is not supported; use cpu, cuda or mps")
    return device


# ------------------------------------------------------------------------------------------- demo


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, method_names, run_demo
    from .eval import FILLS, SCHEDULES

    _check_choice("model", args.models, list(ds.MODELS))
    _check_choice("method", args.methods, method_names())
    _check_choice("fill", args.fills, list(FILLS))
    _check_choice("schedule", [args.schedule], list(SCHEDULES))
    _check_demo_steps(args)
    device = _device(args.device)
    out = _out_dir(args.out)
    options = DemoOptions(
        out=out, images=args.images, models=tuple(dict.fromkeys(args.models)),
        methods=tuple(dict.fromkeys(args.methods)), fills=tuple(dict.fromkeys(args.fills)),
        patch_size=args.patch_size, steps=args.steps, schedule=args.schedule, show=args.show, seed=args.seed,
        device=str(device), train=ds.TrainConfig(epochs=args.epochs, train_size=args.train_size),
        progress=not args.no_progress, retrain=args.retrain, threads=args.threads)
    start = time.perf_counter()
    try:
        run_demo(options)
    except ValueError as error:  # settings the evaluation rejects
        raise UsageError(f"{_first_line(error)} (files in {out} may be incomplete)") from None
    except OSError as error:
        raise UsageError(f"writing to {out} failed: {error.strerror or error} (files there may be incomplete)"
                         ) from None
    print(f"done in {time.perf_counter() - start:.0f} s; open {out / 'summary.md'} and {out / 'heatmaps.png'}")
    return 0


def _check_demo_steps(args: argparse.Namespace) -> None:
    from .eval.order import schedule_counts

    size = 64  # side of the built-in images
    if args.patch_size > size:
        raise UsageError(f"--patch-size {args.patch_size} is larger than the {size}x{size} images")
    regions = math.ceil(size / args.patch_size) ** 2
    try:
        schedule_counts(args.schedule, regions, args.steps)
    except ValueError as error:
        raise UsageError(f"--steps {args.steps}: {_first_line(error)}") from None


# ------------------------------------------------------------------------------ torchvision models


@dataclass(frozen=True)
class Preprocessing:
    """How images go into a torchvision model, and the names of its classes."""

    transform: object
    mean: tuple[float, ...]
    std: tuple[float, ...]
    categories: tuple[str, ...]

    def bounds(self) -> tuple[Tensor, Tensor]:
        """ZBox bounds: pixels 0 and 1 after the normalisation, ``(1, 3, 1, 1)`` each."""
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (self.mean, self.std))
        return (0 - mean) / std, (1 - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model input back to pixels in ``[0, 1]``."""
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
                     for v in (self.mean, self.std))
        return (x * std + mean).clamp(0, 1)


def classification_models() -> list[str]:
    """Names of torchvision's classification models."""
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def load_classifier(name: str, weights: str) -> tuple[nn.Module, Preprocessing]:
    """A torchvision classifier in eval mode with ``weights`` ("DEFAULT" or a state-dict path).

    Raises
    ------
    UsageError
        Unknown model, weights that cannot be downloaded or read, or that do not fit the model.
    """
    import torchvision

    _check_choice("model", [name], classification_models())
    default = torchvision.models.get_model_weights(name).DEFAULT
    if weights == "DEFAULT":
        model = _download(name)
    else:
        model = _from_file(name, Path(weights))
    return model.eval(), _preprocessing(default)


def _download(name: str) -> nn.Module:
    import torchvision

    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError, ValueError) as error:  # URLError is an OSError
        raise UsageError(f"could not get the DEFAULT weights of '{name}' ({_first_line(error)}); offline, pass "
                         "--weights PATH to a local state-dict file") from None


def _from_file(name: str, path: Path) -> nn.Module:
    import torchvision

    state = _read_state_dict(path)
    model = torchvision.models.get_model(name, weights=None)
    classes = _classifier_rows(model, state)
    if classes is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    _check_state(model, state, path, name)
    model.load_state_dict(state)
    return model


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UsageError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch errors alike
        hint = ("it holds pickled objects besides tensors (a whole model?); save model.state_dict() instead"
                if "Unsupported global" in str(error) else f"not a PyTorch state-dict file ({type(error).__name__})")
        raise UsageError(f"cannot read weights file {path}: {hint}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise UsageError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _classifier_rows(model: nn.Module, state: dict[str, Tensor]) -> int | None:
    """Classes of a fine-tuned head: rows of the last Linear's weight in ``state``, if they differ."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or f"{linears[-1]}.weight" not in state:
        return None
    rows = state[f"{linears[-1]}.weight"].shape[0]
    return rows if rows != model.get_submodule(linears[-1]).out_features else None


def _check_state(model: nn.Module, state: dict[str, Tensor], path: Path, name: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. '{missing[0]}')")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. '{unexpected[0]}')")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensors of another shape (e.g. '{k}': {tuple(state[k].shape)} in the file, "
                        f"{tuple(own[k].shape)} in the model)")
    if problems:
        raise UsageError(f"weights file {path} does not match model '{name}': {'; '.join(problems)}")


def _preprocessing(default) -> Preprocessing:
    transform = default.transforms()
    categories = tuple(default.meta.get("categories") or ())
    return Preprocessing(transform, tuple(transform.mean), tuple(transform.std), categories)


def load_images(paths: Sequence[Path], preprocessing: Preprocessing) -> Tensor:
    """Preprocessed ``(B, 3, H, W)`` batch; an unreadable file is a :class:`UsageError`."""
    from PIL import Image, UnidentifiedImageError

    batch = []
    for path in paths:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except FileNotFoundError:
            raise UsageError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise UsageError(f"cannot read image {path}: {_first_line(error)}") from None
        batch.append(preprocessing.transform(rgb))
    return torch.stack(batch)


def _check_readable(paths: Sequence[Path]) -> None:
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        if not path.exists():
            raise UsageError(f"image not found: {path}")
        try:
            with Image.open(path) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise UsageError(f"cannot read image {path}: {_first_line(error)}") from None


def _prepare(args: argparse.Namespace, methods: Sequence[str]):
    """Check every input before anything is written; returns model, preprocessing, inputs, logits, targets."""
    from .demo import method_names

    _check_choice("composite", methods, method_names())
    _check_choice("model", [args.model], classification_models())
    _check_readable(args.images)
    device = _device(args.device)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"output folder {args.out} exists and is not a folder")
    model, prep = load_classifier(args.model, args.weights)
    x = load_images(args.images, prep)
    model, x = model.to(device), x.to(device)
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


def _attributors(model: nn.Module, methods: Sequence[str], prep: Preprocessing, device: torch.device, name: str):
    from .canonizers import TraceError
    from .convert import UnsupportedModuleError
    from .demo import attributor

    low, high = (b.to(device) for b in prep.bounds())
    try:
        return {m: attributor(model, m, low=low, high=high) for m in methods}
    except (UnsupportedModuleError, TraceError) as error:
        raise UsageError(f"model '{name}' cannot be converted for LRP: {_unsupported(error)}; use a baseline "
                         "(gradient, gradient_x_input) or a model of plain layers (VGG, ResNet, DenseNet, ...)"
                         ) from None


def _unsupported(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines()]
    modules = [line for line in lines[1:] if line.startswith("'")]
    if not modules:
        return lines[0] if lines else type(error).__name__
    types = sorted({line.rsplit(".", 1)[-1].rstrip(")") for line in modules})
    return f"no LRP rule for {len(modules)} layers of type {', '.join(types)} (e.g. {modules[0].split(' ')[0]})"


def _stems(paths: Sequence[Path]) -> list[str]:
    """Output names per image: the file stem, numbered where stems repeat."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        names.append(path.stem if count == 0 else f"{path.stem}-{count}")
    return names


# ---------------------------------------------------------------------------------------- explain


def _run_explain(args: argparse.Namespace) -> int:
    from . import image

    if not 0 < args.percentile <= 100:
        raise UsageError(f"--percentile must be in (0, 100], got {args.percentile}")
    if not args.gamma > 0:
        raise UsageError(f"--gamma must be positive, got {args.gamma}")
    model, prep, x, logits, target = _prepare(args, [args.composite])
    explainer = _attributors(model, [args.composite], prep, x.device, args.model)[args.composite]
    relevance = torch.cat([explainer(xb, tb) for xb, tb in zip(x.split(8), target.split(8))])
    heat = image.heatmap(relevance, percentile=args.percentile, gamma=args.gamma)
    over = image.overlay(prep.to_pixels(x), relevance, percentile=args.percentile, gamma=args.gamma)
    out = _out_dir(args.out)
    written = []
    try:
        for i, stem in enumerate(_stems(args.images)):
            written.append(image.save_png(heat[i], out / f"{stem}_heatmap.png"))
            written.append(image.save_png(over[i], out / f"{stem}_overlay.png"))
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


# --------------------------------------------------------------------------------------- evaluate


def _run_evaluate(args: argparse.Namespace) -> int:
    from .eval import FILLS, ORDERS, SCHEDULES, SCORES

    methods = list(dict.fromkeys(args.composite))
    _check_choice("fill", args.fill, list(FILLS))
    _check_choice("order", args.order, list(ORDERS))
    _check_choice("schedule", [args.schedule], list(SCHEDULES))
    _check_choice("score", [args.score], list(SCORES))
    model, prep, x, _, target = _prepare(args, methods)
    explainers = _attributors(model, methods, prep, x.device, args.model)
    results = {}
    for method, explainer in explainers.items():
        relevance = torch.cat([explainer(xb, tb) for xb, tb in zip(x.split(8), target.split(8))])
        for fill in dict.fromkeys(args.fill):
            results[method, fill] = _flip(args, model, x, relevance, target, fill, prep)
    out = _out_dir(args.out)
    report = _evaluation_report(args, results, target, prep)
    try:
        _write_evaluation(out, results, report)
    except OSError as error:
        raise UsageError(f"writing to {out} failed: {error.strerror or error} (files there may be incomplete)"
                         ) from None
    return 0


def _flip(args, model, x, relevance, target, fill, prep):
    from .eval import pixel_flipping

    generator = torch.Generator(x.device).manual_seed(args.seed)
    try:
        return pixel_flipping(model, x, relevance, target, patch_size=args.patch_size, steps=args.steps,
                              schedule=args.schedule, order=tuple(dict.fromkeys(args.order)), fill=fill,
                              score=args.score, normalizer=(prep.mean, prep.std), pixel_range=(0.0, 1.0),
                              batch_size=args.batch_size, generator=generator, progress=True)
    except ValueError as error:
        raise UsageError(_first_line(error)) from None


def _evaluation_report(args, results, target, prep) -> dict:

    rows = {}
    for (method, fill), result in results.items():
        per_image = {f"auc_{o}": result.auc(o).tolist() for o in result.orders}
        summary = {k: {"mean": m, "std": s} for k, (m, s) in result.summary().items()}
        rows.setdefault(method, {})[fill] = {"summary": summary, "per_image": per_image,
                                             "mean_curve": {o: result.curve(o).mean(0).tolist() for o in result.orders}}
    some = next(iter(results.values()))
    return {
        "lrpx": __version__, "torch": torch.__version__, "model": args.model, "weights": str(args.weights),
        "images": [str(p) for p in args.images], "target": target.tolist(),
        "target_names": [prep.categories[int(t)] for t in target],
        "settings": {"patch_size": args.patch_size, "schedule": args.schedule, "steps": len(some.counts) - 1,
                     "counts": some.counts.tolist(), "regions": some.num_regions, "orders": list(some.orders),
                     "score": args.score, "seed": args.seed},
        "methods": rows,
    }


def _write_evaluation(out: Path, results, report: dict) -> None:
    from .demo import save_curves, save_schedule

    panels = {}
    for (method, fill), result in results.items():
        panels.setdefault(f"{fill} fill", {}).update({f"{method} {o}": (result, o) for o in result.orders})
    save_curves(panels, out / "curves.png", ylabel=f"target {report['settings']['score']}")
    save_schedule(next(iter(results.values())), out / "schedule.png")
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(_evaluation_table(report))
    print(f"wrote {out / 'evaluation.json'}, {out / 'curves.png'}, {out / 'schedule.png'}")


def _evaluation_table(report: dict) -> str:
    orders = report["settings"]["orders"]
    header = ["method", "fill", *(f"AUC {o}" for o in orders)]
    if {"morf", "lrf"} <= set(orders):
        header.append("SRG")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, fills in report["methods"].items():
        for fill, values in fills.items():
            cells = [method, fill, *(_pm(values["summary"][f"auc_{o}"]) for o in orders)]
            if "srg" in values["summary"]:
                cells.append(_pm(values["summary"]["srg"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


if __name__ == "__main__":
    sys.exit(main())
