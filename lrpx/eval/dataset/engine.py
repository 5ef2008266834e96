"""The data-set evaluation engine: stream images, explain them with each method, score every
explanation with each metric, and write the rows, split over the processes of a
``torch.distributed`` run and resumable after a kill.

The images are split over the ranks deterministically (image ``i`` goes to rank
``i mod world_size``), every random draw of an image comes from a generator seeded by the run's
seed and the image's index, and a sample's result never depends on its batch, so the rows do
not depend on how many processes ran or where a run was stopped.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .metrics import Batch, MetricSettings, check_metrics, metric_rows
from .sources import ImageFiles, Record, collate
from .store import RunStore

__all__ = ["evaluate_dataset", "DistributedContext", "distributed_context", "Method", "open_run", "stream",
           "BatchStep"]

#: a method: the model to explain -> ``(x, target) -> relevance``
Method = Callable[[nn.Module], Callable[[Tensor, Tensor], Tensor]]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torch.distributed`` run (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    started: bool = False  # whether this process initialised the process group

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started:
            torch.distributed.destroy_process_group()


def distributed_context(device: str | torch.device = "cpu") -> DistributedContext:
    """Join the ``torch.distributed`` run that ``torchrun`` describes in the environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, rendezvous address): ``gloo`` for CPU ranks,
    ``nccl`` with one GPU per rank (``cuda:LOCAL_RANK``). Without it, one process."""
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=device)
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistributedContext(dist.get_rank(), dist.get_world_size(), device, started)


def _as_methods(methods: Mapping[str, Method] | Sequence[str], low, high) -> dict[str, Method]:
    if isinstance(methods, Mapping):
        return dict(methods)
    from ...methods import attributor

    return {name: (lambda model, name=name: attributor(model, name, low=low, high=high)) for name in methods}


def evaluate_dataset(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    methods: Mapping[str, Method] | Sequence[str],
    metrics: Sequence[str] = ("pixel_flipping",),
    *,
    out: str | Path,
    settings: MetricSettings = MetricSettings(),
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    seed: int = 0,
    low: Tensor | float = -3.0,
    high: Tensor | float = 3.0,
    save_relevance: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    run: Mapping[str, object] | None = None,
    report: bool = True,
) -> Path:
    """Evaluate explanations of ``model`` over a data set and write the results to ``out``.

    Parameters
    ----------
    model
        A classifier in eval mode, ``(N, C, H, W) -> (N, classes)``.
    dataset
        An :class:`lrpx.eval.dataset.ImageFiles` (image files, read in the DataLoader's
        workers; unreadable images are recorded in ``failures.csv``), or any dataset whose items
        are ``(image, label)`` or ``(image, label, mask)`` tensors (label ``-1``: none).
    methods
        Names of LRP presets and baselines (``lrpx.methods.method_names()``), or
        ``{name: method}`` with ``method(model) -> (x, target) -> relevance``.
    metrics
        Names from :data:`lrpx.eval.dataset.METRICS`.
    out
        The output folder (see :mod:`lrpx.eval.dataset.store`); a run into a folder that holds
        a run with the same settings continues where that one stopped.
    settings
        How the metrics run.
    batch_size, workers, device
        Images per batch, DataLoader worker processes, where the model runs (under
        ``torchrun``, CUDA ranks use ``cuda:LOCAL_RANK``).
    seed
        Seed of every random draw: image ``i`` draws from ``seed * 1000003 + i``.
    low, high
        ZBox bounds of the input, for the presets that take them.
    save_relevance
        Also store the channel-summed relevance maps (float16, safetensors).
    overwrite
        Delete what ``out`` holds of an earlier run first.
    progress
        Show a progress bar (rank 0, over all ranks).
    run
        More settings to record with the run and check on resume (the model's name, ...).
    report
        Write ``summary.json``, ``summary.md`` and the figures when every rank is done.

    Returns
    -------
    Path
        ``out``.
    """
    metrics = check_metrics(metrics)
    context = distributed_context(device)
    methods = _as_methods(methods, low, high)
    dataset = dataset if isinstance(dataset, ImageFiles) else _Indexed(dataset)
    store = RunStore(Path(out), context.rank)
    recorded = {"methods": list(methods), "metrics": list(metrics), "seed": seed, "settings": settings.as_dict(),
                "images": len(dataset), **dict(run or {})}
    try:
        if context.rank == 0:
            _check_labels(model.to(context.device), dataset, context.device)
        mine = open_run(store, context, recorded, range(len(dataset)), overwrite=overwrite)
        _run(model.to(context.device), dataset, mine, methods, metrics, store, context,
             settings=settings, batch_size=batch_size, workers=workers, seed=seed, save_relevance=save_relevance,
             progress=progress)
        context.barrier()
        if report and context.rank == 0:
            from .report import write_report

            write_report(Path(out))
    finally:
        context.close()
    return Path(out)


def _check_labels(model: nn.Module, dataset, device: torch.device) -> None:
    """Labels beyond the model's classes are an error before anything is written."""
    labels = [r.label for r in getattr(dataset, "records", [])]
    if not labels or max(labels) < 0:
        return
    for i in range(len(dataset)):
        _, image, _, _ = dataset[i]
        if image is not None:
            with torch.no_grad():
                classes = model(image[None].to(device)).shape[1]
            break
    else:
        return
    if max(labels) >= classes:
        bad = next(r for r in dataset.records if r.label >= classes)
        raise ValueError(f"label {bad.label} of {bad.path} is outside the model's {classes} classes "
                         f"(0..{classes - 1}); the class folders must match the model's classes")


def open_run(store: RunStore, context: DistributedContext, settings: Mapping[str, object], indices: Iterable[int],
             *, overwrite: bool = False) -> list[int]:
    """Open ``store`` on every rank (rank 0 first: it writes or checks the manifest) and return
    this rank's share of ``indices`` that no part holds yet.

    The share is fixed by the position in ``indices``: position ``p`` goes to rank
    ``p mod world_size``, so a resumed run, on any number of ranks, never does an image twice.
    """
    if context.rank == 0:
        store.open(dict(settings), overwrite=overwrite)
    context.barrier()
    if context.rank != 0:
        store.open(dict(settings))
    done = store.done()
    context.barrier()
    return [i for p, i in enumerate(indices) if p % context.world_size == context.rank and i not in done]


#: what :func:`stream` does with one batch: ``(records, images, masks) -> (rows, tensors)``
BatchStep = Callable[[list[Record], Tensor, "Tensor | None"], tuple[list[dict], dict]]


def stream(dataset, indices: list[int], store: RunStore, context: DistributedContext, step: BatchStep, *,
           batch_size: int, workers: int, progress: bool, desc: str = "evaluating") -> None:
    """Run ``step`` over the images ``indices`` of ``dataset`` in batches and write each batch
    as one part of ``store`` (its rows, its tensors, its unreadable images), with the progress
    of every rank shown by rank 0."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate, shuffle=False,
                                         persistent_workers=False, pin_memory=context.device.type == "cuda")
    part, done = store.next_part(), 0
    store.report_progress(0, len(indices))
    bar = tqdm(total=len(indices), disable=not progress or context.rank != 0, unit="image", desc=desc)
    for records, images, masks, failures in loader:
        rows, maps = step(records, images, masks) if images is not None else ([], {})
        store.write(part, rows, [(r.index, r.path, reason) for r, reason in failures], maps)
        part, done = part + 1, done + len(records) + len(failures)
        store.report_progress(done, len(indices))
        if context.rank == 0:
            finished, total = store.progress_of_all()
            bar.total, bar.n = max(total, 1), finished
            bar.refresh()
    bar.close()


def _run(model, dataset, indices: list[int], methods: dict[str, Method], metrics, store: RunStore,
         context: DistributedContext, *, settings: MetricSettings, batch_size: int, workers: int, seed: int,
         save_relevance: bool, progress: bool) -> None:
    explainers = {name: method(model) for name, method in methods.items()}

    def step(records, images, masks):
        return _evaluate_batch(model, records, images, masks, methods, explainers, metrics, context.device,
                               settings, seed, save_relevance)

    stream(dataset, indices, store, context, step, batch_size=batch_size, workers=workers, progress=progress)


def _evaluate_batch(model, records: list[Record], images: Tensor, masks, methods, explainers, metrics, device,
                    settings: MetricSettings, seed: int, save_relevance: bool) -> tuple[list[dict], dict]:
    x = images.to(device)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    labels = torch.tensor([r.label for r in records], device=device)
    target = torch.where(labels >= 0, labels, predicted)

    def generators() -> list[torch.Generator]:
        return [torch.Generator(device).manual_seed(seed * 1_000_003 + r.index) for r in records]

    rows, maps = [], {}
    for name, explainer in explainers.items():
        relevance = explainer(x, target).detach()
        if save_relevance:
            for r, m in zip(records, relevance.sum(1) if relevance.dim() == 4 else relevance):
                maps[f"{name}/{r.index}"] = m.to(torch.float16).cpu().contiguous()
        batch = Batch(model, x, target, relevance, None if masks is None else masks.to(device), generators,
                      methods[name])
        for metric in metrics:
            for record, t, image_rows in zip(records, target.tolist(), metric_rows(metric, batch, settings)):
                rows += [{"image": record.path, "index": record.index, "label": record.label, "target": t,
                          "method": name, **row} for row in image_rows]
    return rows, maps


class _Indexed(torch.utils.data.Dataset):
    """A dataset of ``(image, label[, mask])`` items as :class:`ImageFiles`-like items."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset
        self.records = [Record(i, str(i), -1) for i in range(len(dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        image, label = item[0], int(item[1]) if len(item) > 1 else -1
        mask = item[2] if len(item) > 2 else None
        return Record(i, str(i), label), image, None, mask
