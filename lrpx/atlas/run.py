"""The data-set pass of the concept atlas, on the engine of ``lrpx evaluate --data``: the
images are streamed, split over the ranks of a ``torch.distributed`` run and written as
Parquet parts that survive a killed run (:mod:`lrpx.eval.dataset.store`).

1. *Scan* (``OUT/results``): every image once, with one forward and one backward pass from its
   top class: per channel of the layer, the relevance and the largest activation.
2. *Maxima*: when every rank is done, each rank reads all scan parts and ranks, per channel,
   the images by relevance (relevance maximisation) and by largest activation (activation
   maximisation); ties go to the lower image index, so every rank finds the same ones.
3. *Localisation* (``OUT/references``): the reference images, split over the ranks again: per
   image, one conditional heatmap for each channel it is a reference of (a full backward pass
   from its top class that keeps, at the layer, only that channel's relevance), and its crop
   (:func:`lrpx.atlas.layer.crop_box`); the cropped heatmaps are kept as float16 tensors.
4. Rank 0 writes ``OUT/maxima.parquet``, ``OUT/class_concepts.parquet`` (see
   :mod:`lrpx.atlas.tables`), ``OUT/failures.csv`` (the images that could not be read) and the
   figures.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..eval.dataset.engine import _Indexed, distributed_context, open_run, stream
from ..eval.dataset.sources import ImageFiles
from ..eval.dataset.store import RunStore, pyarrow, read_failures, write_failures
from .layer import check_layer, conditional_heatmaps, crop_box, scan_layer
from .tables import KINDS, maxima, read_references, read_scan, write_tables

__all__ = ["concept_atlas", "scan_schema", "reference_schema"]


def scan_schema():
    pa = pyarrow()
    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("label", pa.int64()),
                      ("prediction", pa.int64()), ("score", pa.float64()), ("relevance", pa.list_(pa.float64())),
                      ("activation", pa.list_(pa.float64())), ("position", pa.list_(pa.int64()))])


def reference_schema():
    pa = pyarrow()
    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("channel", pa.int64()),
                      ("top", pa.int64()), ("left", pa.int64()), ("bottom", pa.int64()), ("right", pa.int64()),
                      ("fallback", pa.bool_()), ("heatmap_sum", pa.float64())])


def concept_atlas(lrp_model: nn.Module, dataset, *, layer: str, out: str | Path, top: int = 8, mass: float = 0.8,
                  batch_size: int = 16, conditions_per_pass: int = 32, workers: int = 0,
                  device: str | torch.device = "cpu", overwrite: bool = False, progress: bool = True,
                  run: Mapping[str, object] | None = None, class_names=(), figures: bool = True,
                  to_pixels: Callable[[Tensor], Tensor] | None = None) -> Path:
    """Build the concept atlas of ``layer`` over a data set and write it to ``out``.

    Parameters
    ----------
    lrp_model
        A classifier converted by :func:`lrpx.convert`.
    dataset
        An :class:`lrpx.eval.dataset.ImageFiles`, or a dataset of ``(image, label)`` items.
    layer
        The module whose output channels are the concepts (``(B, C, H, W)`` outputs).
    out
        The output folder; a folder that holds a run with the same settings is continued.
    top
        Reference images per channel and kind (relevance, activation).
    mass
        Share of the conditional heatmap that a reference crop holds along each axis.
    batch_size, conditions_per_pass, workers, device
        Images per scan batch, rows per conditional backward pass, DataLoader processes, and
        where the model runs (CUDA ranks of ``torchrun`` use ``cuda:LOCAL_RANK``).
    overwrite
        Delete what ``out`` holds of an earlier run first.
    progress
        Progress bars (rank 0).
    run
        More settings to record and check on resume (model, weights, data, composite).
    class_names
        Names of the classes, for the tables and figures.
    figures
        Write a PNG per channel under ``out/atlas``.
    to_pixels
        Model input to displayable pixels in ``[0, 1]`` (``(B, 3, H, W)``), for the figures.

    Returns
    -------
    Path
        ``out``.
    """
    out = Path(out)
    context = distributed_context(device)
    dataset = dataset if isinstance(dataset, ImageFiles) else _Indexed(dataset)
    settings = {"layer": layer, "top": top, "mass": mass, "images": len(dataset), **dict(run or {})}
    model = lrp_model.to(context.device)
    try:
        spatial = _spatial(model, dataset, layer, context.device)  # a bad layer fails before anything is written
        if overwrite and context.rank == 0:
            shutil.rmtree(out / "references", ignore_errors=True)
            shutil.rmtree(out / "atlas", ignore_errors=True)
            for name in ("maxima.parquet", "class_concepts.parquet"):
                (out / name).unlink(missing_ok=True)
        scans = RunStore(out, context.rank, schema=scan_schema())
        mine = open_run(scans, context, settings, range(len(dataset)), overwrite=overwrite)

        def scan(records, images, masks):
            found = scan_layer(model, images.to(context.device), layer)
            return [{"image": r.path, "index": r.index, "label": r.label, "prediction": int(p), "score": float(s),
                     "relevance": rel, "activation": act, "position": pos}
                    for r, p, s, rel, act, pos in zip(records, found.prediction.tolist(), found.score.tolist(),
                                                      found.relevance.double().tolist(),
                                                      found.activation.double().tolist(),
                                                      found.position.tolist())], {}

        stream(dataset, mine, scans, context, scan, batch_size=batch_size, workers=workers, progress=progress,
               desc="scanning")
        context.barrier()
        images = read_scan(out)
        if not len(images["index"]):
            raise ValueError("no image of the data set could be read; see the failures folder")
        table = maxima(images, top)
        wanted: dict[int, list[int]] = {}
        for kind in KINDS:
            for channel, index in zip(table[kind]["channel"], table[kind]["index"]):
                wanted.setdefault(int(index), []).append(int(channel))
        wanted = {i: sorted(set(c)) for i, c in wanted.items()}
        row_of = {int(i): k for k, i in enumerate(images["index"])}
        refs = RunStore(out / "references", context.rank, schema=reference_schema())
        mine = open_run(refs, context, settings, sorted(wanted))

        def localise(records, batch, masks):
            pairs = [(j, record, channel) for j, record in enumerate(records) for channel in wanted[record.index]]
            picks = torch.tensor([j for j, _, _ in pairs])
            channels = torch.tensor([c for _, _, c in pairs])
            target = torch.tensor([int(images["prediction"][row_of[r.index]]) for _, r, _ in pairs])
            heat = conditional_heatmaps(model, batch[picks].to(context.device), target, layer, channels,
                                        rows_per_pass=conditions_per_pass).detach().sum(1)  # over colour channels
            rows, maps = [], {}
            for (_, record, channel), h in zip(pairs, heat):
                position = int(images["position"][row_of[record.index]][channel])
                (t, left, b, right), fallback = crop_box(h, position, spatial, mass=mass)
                rows.append({"image": record.path, "index": record.index, "channel": channel, "top": t, "left": left,
                             "bottom": b, "right": right, "fallback": fallback, "heatmap_sum": float(h.double().sum())})
                maps[f"{channel}/{record.index}"] = h[t:b, left:right].to(torch.float16).cpu().contiguous()
            return rows, maps

        stream(dataset, mine, refs, context, localise, batch_size=batch_size, workers=workers, progress=progress,
               desc="localising")
        context.barrier()
        if context.rank == 0:
            write_tables(out, layer, table, images, read_references(out), class_names)
            write_failures(out / "failures.csv", read_failures(out))
            if figures:
                from .figures import write_channel_figures

                write_channel_figures(out, dataset, to_pixels=to_pixels)
    finally:
        context.close()
    return out


def _spatial(model, dataset, layer: str, device) -> tuple[int, ...]:
    """The spatial shape of the layer's output (:func:`check_layer`), on the first image that
    can be read."""
    for i in range(len(dataset)):
        _, image, _, _ = dataset[i]
        if image is not None:
            return check_layer(model, layer, image[None].to(device))[1]
    raise ValueError("no image of the data set can be read")
