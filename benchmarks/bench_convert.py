"""Time of ``lrpx.convert`` (copy, canonize, assign, swap, fuse, sign analysis) per model.

    python benchmarks/bench_convert.py --models resnet50 densenet121 vgg16 --repeat 5

Random weights (torchvision, ``weights=None``), float32, the ``epsilon_gamma_box`` preset.
Prints the median of ``--repeat`` conversions after one warm-up, and beside it the time of
``copy.deepcopy`` of the model (the share of the conversion that copying alone takes).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import lrpx


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "densenet121", "vgg16"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    composite = lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeat}")
    print("| model | convert | deepcopy alone |\n|---|---|---|")
    for name in args.models:
        model = torchvision.models.get_model(name, weights=None).eval()
        convert = median_seconds(lambda: lrpx.convert(model, composite), args.repeat)
        deepcopy = median_seconds(lambda: copy.deepcopy(model), args.repeat)
        print(f"| {name} | {convert * 1e3:.0f} ms | {deepcopy * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
