"""The offline demo, and the attribution methods that the command line shares with it.

``run_demo`` trains (or loads) the two small models of :mod:`lrpx.datasets`, explains test images
with LRP presets and with the gradient and gradient × input baselines, scores every method by
pixel flipping (MoRF, LRF and a random order, with random and inpainting fills) and against the
ground-truth object masks (relevance mass and rank accuracy), and writes figures and tables.
"""
from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__
from . import datasets as ds
from . import image
from .eval import pixel_flipping, relevance_mass_accuracy, relevance_rank_accuracy
from .eval.result import FlippingResult
from .eval.scores import mean_std
from .methods import attributor, explain_batches
from .report import markdown_table, pm, save_curves, save_schedule

__all__ = ["DEMO_METHODS", "DemoOptions", "run_demo", "markdown_tables"]

#: methods the demo compares
DEMO_METHODS = ("epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1", "gradient", "gradient_x_input")


@dataclass
class DemoOptions:
    """Settings of :func:`run_demo`.

    Attributes
    ----------
    out
        Output folder (created).
    images
        Test images explained and evaluated per model.
    models
        Models of :data:`lrpx.datasets.MODELS`.
    methods
        Attribution methods (:func:`method_names`).
    fills
        Pixel-flipping fills.
    patch_size, steps, schedule
        Regions and removal schedule of pixel flipping.
    show
        Images per model in the heatmap grid.
    seed
        Seed of the random order, the random fill and the random baseline.
    device
        Where models run.
    train
        Training settings, used when no cached weights match them.
    retrain
        Train even when cached weights exist.
    threads
        CPU threads for training and evaluation (``None``: torch's setting). One is the default:
        the demo's small tensors gain little from more, and busy cores make waiting threads slow.
    progress
        Show progress bars.
    """

    out: Path = Path("lrpx-demo")
    images: int = 24
    models: Sequence[str] = ("vgg", "resnet")
    methods: Sequence[str] = DEMO_METHODS
    fills: Sequence[str] = ("inpaint", "random")
    patch_size: int = 4
    steps: int | None = None
    schedule: str = "quadratic"
    show: int = 4
    seed: int = 0
    device: str = "cpu"
    train: ds.TrainConfig = field(default_factory=ds.TrainConfig)
    retrain: bool = False
    threads: int | None = 1
    progress: bool = True


@dataclass
class _ModelRun:
    """What the demo computed for one model."""

    info: dict
    shown: dict[str, Tensor]  # method -> relevance of the first `show` images
    ground_truth: dict[str, dict[str, Tensor]]  # method -> {"rma", "rra"} per image
    flipping: dict[str, dict[str, FlippingResult]]  # fill -> method (or "random") -> result
    correct: float


def run_demo(options: DemoOptions, *, log: Callable[[str], None] = print) -> dict:
    """Run the demo and write its files to ``options.out``; returns the summary (as in ``summary.json``).

    Files: ``heatmaps.png`` (input with the object outline | one heatmap per method),
    ``curves.png`` (mean MoRF curves per method and the random order, with AUCs),
    ``schedule.png`` (regions removed per step), ``summary.md`` and ``summary.json``.
    """
    start = time.perf_counter()
    data = ds.shapes_split("test", options.images)
    device = torch.device(options.device)
    runs = {}
    with ds.num_threads(options.threads):
        for name in options.models:
            model, info = ds.load_model(name, options.train, progress=options.progress, retrain=options.retrain,
                                        threads=options.threads)
            runs[name] = _evaluate(model.to(device), name, info, data, options)
    summary = _summary(runs, options, time.perf_counter() - start)
    paths = _write(runs, data, summary, options)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (options.out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(markdown_tables(summary))
    log("wrote " + ", ".join(str(p) for p in paths))
    return summary


def _evaluate(model: nn.Module, name: str, info: dict, data: ds.Shapes, options: DemoOptions) -> _ModelRun:
    device = next(model.parameters()).device
    x, target, masks = ds.normalize(data.images).to(device), data.labels.to(device), data.masks.to(device)
    low, high = (b.to(device) for b in ds.zbox_bounds())
    with torch.no_grad():
        correct = float((model(x).argmax(1) == target).double().mean())
    total = len(options.methods) * (1 + len(options.fills)) + len(options.fills) + 1
    bar = tqdm(total=total, desc=f"evaluating {name}", unit="task", disable=not options.progress)
    relevances = {}
    for method in options.methods:
        bar.set_postfix_str(method)
        explainer = attributor(model, method, low=low, high=high)
        relevances[method] = explain_batches(explainer, x, target, 32)
        bar.update()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(options.seed)).to(device)
    ground_truth = {m: _ground_truth(r, masks) for m, r in {**relevances, "random": noise}.items()}
    bar.update()
    flipping = {fill: _flip_all(model, x, target, relevances, fill, options, bar) for fill in options.fills}
    bar.close()
    shown = {m: r[: options.show].cpu() for m, r in relevances.items()}
    return _ModelRun(info, shown, ground_truth, flipping, correct)


