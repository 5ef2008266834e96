"""Benchmark of lrpx.eval.pixel_flipping on VGG16-sized inputs.

Region perturbation as in the reference setting: 224 x 224 inputs, 8 x 8 regions (784), the
quadratic schedule (step k removes 2k - 1 regions; 28 steps reach all 784 regions), MoRF, with
the ``random`` and ``inpaint`` fills. Reported, as medians over ``--repeats`` runs after a warm-up:

- lrpx wall time, and its ratio to the same number of plain forward passes of the model in the
  same chunks (the floor any implementation pays);
- the reference package ``lrp-pf-auc`` (modules ``pf`` and ``lrp``) when it is installed
  (``pip install --no-deps lrp-pf-auc opencv-contrib-python-headless``; an optional extra, never
  a dependency of lrpx). Its 29 steps are the 28 quadratic steps plus a final all-grey step, so
  it feeds 30 inputs per image where lrpx feeds 29 (its step 28 is the all-removed step, which
  the inpaint fill turns grey);
- with OpenCV installed, the inpainting error against the true image (mean absolute error on
  the removed pixels, pixel range [0, 1]) of lrpx ``inpaint`` and OpenCV's TELEA.

The model is torchvision's VGG16 with random weights (no download); the images are
matplotlib's sample photograph and its mirror image.

Run ``python benchmarks/bench_eval.py`` (about 3 minutes on 2 CPU cores); ``--help`` for more.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import types

import numpy as np
import torch
import torchvision

import lrpx.eval

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2, help="images per evaluation")
    parser.add_argument("--chunk", type=int, default=16, help="lrpx batch_size (items per call)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of lrpx and plain")
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fills", nargs="+", default=["random", "inpaint"])
    parser.add_argument("--no-reference", action="store_true", help="skip lrp-pf-auc")
    return parser.parse_args(argv)


def photographs(batch: int, device: torch.device) -> torch.Tensor:
    """``(batch, 3, 224, 224)`` pixel images in [0, 1]: the sample photo, mirrored in turn."""
    from matplotlib import cbook
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as image:
        image = image.convert("RGB").resize((224, 224), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    images = [pixels.flip(-1) if b % 2 else pixels for b in range(batch)]
    return torch.stack(images).to(device)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def timed(function, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def median_time(function, repeats: int, device: torch.device) -> float:
    return statistics.median(timed(function, device) for _ in range(repeats))


def interleaved_medians(runs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median time of each run, the runs taken in turn so that drifting load hits all alike."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, function in runs.items():
            times[name].append(timed(function, device))
    return {name: statistics.median(values) for name, values in times.items()}


def run_lrpx(model, x, relevance, fill: str, chunk: int, steps: int = 28):
    return lrpx.eval.pixel_flipping(
        model, x, relevance, target=0, patch_size=8, schedule="quadratic", steps=steps,
        order="morf", fill=fill, normalizer=(MEAN, STD), pixel_range=(0.0, 1.0),
        batch_size=chunk, generator=torch.Generator(x.device).manual_seed(0),
    )


def run_plain(model, x, items: int, chunk: int) -> None:
    """The same number of inputs through the model in the same chunk sizes."""
    inputs = x.repeat(-(-chunk // x.shape[0]), 1, 1, 1)[:chunk]
    with torch.inference_mode():
        for start in range(0, items, chunk):
            model(inputs[: min(chunk, items - start)])


def import_reference():
    """The reference package's PixelFlipping, or ``None`` when it is not installed."""
    try:
        import sklearn.metrics  # noqa: F401  (the reference imports it; we never call it)
    except ImportError:
        stub = types.ModuleType("sklearn.metrics")
        stub.auc = lambda x, y: float(np.trapezoid(y, x))
        sys.modules.setdefault("sklearn", types.ModuleType("sklearn")).metrics = stub
        sys.modules["sklearn.metrics"] = stub
    try:
        from pf.core import PixelFlipping
    except ImportError:
        return None
    return PixelFlipping


def run_reference(PixelFlipping, model, x, relevance, fill: str) -> None:
    from pf.perturbation_modes.constants import PerturbModes

    def forward(inputs):
        with torch.inference_mode():
            return model(inputs)[:, 0]

    mode = PerturbModes.INPAINTING if fill == "inpaint" else PerturbModes.RANDOM
    flipping = PixelFlipping(perturbation_steps=29, perturbation_size=8, perturb_mode=mode)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a timing line per step
        flipping(x, relevance, forward)


