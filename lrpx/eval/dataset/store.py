"""The output folder of a data-set evaluation: what survives a killed run.

``OUT/run.json``
    The settings of the run; a run into the same folder with other settings is refused.
``OUT/results/part-RRRR-NNNNNN.parquet``
    The result rows of one batch of images of rank ``RRRR`` (long format, :data:`COLUMNS`).
    Each part is written to a temporary name and renamed, so it is whole or absent; the images
    in the parts are done, and a restarted run skips them.
``OUT/failures/part-RRRR-NNNNNN.csv``
    The images of that batch that could not be read, with the reason (merged into
    ``OUT/failures.csv`` by the report).
``OUT/relevance/part-RRRR-NNNNNN.safetensors``
    With ``save_relevance``: the channel-summed relevance maps of the batch, float16, one
    tensor ``"<method>/<index>"`` per image and method.
``OUT/progress/rank-RRRR.json``
    Images done and to do of each rank, for the progress bar of rank 0.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["COLUMNS", "RunStore", "RunMismatch", "read_results", "read_failures", "write_failures", "pyarrow"]

#: the columns of the result rows
COLUMNS = ("image", "index", "label", "target", "method", "fill", "order", "metric", "layer", "value", "curve")


class RunMismatch(ValueError):
    """The output folder holds a run with other settings."""


def pyarrow():
    """The ``pyarrow`` module, or an error that says how to install it."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("data-set evaluation writes Parquet files with pyarrow: pip install 'lrpx[data]' "
                          "(or pip install pyarrow)") from None
    return pyarrow


def _schema():
    pa = pyarrow()
    return pa.schema([("image", pa.string()), ("index", pa.int64()), ("label", pa.int64()), ("target", pa.int64()),
                      ("method", pa.string()), ("fill", pa.string()), ("order", pa.string()),
                      ("metric", pa.string()), ("layer", pa.string()), ("value", pa.float64()),
                      ("curve", pa.list_(pa.float64()))])


def _atomic_write(path: Path, write) -> None:
    """``write(temporary path)``, then rename onto ``path``: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


class RunStore:
    """The output folder of one run, seen from one rank.

    ``schema`` is the ``pyarrow`` schema of the result rows (default: the evaluation's
    :data:`COLUMNS`); any schema with an ``index`` column works, as that column marks the
    images done.
    """

    def __init__(self, out: Path, rank: int = 0, *, schema=None) -> None:
        self.out, self.rank, self.schema = Path(out), rank, schema
        self.results, self.failures = self.out / "results", self.out / "failures"
        self.relevance, self.progress = self.out / "relevance", self.out / "progress"

    def open(self, settings: dict, *, overwrite: bool = False) -> None:
        """Create the folders and the manifest, or check that the manifest holds ``settings``
        (rank 0 writes it; ``overwrite`` first deletes what the folder holds of a run)."""
        settings = json.loads(json.dumps(settings))  # as it reads back: tuples become lists
        if overwrite and self.rank == 0:
            for folder in (self.results, self.failures, self.relevance, self.progress):
                shutil.rmtree(folder, ignore_errors=True)
            for name in ("run.json", "summary.json", "summary.md", "failures.csv"):
                (self.out / name).unlink(missing_ok=True)
        manifest = self.out / "run.json"
        if manifest.exists():
            stored = json.loads(manifest.read_text())
            if stored.get("settings") != settings:
                changed = sorted(k for k in set(stored.get("settings", {})) | set(settings)
                                 if stored.get("settings", {}).get(k) != settings.get(k))
                raise RunMismatch(f"{self.out} holds a run with other settings (differing: {', '.join(changed)}); "
                                  "use another output folder, the same settings to resume, or --overwrite")
        elif self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _atomic_write(manifest, lambda p: p.write_text(json.dumps({"settings": settings}, indent=2)))
        for folder in (self.results, self.failures, self.relevance, self.progress):
            folder.mkdir(parents=True, exist_ok=True)

    def done(self) -> set[int]:
        """Indices of the images every part (of every rank) holds, failed ones included."""
        pa = pyarrow()
        indices: set[int] = set()
        for part in sorted(self.results.glob("part-*.parquet")):
            table = pa.parquet.read_table(part, columns=["index"])
            indices.update(table.column("index").to_pylist())
        for part in sorted(self.failures.glob("part-*.csv")):
            with part.open(newline="") as handle:
                indices.update(int(row["index"]) for row in csv.DictReader(handle))
        return indices

    def next_part(self) -> int:
        """The number of this rank's next part (after every part it wrote before)."""
        names = [p.name for p in self.results.glob(f"part-{self.rank:04d}-*.parquet")]
        names += [p.name for p in self.failures.glob(f"part-{self.rank:04d}-*.csv")]
        return 1 + max((int(n.split("-")[2].split(".")[0]) for n in names), default=-1)

    def write(self, part: int, rows: Sequence[dict], failures: Sequence[tuple[int, str, str]],
              relevance: dict | None = None) -> None:
        """Write one batch: its relevance maps, its failures, then its rows (the rows last:
        a part of rows marks its images done)."""
        name = f"part-{self.rank:04d}-{part:06d}"
        if relevance:
            from safetensors.torch import save_file

            _atomic_write(self.relevance / f"{name}.safetensors", lambda p: save_file(relevance, str(p)))
        if failures:
            _atomic_write(self.failures / f"{name}.csv", lambda p: write_failures(p, failures))
        if rows:
            pa = pyarrow()
            table = pa.Table.from_pylist(list(rows), schema=self.schema or _schema())
            _atomic_write(self.results / f"{name}.parquet", lambda p: pa.parquet.write_table(table, p))

    def report_progress(self, done: int, total: int) -> None:
        _atomic_write(self.progress / f"rank-{self.rank:04d}.json",
                      lambda p: p.write_text(json.dumps({"done": done, "total": total})))

    def progress_of_all(self) -> tuple[int, int]:
        """Images done and to do, summed over the ranks' progress files."""
        done = total = 0
        for path in self.progress.glob("rank-*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            done, total = done + state["done"], total + state["total"]
        return done, total


def write_failures(path: Path, failures: Iterable[tuple[int, str, str]]) -> None:
    """A CSV of ``index,image,reason`` rows."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "image", "reason"])
        writer.writerows(failures)


def read_results(out: Path):
    """All result rows of ``out`` as one ``pyarrow.Table`` (possibly empty) and the failures
    as a list of ``(index, image, reason)``, from whatever parts exist."""
    pa = pyarrow()
    out = Path(out)
    parts = sorted((out / "results").glob("part-*.parquet"))
    tables = [pa.parquet.read_table(p) for p in parts]
    table = pa.concat_tables(tables) if tables else _schema().empty_table()
    return table, read_failures(out)


def read_failures(out: Path) -> list[tuple[int, str, str]]:
    """The ``(index, image, reason)`` of the images of ``out`` that could not be read, sorted."""
    failures = []
    for part in sorted((Path(out) / "failures").glob("part-*.csv")):
        with part.open(newline="") as handle:
            failures += [(int(r["index"]), r["image"], r["reason"]) for r in csv.DictReader(handle)]
    return sorted(failures)
