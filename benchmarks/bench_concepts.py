"""Conditional heatmaps (CRP) of one image: lrpx against zennit-crp, same conditions, one run.

    python benchmarks/bench_concepts.py --model vgg16 --conditions 32 --size 224 --threads 2

``--conditions`` heatmaps of one ``--size`` image, each keeping one channel of ``--layer``
(the channels with the most relevance), with ``epsilon_plus`` (zennit: ``EpsilonPlus``): lrpx's
``lrpx.concepts.attribute`` (one forward, every condition one row of a batched backward)
against zennit-crp's ``CondAttribution`` with the same conditions in one call, interleaved,
medians after a warm-up; the time of one plain explanation is the baseline. Random weights,
float32. Also prints how far the two heatmaps are apart.

    python benchmarks/bench_concepts.py --atlas --model shapes_vgg --layer 0.10 --images 512 --top 8

``--atlas``: the concept atlas pass over a data set (:func:`lrpx.atlas.concept_atlas`, one
process, tables only, then once more with the PNG per channel) against plain explanations of
the same images in batches of ``--batch``, in images per second, in the same run. The images
are shapes images (``shapes_vgg``, ``shapes_resnet``, random weights) or random ``--size``
images (torchvision models, random weights).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import lrpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--layer", default="features.28")
    parser.add_argument("--conditions", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--atlas", action="store_true", help="time the atlas pass over a data set instead")
    parser.add_argument("--images", type=int, default=512, help="--atlas: images of the data set")
    parser.add_argument("--top", type=int, default=8, help="--atlas: reference images per channel and kind")
    parser.add_argument("--batch", type=int, default=16, help="--atlas: images per pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.atlas:
        atlas(args)
        return
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, args.size, args.size)
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus())
    target = int(model(x).argmax())
    channels, _, _ = lrpx.concepts.top_concepts(lrp, x, target, layer=args.layer, k=args.conditions)
    conditions = [{args.layer: [int(c)]} for c in channels[0]]
    steps = {
        "lrpx plain explanation": lambda: lrpx.explain(lrp, x, target),
        "lrpx conditional": lambda: lrpx.concepts.attribute(lrp, x, target, conditions=conditions),
    }
    try:
        from crp.attribution import CondAttribution
        from zennit.composites import EpsilonPlus

        attribution, composite = CondAttribution(model), EpsilonPlus()
        theirs = [{"y": [target], **c} for c in conditions]
        steps["zennit-crp conditional"] = lambda: attribution(x.clone().requires_grad_(), theirs, composite)
    except ImportError:
        print("zennit-crp is not installed (pip install --no-deps zennit-crp==0.6.0 zennit==0.5.1)")
    for fn in steps.values():
        fn()
    times = {k: [] for k in steps}
    for _ in range(args.repeat):
        for name, fn in steps.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            if name == "lrpx conditional":
                ours = result.relevance[0].sum(1)
            elif name.startswith("zennit"):
                other = result.heatmap
    base = statistics.median(times["lrpx plain explanation"])
    print(f"{args.model}, {args.conditions} conditions on {args.layer}, {args.size}² float32, {args.threads} threads, "
          f"torch {torch.__version__}, medians of {args.repeat}")
    print("| run | time | / plain explanation |\n|---|---|---|")
    for name, values in times.items():
        t = statistics.median(values)
        print(f"| {name} | {t:.2f} s | {t / base:.1f} |")
    if "zennit-crp conditional" in times:
        speedup = statistics.median(times["zennit-crp conditional"]) / statistics.median(times["lrpx conditional"])
        gap = float((ours - other).abs().max() / other.abs().max())
        print(f"\nlrpx is {speedup:.1f}x faster than zennit-crp; heatmaps differ by {gap:.1e} of their largest value")


def atlas(args) -> None:
    import tempfile

    from lrpx import datasets as ds
    from lrpx.atlas import concept_atlas
    from lrpx.atlas.tables import read_references

    torch.manual_seed(0)
    if args.model.startswith("shapes_"):
        model = ds.MODELS[args.model.removeprefix("shapes_")]().eval()
        images = ds.normalize(ds.make_shapes(args.images, seed=7).images)
    else:
        model = torchvision.models.get_model(args.model, weights=None).eval()
        images = torch.randn(args.images, 3, args.size, args.size)
    for p in model.parameters():
        p.requires_grad_(False)
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus())
    data = [(image, -1) for image in images]
    lrpx.explain(lrp, images[:args.batch])  # warm-up

    def plain() -> None:
        for batch in images.split(args.batch):
            lrpx.explain(lrp, batch)

    times: dict[str, list[float]] = {"plain": [], "tables": [], "figures": []}
    with tempfile.TemporaryDirectory() as folder:
        steps = {"plain": plain,
                 "tables": lambda: concept_atlas(lrp, data, layer=args.layer, out=f"{folder}/tables", top=args.top,
                                                 batch_size=args.batch, progress=False, figures=False, overwrite=True),
                 "figures": lambda: concept_atlas(lrp, data, layer=args.layer, out=f"{folder}/figures", top=args.top,
                                                  batch_size=args.batch, progress=False, overwrite=True)}
        for _ in range(args.repeat):  # interleaved, medians: other load on the machine hits every run alike
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        heatmaps = len(read_references(f"{folder}/tables"))
    plain, tables, figures = (statistics.median(times[k]) for k in ("plain", "tables", "figures"))
    channels = lrpx.explain(lrp, images[:1], record=[args.layer]).recorded[args.layer].shape[1]
    n = args.images
    print(f"{args.model}, layer {args.layer} ({channels} channels), {n} images of {tuple(images.shape[1:])}, "
          f"top {args.top}, batches of {args.batch}, {args.threads} threads, torch {torch.__version__}, medians of "
          f"{args.repeat}")
    print("| run | time | images/s | / plain explanations |\n|---|---|---|---|")
    print(f"| plain explanations | {plain:.1f} s | {n / plain:.1f} | 1.0 |")
    print(f"| atlas, tables | {tables:.1f} s | {n / tables:.1f} | {tables / plain:.1f} |")
    print(f"| atlas, tables and {channels} PNGs | {figures:.1f} s | {n / figures:.1f} | {figures / plain:.1f} |")
    print(f"\n{heatmaps} conditional heatmaps of reference images (at most 2 x {channels} channels x {args.top})")


if __name__ == "__main__":
    main()