def _ground_truth(relevance: Tensor, masks: Tensor) -> dict[str, Tensor]:
    return {"rma": relevance_mass_accuracy(relevance, masks).cpu(),
            "rra": relevance_rank_accuracy(relevance, masks).cpu()}


def _flip_all(model, x, target, relevances, fill, options, bar) -> dict[str, FlippingResult]:
    results = {}
    for method, relevance in {**relevances, "random": torch.zeros_like(x[:, 0])}.items():
        bar.set_postfix_str(f"{method}, {fill} fill")
        orders = ("random",) if method == "random" else ("morf", "lrf")
        generator = torch.Generator(x.device).manual_seed(options.seed)  # same noise for every method
        results[method] = pixel_flipping(
            model, x, relevance, target, patch_size=options.patch_size, steps=options.steps,
            schedule=options.schedule, order=orders, fill=fill, normalizer=(ds.MEAN, ds.STD),
            pixel_range=(0.0, 1.0), batch_size=128, generator=generator)
        bar.update()
    return results


def _stat(values: Tensor) -> dict[str, float]:
    mean, std = mean_std(values)
    return {"mean": round(mean, 6), "std": round(std, 6)}


def _flipping_scores(method: str, results: dict[str, FlippingResult]) -> dict[str, dict[str, float]]:
    result = results[method]
    if method == "random":
        return {"auc_random": _stat(result.auc("random")), "aopc_random": _stat(result.aopc("random"))}
    mrg = results["random"].auc("random") - result.auc("morf")
    return {"auc_morf": _stat(result.auc("morf")), "auc_lrf": _stat(result.auc("lrf")),
            "aopc_morf": _stat(result.aopc("morf")), "srg": _stat(result.srg()), "mrg": _stat(mrg)}


def _summary(runs: dict[str, _ModelRun], options: DemoOptions, seconds: float) -> dict:
    models = {}
    for name, run in runs.items():
        methods = {}
        for method in [*options.methods, "random"]:
            gt = run.ground_truth[method]
            methods[method] = {
                "ground_truth": {"rma": _stat(gt["rma"]), "rra": _stat(gt["rra"])},
                "pixel_flipping": {fill: _flipping_scores(method, run.flipping[fill]) for fill in options.fills},
            }
        info = {k: v for k, v in run.info.items() if k != "config"}
        models[name] = {**info, "accuracy_on_demo_images": round(run.correct, 4), "methods": methods}
    first = next(iter(next(iter(runs.values())).flipping.values()))["random"]
    settings = {k: v for k, v in asdict(options).items() if k not in ("out", "progress", "retrain")}
    settings.update(out=str(options.out), regions=first.num_regions, counts=first.counts.tolist(), score="logit")
    return {"lrpx": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "seconds": round(seconds, 1), "settings": settings, "models": models}


_COLUMNS = (("auc_morf", "AUC MoRF ↓"), ("auc_lrf", "AUC LRF ↑"), ("aopc_morf", "AOPC MoRF ↑"),
            ("srg", "SRG ↑"), ("mrg", "MRG ↑"))


