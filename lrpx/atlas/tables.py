"""The tables of the concept atlas, from the Parquet parts of every rank.

``OUT/maxima.parquet``
    One row per channel, kind and rank: ``layer, channel, kind`` (``relevance`` or
    ``activation``), ``rank`` (1 is the largest), the image (``index``, ``image``, ``label``,
    ``prediction``, ``class_name``), ``value`` (the channel's relevance for the image's top
    class, or its largest activation), the crop ``top, left, bottom, right`` in input pixels
    (bottom and right exclusive), ``fallback`` (the crop is the activation's position because
    the conditional heatmap holds no relevance) and ``heatmap_sum``.
``OUT/class_concepts.parquet``
    Which classes use which concepts: per predicted class and channel, the number of images,
    the mean channel relevance and the mean share of the layer's relevance (the channel's
    relevance over the sum over the channels, per image).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..eval.dataset.store import _atomic_write, pyarrow

__all__ = ["KINDS", "read_scan", "maxima", "class_concepts", "read_references", "write_tables", "read_maxima"]

#: the two rankings of reference images
KINDS = ("relevance", "activation")


def read_scan(out: Path) -> dict[str, np.ndarray]:
    """The scan rows of every part of ``out`` as arrays sorted by image index: ``index``,
    ``image``, ``label``, ``prediction``, ``score`` ``(N,)`` and ``relevance``,
    ``activation``, ``position`` ``(N, C)``."""
    pa = pyarrow()
    parts = sorted((Path(out) / "results").glob("part-*.parquet"))
    if not parts:
        return {"index": np.zeros(0, np.int64)}
    table = pa.concat_tables([pa.parquet.read_table(p) for p in parts]).to_pydict()
    order = np.argsort(np.asarray(table["index"]), kind="stable")
    found = {}
    for name, values in table.items():
        array = np.asarray(values, dtype=object if name == "image" else None)
        found[name] = array[order]
    return found


def maxima(images: dict[str, np.ndarray], top: int) -> dict[str, dict[str, np.ndarray]]:
    """Per kind, the ``top`` images of each channel: flat arrays ``channel``, ``rank``, ``row``
    (into ``images``), ``index`` and ``value``, channel by channel. Ranked by the value, ties
    by the lower image index."""
    found = {}
    for kind in KINDS:
        values = images[kind]
        count, channels = values.shape
        k = min(top, count)
        rows = np.stack([np.lexsort((images["index"], -values[:, c]))[:k] for c in range(channels)])
        found[kind] = {"channel": np.repeat(np.arange(channels), k), "rank": np.tile(np.arange(1, k + 1), channels),
                       "row": rows.reshape(-1), "index": images["index"][rows.reshape(-1)],
                       "value": values[rows, np.arange(channels)[:, None]].reshape(-1)}
    return found


def class_concepts(images: dict[str, np.ndarray], class_names: Sequence[str] = ()) -> dict[str, list]:
    """Mean channel relevance and mean share per predicted class and channel (columns)."""
    relevance, prediction = images["relevance"], images["prediction"]
    total = relevance.sum(1, keepdims=True)
    share = relevance / np.where(total == 0, 1.0, total)
    columns: dict[str, list] = {k: [] for k in ("class", "class_name", "channel", "images", "mean_relevance",
                                                "mean_share")}
    for cls in np.unique(prediction):
        pick = prediction == cls
        for channel in range(relevance.shape[1]):
            columns["class"].append(int(cls))
            columns["class_name"].append(_name(class_names, cls))
            columns["channel"].append(channel)
            columns["images"].append(int(pick.sum()))
            columns["mean_relevance"].append(float(relevance[pick, channel].mean()))
            columns["mean_share"].append(float(share[pick, channel].mean()))
    return columns


def read_references(out: Path) -> dict[tuple[int, int], dict]:
    """The localisation rows of every part: ``{(image index, channel): row}``."""
    pa = pyarrow()
    parts = sorted((Path(out) / "references" / "results").glob("part-*.parquet"))
    rows = [r for p in parts for r in pa.parquet.read_table(p).to_pylist()]
    return {(r["index"], r["channel"]): r for r in rows}


def write_tables(out: Path, layer: str, table: dict, images: dict[str, np.ndarray], references: dict,
                 class_names: Sequence[str] = ()) -> None:
    """Write ``maxima.parquet`` and ``class_concepts.parquet`` (each whole or absent)."""
    pa = pyarrow()
    rows = []
    for kind in KINDS:
        t = table[kind]
        for channel, rank, row, index, value in zip(t["channel"], t["rank"], t["row"], t["index"], t["value"]):
            ref = references.get((int(index), int(channel)), {})
            prediction = int(images["prediction"][row])
            rows.append({"layer": layer, "channel": int(channel), "kind": kind, "rank": int(rank), "index": int(index),
                         "image": str(images["image"][row]), "label": int(images["label"][row]),
                         "prediction": prediction, "class_name": _name(class_names, prediction), "value": float(value),
                         **{k: ref.get(k) for k in ("top", "left", "bottom", "right", "fallback", "heatmap_sum")}})
    maxima_table = pa.Table.from_pylist(rows, schema=_maxima_schema())
    _atomic_write(Path(out) / "maxima.parquet", lambda p: pa.parquet.write_table(maxima_table, p))
    classes_table = pa.Table.from_pydict(class_concepts(images, class_names))
    _atomic_write(Path(out) / "class_concepts.parquet", lambda p: pa.parquet.write_table(classes_table, p))


def read_maxima(out: Path) -> list[dict]:
    """The rows of ``OUT/maxima.parquet``."""
    return pyarrow().parquet.read_table(Path(out) / "maxima.parquet").to_pylist()


def _maxima_schema():
    pa = pyarrow()
    return pa.schema([("layer", pa.string()), ("channel", pa.int64()), ("kind", pa.string()), ("rank", pa.int64()),
                      ("index", pa.int64()), ("image", pa.string()), ("label", pa.int64()),
                      ("prediction", pa.int64()), ("class_name", pa.string()), ("value", pa.float64()),
                      ("top", pa.int64()), ("left", pa.int64()), ("bottom", pa.int64()), ("right", pa.int64()),
                      ("fallback", pa.bool_()), ("heatmap_sum", pa.float64())])


def _name(class_names: Sequence[str], cls) -> str:
    cls = int(cls)
    return str(class_names[cls]) if 0 <= cls < len(class_names) else str(cls)
