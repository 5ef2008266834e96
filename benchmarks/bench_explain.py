"""Time an LRP explanation against a plain input-gradient on the same model, in one run.

    python benchmarks/bench_explain.py --models vgg16 resnet50 --batch 1 8 --threads 2
    python benchmarks/bench_explain.py --models --detection fasterrcnn_resnet50_fpn --size 800
    python benchmarks/bench_explain.py --models --segmentation deeplabv3_resnet50 --size 400
    python benchmarks/bench_explain.py --models timm:convnext_tiny timm:swin_tiny_patch4_window7_224 --batch 1

A model name ``timm:NAME`` is built by ``timm.create_model(NAME, pretrained=False)``.

Each row: median wall time of one explanation (forward + backward) and its ratio to the
input-gradient baseline (forward + backward to the input, parameters frozen), measured in
the same process, interleaved, after warm-up. zennit is timed too when it is installed.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

import lrpx


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(steps: dict, device, repeat: int, warmup: int = 2) -> dict:
    """Median seconds per step; the steps run in turn each round, so drift hits all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for _ in range(repeat):
        for k, fn in steps.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def peak_memory(fn, device) -> float | None:
    """Peak GPU memory of one call in MiB (None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


_RSS_CHILD = r"""
import sys, torch, torchvision, lrpx
name, method, batch, size, threads, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), getattr(torch, sys.argv[6])
torch.set_num_threads(threads)
torch.manual_seed(0)
if name.startswith("timm:"):
    import timm
    model = timm.create_model(name[5:], pretrained=False).eval().to(dtype)
else:
    model = getattr(torchvision.models, name)(weights=None).eval().to(dtype)
for p in model.parameters():
    p.requires_grad_(False)
if method != "input-gradient":
    model = lrpx.convert(model, None if method == "epsilon" else lrpx.composites.get_preset(method, **(
        {"low": -3.0, "high": 3.0} if method == "epsilon_gamma_box" else {})))
x = torch.randn(batch, 3, size, size, dtype=dtype)
target = torch.arange(batch) % 1000
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
def explain():
    xin = x.detach().requires_grad_()
    out = model(xin)
    r = torch.zeros_like(out)
    r[torch.arange(batch), target] = out.detach()[torch.arange(batch), target]
    return torch.autograd.grad(out, xin, r)[0]
