"""The offline demo, and the attribution methods that the command line shares with it.

``run_demo`` trains (or loads) the two small models of :mod:`lrpx.datasets`, explains test images
with LRP presets and with the gradient and gradient × input baselines, scores every method by
pixel flipping (MoRF, LRF and a random order, with random and inpainting fills) and against the
ground-truth object masks (relevance mass and rank accuracy), and writes figures and tables.
"""
from __future__ import annotations

import inspect
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import __version__, composites
from . import datasets as ds
from . import image
from .convert import convert
from .eval import pixel_flipping, relevance_mass_accuracy, relevance_rank_accuracy
from .eval.result import FlippingResult
from .eval.scores import mean_std
from .explain import explain

__all__ = ["gradient", "gradient_x_input", "BASELINES", "DEMO_METHODS", "method_names", "attributor",
           "DemoOptions", "run_demo", "markdown_tables", "save_curves", "save_schedule"]

Attributor = Callable[[Tensor, Tensor], Tensor]


def gradient(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient of the target logit with respect to the input (sensitivity), shape of ``x``."""
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(inp).gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, inp)
    return grad


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """Gradient × input, shape of ``x``."""
    return gradient(model, x, target) * x.detach()


#: attribution baselines next to the LRP presets, ``{name: function(model, x, target)}``
BASELINES: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "gradient": gradient,
    "gradient_x_input": gradient_x_input,
}
#: methods the demo compares
DEMO_METHODS = ("epsilon_gamma_box", "epsilon_plus_flat", "epsilon_alpha2_beta1", "gradient", "gradient_x_input")


def method_names() -> list[str]:
    """Names :func:`attributor` accepts: the LRP presets, then the baselines."""
    return [*composites.presets(), *BASELINES]


def attributor(model: nn.Module, method: str, *, low: Tensor | float, high: Tensor | float) -> Attributor:
    """A function ``(x, target) -> relevance`` for an LRP preset or a baseline.

    Parameters
    ----------
    model
        The classifier (not modified; LRP works on a converted copy).
    method
        A name from :func:`method_names`.
    low, high
        ZBox bounds of the input, for the presets that take them.
    """
    if method in BASELINES:
        baseline = BASELINES[method]
        return lambda x, target: baseline(model, x, target)
    if method not in composites.presets():
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(method_names())}")
    preset = composites.presets()[method]
    kwargs = {"low": low, "high": high} if "low" in inspect.signature(preset).parameters else {}
    lrp_model = convert(model, preset(**kwargs))
    return lambda x, target: explain(lrp_model, x, target).relevance


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
        relevances[method] = torch.cat([explainer(xb, tb) for xb, tb in zip(x.split(32), target.split(32))])
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
        lines += _table(["method", "RMA ↑", "RRA ↑"], [
            [m, _pm(v["ground_truth"]["rma"]), _pm(v["ground_truth"]["rra"])] for m, v in model["methods"].items()])
        for fill in summary["settings"]["fills"]:
            rows = []
            for method, values in model["methods"].items():
                scores = values["pixel_flipping"][fill]
                if method == "random":
                    rows.append(["random order", _pm(scores["auc_random"]), "", _pm(scores["aopc_random"]), "", ""])
                else:
                    rows.append([method, *(_pm(scores[key]) for key, _ in _COLUMNS)])
            lines += [f"Pixel flipping, {fill} fill:", ""]
            lines += _table(["method", *(title for _, title in _COLUMNS)], rows)
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [fmt.format(*header), rule, *(fmt.format(*row) for row in rows), ""]


def _pm(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


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


def save_curves(panels: dict[str, dict[str, tuple[FlippingResult, str]]], path: Path, *, columns: int = 1,
                ylabel: str = "target logit") -> Path:
    """Save mean perturbation curves, one panel per ``{title: {label: (result, order)}}`` entry.

    The legend gives each curve's AUC (mean ± std over the samples). Uses matplotlib
    (:mod:`lrpx.plot`) when it is installed, else plain Pillow charts.
    """
    try:
        import matplotlib  # noqa: F401  (the optional "plot" extra)
    except ImportError:
        return _save_curves_pillow(panels, path, columns, ylabel)
    from matplotlib.figure import Figure

    from .plot import plot_curves

    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(6.4 * columns, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, (result, order) in curves.items():
            plot_curves({label: result}, orders=(order,), band=False, ax=ax)
        ax.legend(fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(ylabel)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.savefig(path, dpi=72)
    return Path(path)


def _save_curves_pillow(panels, path: Path, columns: int, ylabel: str) -> Path:
    from PIL import Image

    charts = []
    for title, curves in panels.items():
        series = {}
        for label, (result, order) in curves.items():
            auc, _ = mean_std(result.auc(order))
            series[f"{label} {order}: AUC {auc:.2f}".strip()] = (result.fractions.tolist(),
                                                                  result.curve(order).mean(0).tolist())
        charts.append(image.line_chart(series, title=title, xlabel="share of regions removed", ylabel=ylabel))
    width, height = charts[0].size
    rows = -(-len(charts) // columns)
    sheet = Image.new("RGB", (width * columns, height * rows), "white")
    for k, chart in enumerate(charts):
        sheet.paste(chart, ((k % columns) * width, (k // columns) * height))
    return image.save_png(sheet, path)


def save_schedule(result: FlippingResult, path: Path) -> Path:
    """Save the bar chart of regions removed per step (matplotlib if installed, else Pillow)."""
    try:
        from .plot import plot_schedule

        plot_schedule(result).savefig(path, dpi=72)
        return Path(path)
    except ImportError:
        title = f"{result.num_regions} regions of {result.patch_size}x{result.patch_size}"
        chart = image.bar_chart(result.removed_per_step.tolist(), title=title, xlabel="step",
                                ylabel="regions removed in the step")
        return image.save_png(chart, path)


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
