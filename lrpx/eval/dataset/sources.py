"""Which images a data-set evaluation reads: an image folder (torchvision's ImageFolder layout,
or a flat folder) or a CSV list, in a fixed order, and the dataset that decodes them.

Every image is a :class:`Record`: its position in the fixed order (``index``), its path
relative to the data root (``path``, the ``image`` column of the results) and its label
(``-1`` when the source has none: the target is then the model's top class).
"""
from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ...files import ImageReadError, read_rgb

__all__ = ["Record", "IMAGE_EXTENSIONS", "image_records", "by_class_name", "ImageFiles", "collate"]

#: the file endings read as images (torchvision's ImageFolder's, in any case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Record:
    """One image of a data set."""

    index: int
    path: str
    label: int = -1


def image_records(source: str | Path, *, limit: int | None = None) -> tuple[Path, list[Record], list[str]]:
    """The images of ``source`` in a fixed order: ``(root, records, class names)``.

    * A folder with class sub-folders (torchvision's ImageFolder layout): the images below
      each sub-folder, labelled by the sub-folder's position among the sorted names (as
      ``torchvision.datasets.ImageFolder`` does; :func:`by_class_name` relabels them by the
      model's class names); files directly in the folder are ignored.
    * A folder of images without sub-folders: no labels.
    * A ``.csv`` file of ``path[,label]`` rows (paths relative to the file's folder, or
      absolute; an optional header ``path,label``; blank lines and ``#`` comments skipped).

    Records are sorted by path (ImageFolder: by class, then path). ``limit`` keeps the first
    ``limit`` of them.

    Raises
    ------
    ValueError
        A missing or empty source, a CSV row that is not ``path[,label]`` (naming its line),
        a negative or non-integer label.
    """
    source = Path(source)
    if not source.exists():
        raise ValueError(f"data source {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise ValueError(f"data source {source} is a file but not a .csv list of path[,label] rows")
        root, records, classes = source.parent, _csv_records(source), []
    else:
        root = source
        records, classes = _folder_records(source)
    if not records:
        raise ValueError(f"data source {source} holds no images (endings: {', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        records = records[:limit]
    return root, [Record(i, r.path, r.label) for i, r in enumerate(records)], classes


def by_class_name(records: Sequence[Record], classes: Sequence[str], categories: Sequence[str]) -> list[Record]:
    """Records of class folders relabelled by the model's class names: when every folder name is
    one of ``categories``, a label is the position of its folder's name there (instead of the
    folder's position among the sorted names)."""
    if not classes or not set(classes) <= set(categories):
        return list(records)
    index = {name: categories.index(name) for name in classes}
    return [Record(r.index, r.path, index[classes[r.label]]) for r in records]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _folder_records(folder: Path) -> tuple[list[Record], list[str]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        files = sorted(p.name for p in folder.iterdir() if _is_image(p))
        return [Record(0, name) for name in files], []
    records = []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).rglob("*")):
            if _is_image(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts):
                records.append(Record(0, path.relative_to(folder).as_posix(), label))
    return records, classes


def _csv_records(path: Path) -> list[Record]:
    records = []
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            cells = [c.strip() for c in row]
            if not cells or not any(cells) or cells[0].startswith("#"):
                continue
            if line == 1 and cells[0].lower() == "path":
                continue  # a header
            if len(cells) > 2 or not cells[0]:
                raise ValueError(f"{path}, line {line}: expected path[,label], got {','.join(row)!r}")
            label = -1
            if len(cells) == 2 and cells[1]:
                try:
                    label = int(cells[1])
                except ValueError:
                    raise ValueError(f"{path}, line {line}: the label {cells[1]!r} is not an integer") from None
                if label < 0:
                    raise ValueError(f"{path}, line {line}: the label {label} is negative")
            records.append(Record(0, cells[0], label))
    return records


class ImageFiles(torch.utils.data.Dataset):
    """The images of ``records`` below ``root``, decoded and preprocessed (in the DataLoader's
    workers). An image that cannot be read gives ``None`` and the reason, so that the run goes
    on and records the failure.

    Items are ``(record, image or None, reason or None, mask or None)``; ``masks`` is a folder
    with an object mask per image at the same relative path (any image ending; non-zero pixels
    are inside), resized like the image by ``mask_transform``.
    """

    def __init__(self, root: Path, records: Sequence[Record], transform: Callable, *, masks: Path | None = None,
                 mask_transform: Callable | None = None) -> None:
        self.root, self.records, self.transform = Path(root), list(records), transform
        self.masks, self.mask_transform = masks, mask_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        record = self.records[i]
        path = Path(record.path) if Path(record.path).is_absolute() else self.root / record.path
        try:
            image = self.transform(read_rgb(path))
            mask = self._mask(record) if self.masks is not None else None
        except ImageReadError as error:
            return record, None, str(error), None
        except Exception as error:  # a transform that fails on this image
            return record, None, f"{type(error).__name__}: {error}", None
        return record, image, None, mask

    def _mask(self, record: Record) -> Tensor:
        stem = Path(record.path).with_suffix("")
        found = [self.masks / stem.with_suffix(e) for e in IMAGE_EXTENSIONS
                 if (self.masks / stem.with_suffix(e)).is_file()]
        if not found:
            raise ImageReadError(f"no mask for {record.path} in {self.masks}")
        mask = self.mask_transform(read_rgb(found[0]))
        return mask.amax(0, keepdim=True) > 0


def collate(items):
    """A batch of :class:`ImageFiles` items: ``(records, images (N, C, H, W) or None, masks or None,
    failures)`` where ``failures`` lists ``(record, reason)`` of the images that failed."""
    good = [item for item in items if item[1] is not None]
    failures = [(item[0], item[2]) for item in items if item[1] is None]
    records = [item[0] for item in good]
    images = torch.stack([item[1] for item in good]) if good else None
    masks = torch.stack([item[3] for item in good]) if good and good[0][3] is not None else None
    return records, images, masks, failures