explain()  # one-time initialisations (kernel caches) are not the explanation's memory
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
explain()
print(status("VmHWM") - base)
"""
#: large blocks come from and go back to the OS at once, so resident memory follows live tensors
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def peak_rss(name: str, method: str, batch: int, size: int, threads: int, dtype: str, runs: int = 3) -> float | None:
    """Peak resident memory of one explanation above the process's resident memory before it
    (MiB): the second explanation in a fresh process whose allocator returns large blocks to
    the OS at once, median of ``runs`` processes; None where Linux's /proc peak reset is
    unavailable."""
    import sys
    return median_peak([sys.executable, "-c", _RSS_CHILD, name, method, str(batch), str(size), str(threads), dtype],
                       runs)


def median_peak(command: list[str], runs: int) -> float | None:
    """The median of the last number ``command`` prints (a peak in MiB) over ``runs`` fresh
    processes, with the allocator settings of :data:`_MALLOC_ENV`; None if it fails."""
    import os
    import subprocess
    peaks = []
    for _ in range(runs):
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=True,
                                  env={**os.environ, **_MALLOC_ENV})
        except (subprocess.CalledProcessError, OSError):
            return None
        peaks.append(float(done.stdout.split()[-1]))
    return statistics.median(peaks)


def build(name: str) -> torch.nn.Module:
    """torchvision's ``name``, or timm's for ``timm:NAME`` (random weights)."""
    if name.startswith("timm:"):
        import timm
        return timm.create_model(name[5:], pretrained=False)
    return getattr(torchvision.models, name)(weights=None)


def grad_step(model, x, target):
    def run():
        xin = x.detach().requires_grad_()
        out = model(xin)
        r = torch.zeros_like(out)
        r[torch.arange(len(x)), target] = out.detach()[torch.arange(len(x)), target]
        (g,) = torch.autograd.grad(out, xin, r)
        return g
    return run


def zennit_step(model, x, target, name):
    """zennit's EpsilonGammaBox with its canonizers, registered once on a private copy (zennit
    attaches hooks to the model it is given), then called per explanation."""
    import copy

    from zennit.attribution import Gradient
    from zennit.composites import EpsilonGammaBox
    from zennit.torchvision import ResNetCanonizer, SequentialMergeBatchNorm

    canon = [ResNetCanonizer()] if name.startswith("resnet") else [SequentialMergeBatchNorm()]
    composite = EpsilonGammaBox(low=-3.0, high=3.0, canonizers=canon)
    own = copy.deepcopy(model)
    n = model(x[:1]).shape[1]
    onehot = torch.eye(n, device=x.device, dtype=x.dtype)[target]
    attributor = Gradient(own, composite)
    attributor.__enter__()  # kept registered for the rest of the run

    def run():
        out, rel = attributor(x, lambda o: o * onehot)
        return rel
    return run


#: presets timed for models with a callable target (segmentation, detection)
TASK_PRESETS = ("epsilon_gamma_box", "epsilon_plus")


def composite(preset: str) -> lrpx.composites.Composite:
    """The composite of ``preset``; ``epsilon_gamma_box`` bounded to [-3, 3] as elsewhere here."""
    return lrpx.composites.get_preset(preset, **({"low": -3.0, "high": 3.0} if preset == "epsilon_gamma_box" else {}))


def row(name, batch, method, t, base, mem=None, mem0=None) -> str:
    mem_txt = "-" if mem is None else f"{mem:.0f}"
    ratio_txt = "-" if mem is None or not mem0 else f"{mem / mem0:.2f}"
    return f"| {name} | {batch} | {method} | {1000 * t:.1f} | {t / base:.2f} | {mem_txt} | {ratio_txt} |"


def task_steps(model, x, gradient_score, target) -> dict:
    """The input-gradient of ``gradient_score(output)`` (a scalar) in the original model and an
    explanation of ``target`` per preset of :data:`TASK_PRESETS`, as callables."""
    def gradient():
        xin = x.detach().requires_grad_()
        return torch.autograd.grad(gradient_score(model(xin)), xin)[0]

    steps = {"input-gradient (score)": gradient}
    for preset in TASK_PRESETS:
        lrp = lrpx.convert(model, composite(preset))
        steps[f"lrpx {preset}"] = lambda lrp=lrp: lrpx.explain(lrp, x, target).relevance
    return steps


def task_rows(kind, name, args, device, dtype) -> None:
    """Rows of one segmentation or detection model (``kind``): each preset of
    :data:`TASK_PRESETS` against the input-gradient of the same score; on the CPU with
    ``--memory`` the peak resident memory of each in a fresh process."""
    steps = task_steps(*task_model(kind, name, args, device, dtype))
    times = interleaved(steps, device, args.repeat, warmup=1)
    memory = {k: peak_memory(steps[k], device) for k in times}
    if device.type == "cpu" and args.memory:
        memory = {k: task_peak_rss(kind, name, k, args) for k in times}
    base = "input-gradient (score)"
    for k, t in times.items():
        print(row(name, 1, k, t, times[base], memory[k], memory[base]), flush=True)


def task_model(kind, name, args, device, dtype):
    """``(model, input, gradient score, lrpx target)`` of a segmentation model (class 1's logits
    summed over the whole map, ``lrpx.targets.segment(1)``) or a detection model (the top
    detection: its reported score for the gradient, its class logit for lrpx,
    ``lrpx.targets.detection(0)``), random weights, one random image of ``--size``."""
    torch.manual_seed(0)
    extra = {"min_size": args.size, "max_size": args.size} if kind == "detection" else {}
    model = frozen(torchvision.models.get_model(name, weights=None, weights_backbone=None, **extra), device, dtype)
    x = torch.rand(1, 3, args.size, args.size, device=device, dtype=dtype)
    if kind == "detection":
        return model, x, lambda out: out[0]["scores"][0], lrpx.targets.detection(0)
    target = lrpx.targets.segment(1)
    return model, x, lambda out: target(out).sum(), target


def task_peak_rss(kind, name, method, args) -> float | None:
    """Peak resident memory (MiB) of one call of ``method`` in a fresh process (the second call,
    median of ``--memory-runs`` processes), as :func:`peak_rss` measures it."""
    import os
    import sys
    return median_peak([sys.executable, os.path.abspath(__file__), "--rss-task", kind, name, method, "--size",
                        str(args.size), "--threads", str(args.threads), "--dtype", args.dtype], args.memory_runs)


def _rss_task_child(kind, name, method, args) -> None:
    step = task_steps(*task_model(kind, name, args, torch.device("cpu"), getattr(torch, args.dtype)))[method]
    step()  # one-time initialisations are not the call's memory

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current resident memory
    base = status("VmRSS")
    step()
    print(status("VmHWM") - base)


def frozen(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    model = model.eval().to(device, dtype)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["vgg16", "resnet50"])
    p.add_argument("--detection", nargs="*", default=[], metavar="NAME",
                   help="torchvision detection models, e.g. fasterrcnn_resnet50_fpn (--size: the shorter side)")
    p.add_argument("--segmentation", nargs="*", default=[], metavar="NAME",
                   help="torchvision segmentation models, e.g. deeplabv3_resnet50 (--size: the input side)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-peers", action="store_true", help="skip zennit even when installed")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd input-gradient and epsilon_gamma_box models")
    p.add_argument("--memory", action="store_true",
                   help="CPU: also measure each method's peak resident memory in a fresh process")
    p.add_argument("--memory-runs", type=int, default=3, help="processes per memory measurement (median)")
    p.add_argument("--rss-task", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.rss_task:
        return _rss_task_child(*args.rss_task, args)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    try:
        import zennit  # noqa: F401
        peers = not args.no_peers
    except ImportError:
        peers = False
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device={device} ({name_dev}) dtype={args.dtype} threads={args.threads} torch={torch.__version__} "
          f"input={args.size}x{args.size} repeat={args.repeat} (median)")
    print("| model | batch | method | time (ms) | ratio to input-gradient | peak memory (MiB) | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = frozen(build(name), device, dtype)
        methods = {
            "input-gradient": model,
            "lrpx epsilon": lrpx.convert(model),
            "lrpx epsilon_gamma_box": lrpx.convert(model, lrpx.composites.epsilon_gamma_box(-3.0, 3.0)),
            "lrpx epsilon_plus_flat": lrpx.convert(model, lrpx.composites.epsilon_plus_flat()),
            "lrpx epsilon_alpha2_beta1": lrpx.convert(model, lrpx.composites.epsilon_alpha2_beta1()),
        }
        if args.compile:
            methods["input-gradient (compiled)"] = torch.compile(model)
            methods["lrpx epsilon_gamma_box (compiled)"] = torch.compile(methods["lrpx epsilon_gamma_box"])
        for batch in args.batch:
            x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
            target = torch.arange(batch, device=device) % 1000
            steps = {k: grad_step(m, x, target) for k, m in methods.items()}
            if peers and not name.startswith("timm:"):
                steps["zennit EpsilonGammaBox"] = zennit_step(model, x, target, name)
            times = interleaved(steps, device, args.repeat)
            base = times["input-gradient"]
            memory = {k: peak_memory(steps[k], device) for k in times}
            if device.type == "cpu" and args.memory:
                memory.update({k: peak_rss(name, k.removeprefix("lrpx "), batch, args.size, args.threads, args.dtype,
                                           args.memory_runs)
                               for k in times if not k.startswith("zennit") and "compiled" not in k})
            for k, t in times.items():
                print(row(name, batch, k, t, base, memory.get(k), memory.get("input-gradient")), flush=True)
            if args.compile:
                eager, compiled = (steps[f"lrpx epsilon_gamma_box{c}"]() for c in ("", " (compiled)"))
                err = float((compiled - eager).abs().max() / eager.abs().max())
                print(f"{name} batch {batch}: compiled vs eager epsilon_gamma_box relevance, "
                      f"max |difference| / max |eager| = {err:.1e}", flush=True)
    for name in args.segmentation:
        task_rows("segmentation", name, args, device, dtype)
    for name in args.detection:
        task_rows("detection", name, args, device, dtype)


if __name__ == "__main__":
    main()
