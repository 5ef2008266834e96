"""Conditional heatmaps (CRP) of one image: lrpx against zennit-crp, same conditions, one run.

    python benchmarks/bench_concepts.py --model vgg16 --conditions 32 --size 224 --threads 2

``--conditions`` heatmaps of one ``--size`` image, each keeping one channel of ``--layer``
(the channels with the most relevance), with ``epsilon_plus`` (zennit: ``EpsilonPlus``): lrpx's
``lrpx.concepts.attribute`` (every condition one row of one batched forward and backward)
against zennit-crp's ``CondAttribution`` with the same conditions in one call, interleaved,
medians after a warm-up; the time of one plain explanation is the baseline. Random weights,
float32. Also prints how far the two heatmaps are apart.
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
