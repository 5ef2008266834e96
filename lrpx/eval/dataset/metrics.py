"""The metrics of a data-set evaluation, each turning one batch of explained images into
result rows (the long format of :data:`lrpx.eval.dataset.store.COLUMNS`)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..flipping import pixel_flipping
from ..ground_truth import relevance_mass_accuracy, relevance_rank_accuracy
from ..metrics import deletion, faithfulness_correlation, insertion, sparseness
from ..randomization import randomization

__all__ = ["METRICS", "MetricSettings", "Batch", "metric_rows", "check_metrics", "BETTER"]

#: the metrics by name
METRICS = ("pixel_flipping", "insertion", "deletion", "faithfulness_correlation", "randomization", "sparseness",
           "localisation")

#: which direction is better for each (metric, order) of the rows; "" for no direction
BETTER = {("auc", "morf"): "lower", ("auc", "lrf"): "higher", ("aopc", "morf"): "higher", ("srg", ""): "higher",
          ("mrg", ""): "higher", ("lrg", ""): "higher", ("insertion", "morf"): "higher",
          ("deletion", "morf"): "lower", ("faithfulness_correlation", ""): "higher", ("sparseness", ""): "higher",
          ("randomization_spearman", ""): "lower", ("randomization_ssim", ""): "lower",
          ("relevance_mass_accuracy", ""): "higher", ("relevance_rank_accuracy", ""): "higher"}


@dataclass(frozen=True)
class MetricSettings:
    """How the metrics run (the defaults follow each metric's paper where it has one).

    Attributes
    ----------
    fills, orders, patch_size, steps, schedule, score
        Pixel flipping (:func:`lrpx.eval.pixel_flipping`); ``patch_size`` and ``steps``
        also serve insertion and deletion, whose fills are those of their paper (a blur of the
        image for insertion, zero in model-input space for deletion) and whose score is the
        softmax probability.
    subsets, subset_size
        Faithfulness correlation (:func:`lrpx.eval.faithfulness_correlation`, baseline zero).
    randomization_layers
        How many parameterised layers the randomization cascade walks down from the top
        (``None``: all of them).
    chunk
        Perturbed inputs per model call.
    normalizer, pixel_range
        The map between model input and pixels (``(mean, std)``) and the pixel range, for the
        fills that work on pixels.
    """

    fills: tuple[str, ...] = ("random",)
    orders: tuple[str, ...] = ("morf", "lrf", "random")
    patch_size: int = 16
    steps: int | None = None
    schedule: str = "quadratic"
    score: str = "logit"
    subsets: int = 100
    subset_size: float = 0.1
    randomization_layers: int | None = None
    chunk: int = 64
    normalizer: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    pixel_range: tuple[float, float] | None = (0.0, 1.0)

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Batch:
    """One batch of images explained by one method."""

    model: nn.Module
    x: Tensor
    target: Tensor
    relevance: Tensor
    masks: Tensor | None
    generators: Callable[[], list[torch.Generator]]  # fresh per-image generators, seeded by image
    method: Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]]  # the method for any model


def metric_rows(name: str, batch: Batch, settings: MetricSettings) -> list[list[dict]]:
    """The rows of metric ``name`` for each image of ``batch`` (without the image columns)."""
    return _METRIC_FUNCTIONS[name](batch, settings)


def _row(metric: str, value, *, fill: str = "", order: str = "", layer: str = "", curve=None) -> dict:
    return {"metric": metric, "value": float(value), "fill": fill, "order": order, "layer": layer,
            "curve": None if curve is None else [float(v) for v in curve]}


def _per_image(count: int) -> list[list[dict]]:
    return [[] for _ in range(count)]


def _pixel_flipping(batch: Batch, s: MetricSettings) -> list[list[dict]]:
    rows = _per_image(len(batch.x))
    for fill in s.fills:
        result = pixel_flipping(batch.model, batch.x, batch.relevance, batch.target, patch_size=s.patch_size,
                                steps=s.steps, schedule=s.schedule, order=s.orders, fill=fill, score=s.score,
                                normalizer=s.normalizer, pixel_range=s.pixel_range, batch_size=s.chunk,
                                generator=batch.generators())
        for i in range(len(batch.x)):
            for order in result.orders:
                rows[i].append(_row("auc", result.auc(order)[i], fill=fill, order=order,
                                    curve=result.curve(order)[i].tolist()))
                rows[i].append(_row("aopc", result.aopc(order)[i], fill=fill, order=order))
            for gain, needed in (("srg", ("morf", "lrf")), ("mrg", ("morf", "random")), ("lrg", ("lrf", "random"))):
                if set(needed) <= set(result.orders):
                    rows[i].append(_row(gain, getattr(result, gain)()[i], fill=fill))
    return rows


def _perturbation_metric(name: str, metric, fill) -> Callable[[Batch, MetricSettings], list[list[dict]]]:
    """Insertion or deletion with the fill of its paper, as rows."""
    def rows(batch: Batch, s: MetricSettings) -> list[list[dict]]:
        result = metric(batch.model, batch.x, batch.relevance, batch.target, fill=fill, patch_size=s.patch_size,
                        steps=s.steps, schedule=s.schedule, normalizer=s.normalizer, pixel_range=s.pixel_range,
                        batch_size=s.chunk)
        return [[_row(name, result.auc()[i], fill=str(fill), order="morf", curve=result.curve()[i].tolist())]
                for i in range(len(batch.x))]
    return rows


def _faithfulness(batch: Batch, s: MetricSettings) -> list[list[dict]]:
    values = faithfulness_correlation(batch.model, batch.x, batch.relevance, batch.target, subsets=s.subsets,
                                      subset_size=s.subset_size, patch_size=s.patch_size, fill=0.0,
                                      score=s.score, normalizer=s.normalizer, pixel_range=s.pixel_range,
                                      batch_size=s.chunk, generator=batch.generators())
    return [[_row("faithfulness_correlation", v, fill="0.0")] for v in values.tolist()]


def _sparseness(batch: Batch, s: MetricSettings) -> list[list[dict]]:
    return [[_row("sparseness", v)] for v in sparseness(batch.relevance).tolist()]


def _localisation(batch: Batch, s: MetricSettings) -> list[list[dict]]:
    if batch.masks is None:
        return _per_image(len(batch.x))
    mass = relevance_mass_accuracy(batch.relevance, batch.masks).tolist()
    rank = relevance_rank_accuracy(batch.relevance, batch.masks).tolist()
    return [[_row("relevance_mass_accuracy", m), _row("relevance_rank_accuracy", r)] for m, r in zip(mass, rank)]


def _randomization(batch: Batch, s: MetricSettings) -> list[list[dict]]:
    layers = [n for n, m in batch.model.named_modules() if any(True for _ in m.parameters(recurse=False))][::-1]
    if s.randomization_layers is not None:
        layers = layers[:s.randomization_layers]
    result = randomization(batch.model, batch.x, lambda m, x, t: batch.method(m)(x, t), batch.target,
                           layers=layers, generator=torch.Generator().manual_seed(0))
    rows = _per_image(len(batch.x))
    for step, layer in enumerate(result.layers):
        for i in range(len(batch.x)):
            rows[i].append(_row("randomization_spearman", result.spearman[step, i], layer=layer))
            rows[i].append(_row("randomization_ssim", result.ssim[step, i], layer=layer))
    return rows


_METRIC_FUNCTIONS: dict[str, Callable[[Batch, MetricSettings], list[list[dict]]]] = {
    "pixel_flipping": _pixel_flipping, "insertion": _perturbation_metric("insertion", insertion, "blur"),
    "deletion": _perturbation_metric("deletion", deletion, 0.0),
    "faithfulness_correlation": _faithfulness, "randomization": _randomization, "sparseness": _sparseness,
    "localisation": _localisation,
}


def check_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """The metric names, checked."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric '{unknown[0]}'; valid: {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))
