"""``lrpx concepts --data``: the concept atlas of a layer over a data set (streamed, split over
the processes of ``torchrun``, resumable, on the engine of ``lrpx evaluate --data``), and
``lrpx concepts explain``: the top concepts of one image's prediction."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .common import UsageError, check_choice, check_out, device, first_line, out_dir, positive

__all__ = ["add_concepts", "run_concepts", "run_concepts_explain"]


def add_concepts(subparsers) -> None:
    """The ``concepts`` command and its ``explain`` sub-command."""
    p = subparsers.add_parser(
        "concepts", help="concept atlas of a layer over a data set; `concepts explain` for one image",
        description="For every channel of --layer: the images of --data where it is most relevant for the "
        "prediction and most activated, each cropped to where the channel's conditional heatmap lies, and the mean "
        "relevance of each channel per predicted class. Writes OUT/maxima.parquet, OUT/class_concepts.parquet and "
        "OUT/atlas/channel-CCCC.png. Split over the processes of `torchrun --nproc-per-node N -m lrpx concepts "
        "--data ...`, and resumable.")
    _add_model(p, required=False)
    p.add_argument("--data", type=Path, default=None, metavar="DIR|LIST.csv",
                   help="an image folder (class sub-folders give labels) or a CSV of path[,label] rows")
    p.add_argument("--top", type=positive, default=8, metavar="K", help="reference images per channel and kind "
                   "(default: 8)")
    p.add_argument("--out", type=Path, default=Path("lrpx-concepts"), metavar="DIR",
                   help="output folder (default: %(default)s)")
    p.add_argument("--mass", type=float, default=0.8, metavar="F", help="share of a conditional heatmap, along "
                   "each axis, that a reference crop holds (default: 0.8)")
    p.add_argument("--limit", type=positive, default=None, metavar="N", help="the first N images only")
    p.add_argument("--workers", type=int, default=0, metavar="K", help="DataLoader processes decoding images "
                   "(default: 0)")
    p.add_argument("--images-per-batch", type=positive, default=16, metavar="N",
                   help="images per forward and backward pass (default: 16)")
    p.add_argument("--no-figures", action="store_true", help="write the tables only")
    p.add_argument("--overwrite", action="store_true", help="start over in an OUT that holds a run")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(handler=run_concepts)
    sub = p.add_subparsers(title="for one image", metavar="{explain}")
    e = sub.add_parser("explain", help="the top concepts of one image's prediction",
                       description="Explain the prediction of each image at --layer: one figure per image with its "
                       "top concepts (channels), their share of the layer's relevance, their conditional heatmaps and, "
                       "with --atlas, their reference crops by relevance from an `lrpx concepts --data` run; the shares "
                       "also go to IMAGE-concepts.json.")
    e.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (anything Pillow reads)")
    _add_model(e, required=True)
    e.add_argument("--top", type=positive, default=5, metavar="K", help="concepts per image (default: 5)")
    e.add_argument("--atlas", type=Path, default=None, metavar="DIR",
                   help="the OUT folder of an `lrpx concepts --data` run of the same model and layer")
    e.add_argument("--references", type=positive, default=4, metavar="N",
                   help="reference crops per concept from --atlas (default: 4)")
    e.add_argument("--out", type=Path, default=Path("lrpx-concepts-explain"), metavar="DIR",
                   help="output folder (default: %(default)s)")
    e.set_defaults(handler=run_concepts_explain)


def _add_model(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--model", required=required, metavar="NAME",
                   help="a torchvision classification model, or shapes_vgg, shapes_resnet")
    p.add_argument("--weights", default="DEFAULT", metavar="DEFAULT|PATH",
                   help="DEFAULT: torchvision's weights; PATH: a local state-dict file (default: %(default)s)")
    p.add_argument("--composite", default="epsilon_plus", metavar="NAME",
                   help="an LRP preset, e.g. epsilon_plus, epsilon_gamma_box (default: %(default)s)")
    p.add_argument("--layer", required=required, metavar="NAME",
                   help="the module whose output channels are the concepts, e.g. features.28 (vgg16), layer4 "
                   "(resnet50), 0.10 (shapes_vgg)")
    p.add_argument("--device", default="cpu", metavar="D", help="torch device, e.g. cpu, cuda (default: cpu)")


def _lrp_model(args: argparse.Namespace):
    """The classifier, its preprocessing and its converted copy."""
    import inspect

    from .. import composites
    from ..convert import convert
    from .models import load_classifier

    presets = composites.presets()
    check_choice("composite", [args.composite], list(presets))
    model, prep = load_classifier(args.model, args.weights)
    preset = presets[args.composite]
    low, high = prep.bounds()
    kwargs = {"low": low, "high": high} if "low" in inspect.signature(preset).parameters else {}
    return model, prep, convert(model, preset(**kwargs))


def _check_layer(lrp, layer: str, x) -> tuple[int, tuple[int, ...]]:
    from ..atlas import check_layer

    try:
        return check_layer(lrp, layer, x)
    except (ValueError, TypeError) as error:
        raise UsageError(f"--layer {layer}: {first_line(error)}") from None


def run_concepts(args: argparse.Namespace) -> int:
    from ..atlas import concept_atlas
    from ..eval.dataset import ImageFiles, RunMismatch, image_records
    from ..eval.dataset.sources import by_class_name
    from ..eval.dataset.store import pyarrow

    if args.data is None:
        raise UsageError("give --data DIR for the atlas of a data set, or explain images with "
                         "'lrpx concepts explain IMAGE --model NAME --layer NAME'")
    for flag, value in (("--model", args.model), ("--layer", args.layer)):
        if value is None:
            raise UsageError(f"the atlas needs {flag}")
    if not 0 < args.mass <= 1:
        raise UsageError(f"--mass must be in (0, 1], got {args.mass}")
    try:
        pyarrow()
        root, records, classes = image_records(args.data, limit=args.limit)
    except (ValueError, ImportError) as error:
        raise UsageError(first_line(error)) from None
    check_out(args.out)
    where = device(args.device)
    _, prep, lrp = _lrp_model(args)
    dataset = ImageFiles(root, by_class_name(records, classes, prep.categories), prep.transform)
    first = next((item[1] for item in map(dataset.__getitem__, range(len(dataset))) if item[1] is not None), None)
    if first is None:
        raise UsageError(f"no image of {args.data} could be read")
    _check_layer(lrp.to(where), args.layer, first[None].to(where))
    run = {"model": args.model, "weights": str(args.weights), "composite": args.composite,
           "data": str(Path(args.data).resolve()), "root": str(Path(root).resolve()), "limit": args.limit}
    try:
        concept_atlas(lrp, dataset, layer=args.layer, out=args.out, top=args.top, mass=args.mass,
                      batch_size=args.images_per_batch, workers=args.workers, device=where, overwrite=args.overwrite,
                      progress=not args.no_progress, run=run, class_names=prep.categories,
                      figures=not args.no_figures, to_pixels=prep.to_pixels)
    except RunMismatch as error:
        raise UsageError(str(error)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        _print_atlas(args.out)
    return 0


def _print_atlas(out: Path) -> None:
    from ..atlas import read_maxima

    rows = read_maxima(out)
    failures = (out / "failures.csv").read_text().splitlines()[1:]
    images = json.loads((out / "run.json").read_text())["settings"]["images"]
    channels = len({r["channel"] for r in rows})
    figures = out / "atlas"
    print(f"{images - len(failures)} images scanned, {len(failures)} failed; reference images of {channels} channels "
          f"in {out / 'maxima.parquet'}, concepts per class in {out / 'class_concepts.parquet'}"
          + (f", a figure per channel in {figures}" if figures.is_dir() else ""))


def run_concepts_explain(args: argparse.Namespace) -> int:
    from ..atlas.layer import conditional_heatmaps
    from ..concepts import top_concepts
    from ..explain import explain
    from .images import check_readable, load_images, output_names

    check_readable(args.images)
    where = device(args.device)
    atlas = _read_atlas(args) if args.atlas is not None else None
    check_out(args.out)
    _, prep, lrp = _lrp_model(args)
    lrp = lrp.to(where)
    x = load_images(args.images, prep.transform).to(where)
    channels, _ = _check_layer(lrp, args.layer, x[:1])
    if args.top > channels:
        raise UsageError(f"--top {args.top} is more than the {channels} channels of {args.layer}")
    try:
        from ..atlas.figures import require_matplotlib

        require_matplotlib()
        figures = True
    except ImportError as error:
        print(f"lrpx: {error}; writing the concept shares only, no figures", file=sys.stderr)
        figures = False
    out = out_dir(args.out)
    for path, name, image in zip(args.images, output_names(args.images), x):
        found, relevance, share = top_concepts(lrp, image[None], layer=args.layer, k=args.top)
        explained = explain(lrp, image[None])
        target = explained.target
        heat = conditional_heatmaps(lrp, image[None].expand(args.top, *image.shape), target.expand(args.top),
                                    args.layer, found[0]).sum(1).detach().cpu()
        concepts = [{"channel": int(c), "relevance": float(r), "share": float(s), "heatmap": h}
                    for c, r, s, h in zip(found[0], relevance[0], share[0], heat)]
        cls = int(target)
        name_of = prep.categories[cls] if cls < len(prep.categories) else str(cls)
        summary = {"image": str(path), "layer": args.layer, "prediction": cls, "class_name": name_of,
                   "concepts": [{k: c[k] for k in ("channel", "relevance", "share")} for c in concepts]}
        (out / f"{name}-concepts.json").write_text(json.dumps(summary, indent=2))
        print(f"{path}: {name_of}; top concepts at {args.layer}: "
              + ", ".join(f"channel {c['channel']} ({100 * c['share']:.1f}%)" for c in concepts))
        if figures:
            _figure(out / f"{name}-concepts.png", image, explained.relevance[0].sum(0).cpu(), concepts, atlas, prep,
                    args, f"{path.name}: {name_of}, top concepts at {args.layer}")
    return 0


def _read_atlas(args: argparse.Namespace) -> dict:
    """The maxima of an atlas run of the same model and layer, and the data set it read."""
    from ..atlas import read_maxima

    manifest = args.atlas / "run.json"
    if not manifest.is_file() or not (args.atlas / "maxima.parquet").is_file():
        raise UsageError(f"--atlas {args.atlas} holds no finished `lrpx concepts --data` run (no run.json and "
                         "maxima.parquet)")
    settings = json.loads(manifest.read_text())["settings"]
    for key, value in (("layer", args.layer), ("model", args.model), ("composite", args.composite)):
        if settings.get(key) != value:
            raise UsageError(f"--atlas {args.atlas} was made with {key} {settings.get(key)!r}, not {value!r}")
    return {"settings": settings, "rows": read_maxima(args.atlas)}


def _figure(path: Path, image, relevance, concepts: list[dict], atlas, prep, args, title: str) -> None:
    from ..atlas.figures import concepts_figure, read_heatmaps, reference_crops
    from ..eval.dataset import ImageFiles, Record

    pixels = prep.to_pixels(image[None].cpu())[0]
    for concept in concepts:
        concept["references"] = []
    if atlas is not None:
        rows = [r for r in atlas["rows"] if r["kind"] == "relevance" and r["rank"] <= args.references]
        dataset = ImageFiles(Path(atlas["settings"]["root"]), [Record(r["index"], r["image"], r["label"])
                                                               for r in sorted(rows, key=lambda r: r["index"])],
                             prep.transform)
        position = {record.index: k for k, record in enumerate(dataset.records)}
        heatmaps = read_heatmaps(args.atlas)
        missing = 0
        for concept in concepts:
            mine = sorted((r for r in rows if r["channel"] == concept["channel"]),
                          key=lambda r: r["rank"])
            concept["references"] = reference_crops(mine, _ByIndex(dataset, position), heatmaps, prep.to_pixels)
            missing += len(mine) - len(concept["references"])
        if missing:
            print(f"lrpx: {missing} reference image(s) of --atlas {args.atlas} could not be read below "
                  f"{dataset.root}; the figure shows the others", file=sys.stderr)
    fig = concepts_figure(pixels, relevance, concepts, title=title)
    fig.savefig(path, dpi=100)


class _ByIndex:
    """``dataset[image index]`` for a dataset of some of the images of a run."""

    def __init__(self, dataset, position: dict[int, int]) -> None:
        self.dataset, self.position = dataset, position

    def __getitem__(self, index: int):
        return self.dataset[self.position[index]]