def markdown_tables(summary: dict) -> str:
    """The summary's tables in Markdown: ground truth, then pixel flipping per fill, per model."""
    lines = []
    for name, model in summary["models"].items():
        acc = model["accuracy"]
        lines += [f"## {name} (test accuracy {acc:.1%}, {model['accuracy_on_demo_images']:.1%} on these images)", ""]
        lines += markdown_table(["method", "RMA ↑", "RRA ↑"], [
            [m, pm(v["ground_truth"]["rma"]), pm(v["ground_truth"]["rra"])] for m, v in model["methods"].items()])
        for fill in summary["settings"]["fills"]:
            rows = []
            for method, values in model["methods"].items():
                scores = values["pixel_flipping"][fill]
                if method == "random":
                    rows.append(["random order", pm(scores["auc_random"]), "", pm(scores["aopc_random"]), "", ""])
                else:
                    rows.append([method, *(pm(scores[key]) for key, _ in _COLUMNS)])
            lines += [f"Pixel flipping, {fill} fill:", ""]
            lines += markdown_table(["method", *(title for _, title in _COLUMNS)], rows)
    return "\n".join(lines)


def _write(runs: dict[str, _ModelRun], data: ds.Shapes, summary: dict, options: DemoOptions) -> list[Path]:
    out = options.out
    paths = [image.save_png(_heatmap_grid(runs, data, options), out / "heatmaps.png")]
    paths += _write_curves(runs, options)
    (out / "summary.md").write_text(_summary_markdown(summary))
    return [*paths, out / "summary.md", out / "summary.json"]


def _heatmap_grid(runs: dict[str, _ModelRun], data: ds.Shapes, options: DemoOptions):
    show = min(options.show, len(data))
    inputs = image.mask_outline(data.images[:show], data.masks[:show])
    rows, titles = [], []
    for name, run in runs.items():
        heat = {m: image.heatmap(r, percentile=99.5) for m, r in run.shown.items()}
        for i in range(show):
            rows.append([inputs[i], *(heat[m][i] for m in options.methods)])
            titles.append(f"{name}: {ds.CLASSES[int(data.labels[i])]}")
    return image.image_grid(rows, column_titles=["input", *options.methods], row_titles=titles, scale=2)


def _write_curves(runs: dict[str, _ModelRun], options: DemoOptions) -> list[Path]:
    panels = {}
    for name, run in runs.items():
        for fill in options.fills:
            panels[f"{name}, {fill} fill: MoRF (lower AUC is better)"] = {
                ("" if method == "random" else method): (result, "random" if method == "random" else "morf")
                for method, result in run.flipping[fill].items()}
    some = next(iter(next(iter(runs.values())).flipping.values()))["random"]
    return [save_curves(panels, options.out / "curves.png", columns=len(options.fills)),
            save_schedule(some, options.out / "schedule.png")]


def _summary_markdown(summary: dict) -> str:
    s = summary["settings"]
    head = [
        "# lrpx demo",
        "",
        f"{s['images']} test images of the built-in shapes task per model; pixel flipping over "
        f"{s['regions']} regions of {s['patch_size']}x{s['patch_size']} pixels, {s['schedule']} schedule "
        f"({len(s['counts']) - 1} steps), target logit as score, seed {s['seed']}.",
        "RMA: share of positive relevance on the object; RRA: share of the |mask| most relevant pixels on "
        "the object; AUC on the share-removed axis (MoRF lower is better, LRF higher); SRG = AUC LRF - AUC "
        "MoRF; MRG = AUC random order - AUC MoRF. Mean ± std over the images. The random row is uniform "
        "noise as relevance (ground truth) and the random removal order (pixel flipping).",
        "",
        "The inpaint fill keeps the images close to what the models were trained on. Uniform noise (the "
        "random fill) is not: a few noisy regions can drive the target logit far below zero whatever is "
        "removed, which shows as large spreads and small gaps between the orders in that table.",
        "",
        "",
    ]
    return "\n".join(head) + markdown_tables(summary) + f"\nlrpx {summary['lrpx']}, torch {summary['torch']}\n"
