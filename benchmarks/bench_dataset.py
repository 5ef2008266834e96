"""The data-set evaluation pipeline against the same work on tensors already in memory.

    python benchmarks/bench_dataset.py --images 200 2000 --threads 2

Writes ``--images`` shapes images (64x64 PNG, class folders) to a temporary folder, then for a
built-in model (random weights) with ``--methods`` and ``--metrics``:

* **pipeline**: ``lrpx.eval.evaluate_dataset`` on the image files (decode in ``--workers``
  DataLoader processes, or in the main one for 0; explain, score, write Parquet parts);
* **in memory**: the same explanations and metric rows for the same images, already decoded into
  one tensor, nothing written;
* **memory**: the peak resident memory of the pipeline in a fresh process for each count of
  ``--images`` (flat when the images stream);
* **processes**: the pipeline under ``torch.distributed.run`` with 1 and 2 processes (gloo),
  one thread each; with ``--device cuda``, one process per GPU (NCCL), as many as there are
  GPUs up to 2.

``--device cuda`` runs the model, the explanations and the metrics on the GPU (decoding stays
in the DataLoader's processes).

Ratios are measured in the same run; timings on a shared machine vary by 10-20%.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lrpx
from lrpx import datasets as ds
from lrpx.eval.dataset import ImageFiles, MetricSettings, evaluate_dataset, image_records
from lrpx.eval.dataset.engine import _as_methods, _evaluate_batch

SETTINGS = dict(patch_size=8, normalizer=(ds.MEAN, ds.STD))


def write_images(folder: Path, count: int) -> None:
    from PIL import Image

    shapes = ds.make_shapes(count, seed=11)
    for i in range(count):
        name = folder / ds.CLASSES[int(shapes.labels[i])]
        name.mkdir(parents=True, exist_ok=True)
        Image.fromarray((shapes.images[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(name / f"{i:05d}.png")


def transform():
    import torchvision.transforms as T

    return T.Compose([T.ToTensor(), T.Normalize(ds.MEAN, ds.STD)])


def model():
    torch.manual_seed(0)
    return ds.ShapesVGG().eval()


def pipeline(data: Path, out: Path, args, workers: int = 0) -> float:
    root, records, _ = image_records(data)
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    evaluate_dataset(model(), ImageFiles(root, records, transform()), args.methods, args.metrics, out=out,
                     settings=MetricSettings(**SETTINGS), batch_size=args.batch, workers=workers,
                     low=ds.zbox_bounds()[0], high=ds.zbox_bounds()[1], progress=False, report=False,
                     device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def in_memory(data: Path, args) -> float:
    root, records, _ = image_records(data)
    files = ImageFiles(root, records, transform())
    items = [files[i] for i in range(len(files))]
    device = torch.device(args.device)
    net = model().to(device)
    low, high = ds.zbox_bounds()
    methods = _as_methods(args.methods, low, high)
    starts = range(0, len(items), args.batch)
    # on a GPU the decoded batches wait there already; on the CPU each is stacked as it comes
    ready = [torch.stack([c[1] for c in items[i:i + args.batch]]).to(device) for i in starts] \
        if device.type != "cpu" else None
    start = time.perf_counter()
    explainers = {name: method(net) for name, method in methods.items()}
    for n, first in enumerate(starts):
        chunk = items[first:first + args.batch]
        batch = ready[n] if ready is not None else torch.stack([c[1] for c in chunk])
        _evaluate_batch(net, [c[0] for c in chunk], batch, None, methods, explainers,
                        args.metrics, device, MetricSettings(**SETTINGS), 0, False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[5]))
import bench_dataset as b
args = type("A", (), dict(methods=sys.argv[4].split(","), metrics=sys.argv[6].split(","), batch=16,
                          device=sys.argv[7]))()
b.pipeline(b.Path(sys.argv[2]), b.Path(sys.argv[3]), args)
# VmHWM: this process's own peak (ru_maxrss would include the parent's, kept across fork and exec)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


#: an allocator that hands large blocks back at once, so that the peak is the working set
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_rss(data: Path, out: Path, args) -> float:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(data), str(out),
                          ",".join(args.methods), str(args.threads), ",".join(args.metrics), args.device],
                         capture_output=True, text=True, check=True, env={**os.environ, **_MALLOC_ENV})
    return int(run.stdout.split()[-1]) / 1024


def processes(data: Path, out: Path, count: int, args) -> float:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(count), "-m", "lrpx",
               "evaluate", "--data", str(data), "--model", "shapes_vgg", "--weights", str(out.parent / "vgg.pt"),
               "--composite", *args.methods, "--metrics", *args.metrics, "--patch-size", "8", "--no-progress",
               "--images-per-batch", str(args.batch), "--device", args.device, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--methods", nargs="+", default=["epsilon_plus", "gradient"])
    parser.add_argument("--metrics", nargs="+", default=["pixel_flipping", "sparseness"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-processes", action="store_true", help="skip the 1 vs 2 process comparison")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: one process per GPU under torchrun")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "the CPU"
    print(f"torch {torch.__version__}, lrpx {lrpx.__version__}, {where}, {args.threads} threads, methods "
          f"{args.methods}, metrics {args.metrics}, {args.batch} images per batch; medians of {args.repeat} "
          "interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(model().state_dict(), tmp / "vgg.pt")
        results = {}
        for count in args.images:
            data = tmp / f"data-{count}"
            write_images(data, count)
            results[count] = {"rss_mib": peak_rss(data, tmp / f"rss-{count}", args)}
        count = args.images[0]
        data = tmp / f"data-{count}"
        in_memory(data, args)  # warm-up
        times: dict[str, list[float]] = {"in memory": [], **{f"pipeline, {w} workers": [] for w in args.workers}}
        for _ in range(args.repeat):
            times["in memory"].append(in_memory(data, args))
            for w in args.workers:
                times[f"pipeline, {w} workers"].append(pipeline(data, tmp / "pipeline", args, w))
        memory = statistics.median(times["in memory"])
        print("| run | images | wall time | images/s | / in memory |\n|---|---|---|---|---|")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"| {name} | {count} | {t:.2f} s | {count / t:.1f} | {t / memory:.2f} |")
        print("\n| images | peak RSS of the pipeline |\n|---|---|")
        for n, r in results.items():
            print(f"| {n} | {r['rss_mib']:.0f} MiB |")
        counts = [1, 2] if not args.device.startswith("cuda") else list(range(1, min(2, torch.cuda.device_count()) + 1))
        if not args.no_processes:
            walls = {n: processes(data, tmp / f"p{n}", n, args) for n in counts}
            print(f"\n| processes | wall time ({count} images, incl. start-up) |\n|---|---|")
            for n, wall in walls.items():
                print(f"| {n} | {wall:.1f} s ({walls[1] / wall:.2f}x) |")
        print(json.dumps({"images": count, **{k: statistics.median(v) for k, v in times.items()}}))


if __name__ == "__main__":
    main()