def inpainting_error(pixels: torch.Tensor, shares=(0.1, 0.3, 0.6, 0.9)) -> list[tuple]:
    """MAE on removed 8 x 8 regions of lrpx inpaint and OpenCV TELEA (if installed)."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    image = pixels[:1].cpu()
    rows = []
    for share in shares:
        grid = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < share
        mask = grid.repeat_interleave(8, 2).repeat_interleave(8, 3)
        bounds = dict(low=torch.zeros(1, 1, 1, 1), high=torch.ones(1, 1, 1, 1))
        ours = lrpx.eval.Inpaint()(image, mask, None, **bounds)
        removed = mask.expand_as(image)
        row = [share, float((ours - image).abs()[removed].mean())]
        if cv2 is not None:
            bgr = (image[0].permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
            telea = cv2.inpaint(bgr, mask[0, 0].numpy().astype(np.uint8), 3, cv2.INPAINT_TELEA)
            telea = torch.from_numpy(telea[:, :, ::-1] / 255.0).permute(2, 0, 1)[None].float()
            row.append(float((telea - image).abs()[removed].mean()))
        rows.append(tuple(row))
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = torchvision.models.vgg16(weights=None).eval().to(device)
    pixels = photographs(args.batch, device)
    x = normalize(pixels)
    relevance = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    reference = None if args.no_reference else import_reference()
    if reference is not None and device.type == "cpu" and torch.cuda.is_available():
        print("lrp-pf-auc moves its tensors to cuda:0 when a GPU is visible: skipped; for CPU "
              "timings of it, run with CUDA_VISIBLE_DEVICES=")
        reference = None
    print(f"device {device} ({torch.get_num_threads()} threads), dtype {x.dtype}, batch "
          f"{args.batch} images of 3x224x224, lrpx chunk {args.chunk}, torch {torch.__version__}")
    print(f"VGG16 (random init), patch 8 (784 regions), quadratic schedule, MoRF; median of "
          f"{args.repeats} interleaved runs (reference: {args.reference_repeats}) after a "
          f"warm-up\n")
    print_table(measure(args, model, x, relevance, reference, device))
    if import_reference() is None and not args.no_reference:
        print("\nlrp-pf-auc is not installed: no reference timings")
    print_inpainting(inpainting_error(pixels))


def measure(args, model, x, relevance, reference, device) -> list[tuple]:
    """Table rows: plain forward passes, lrpx per fill, and the reference when installed."""
    items = args.batch * (1 + 28)
    runs = {"plain": lambda: run_plain(model, x, items, args.chunk)}
    for fill in args.fills:
        runs[fill] = lambda fill=fill: run_lrpx(model, x, relevance, fill, args.chunk)
        run_lrpx(model, x, relevance, fill, args.chunk, steps=2)  # warm-up
    run_plain(model, x, min(args.chunk, items), args.chunk)  # warm-up
    seconds = interleaved_medians(runs, args.repeats, device)
    plain = seconds["plain"]
    rows = [("plain forward", "-", items, plain, 1.0, None)]
    for fill in args.fills:
        theirs = None
        if reference is not None and fill in ("random", "inpaint"):
            def call(fill=fill):
                run_reference(reference, model, x, relevance, fill)

            theirs = median_time(call, args.reference_repeats, device)
            rows.append(("lrp-pf-auc", fill, args.batch * 30, theirs, theirs / plain, None))
        rows.append(("lrpx", fill, items, seconds[fill], seconds[fill] / plain,
                     None if theirs is None else theirs / seconds[fill]))
    return rows


def print_table(rows) -> None:
    print("| run | fill | model inputs | median wall time (s) | / plain forward | speed-up vs "
          "lrp-pf-auc |")
    print("|---|---|---|---|---|---|")
    for name, fill, inputs, seconds, ratio, speedup in rows:
        faster = "-" if speedup is None else f"{speedup:.1f}x"
        print(f"| {name} | {fill} | {inputs} | {seconds:.2f} | {ratio:.2f} | {faster} |")


def print_inpainting(rows) -> None:
    telea = len(rows[0]) == 3
    print("\nInpainting error on removed 8x8 regions of the photograph (MAE, pixels in [0, 1])")
    print("| removed | lrpx inpaint |" + (" OpenCV TELEA |" if telea else ""))
    print("|---|---|" + ("---|" if telea else ""))
    for row in rows:
        print(f"| {row[0]:.0%} | " + " | ".join(f"{v:.4f}" for v in row[1:]) + " |")


if __name__ == "__main__":
    main()
