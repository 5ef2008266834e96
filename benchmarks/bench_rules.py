"""Micro-benchmarks of each rule on each layer type, mirroring ``lrpx/rules``.

    python benchmarks/bench_rules.py --threads 2 --repeat 20

Each row: median time of one forward + relevance backward of a single layer through
``lrpx.core.lrp_apply``, and its ratio to the plain forward + input-gradient of the same
layer measured in the same run (interleaved). ``+ReLU`` rows apply a fused ReLU (what
``convert`` does for a layer that only a ReLU reads). Inputs are ``>= 0`` (after a ReLU)
unless the row says "signed".
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from lrpx.core import lrp_apply
from lrpx.ops import AvgPoolOps, ConvOps, LinearOps
from lrpx.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus

from bench_explain import interleaved  # the same interleaved medians as the model benchmark

#: layer name -> (ops, input shape, weight shape, plain forward)
LAYERS = {
    "Linear 4096->4096, batch 32": (LinearOps(), (32, 4096), (4096, 4096), lambda x, w, b: F.linear(x, w, b)),
    "Conv2d 64->64 3x3, 8x56x56": (ConvOps(2, (1, 1), (1, 1), (1, 1), 1), (8, 64, 56, 56), (64, 64, 3, 3),
                                   lambda x, w, b: F.conv2d(x, w, b, padding=1)),
    "Conv2d 256->256 3x3, 8x14x14": (ConvOps(2, (1, 1), (1, 1), (1, 1), 1), (8, 256, 14, 14), (256, 256, 3, 3),
                                     lambda x, w, b: F.conv2d(x, w, b, padding=1)),
}
RULES = {
    "Epsilon": (Epsilon(), False, False),
    "Epsilon +ReLU": (Epsilon(), False, True),
    "Gamma(0.25)": (Gamma(0.25), False, False),
    "Gamma(0.25) +ReLU": (Gamma(0.25), False, True),
    "Gamma(0.25) signed": (Gamma(0.25), True, False),
    "ZPlus": (ZPlus(), False, False),
    "AlphaBeta(2, 1)": (AlphaBeta(2, 1), False, False),
    "AlphaBeta(2, 1) signed": (AlphaBeta(2, 1), True, False),
    "ZBox(-3, 3) signed": (ZBox(-3.0, 3.0), True, False),
    "Flat": (Flat(), False, False),
    "WSquare": (WSquare(), False, False),
}


def _step(forward, x, grad):
    def run():
        xin = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(forward(xin), xin, grad)
        return g
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device=cpu ({platform.processor() or 'cpu'}) dtype=float32 threads={args.threads} "
          f"torch={torch.__version__} repeat={args.repeat} (median)")
    print("| layer | rule | time (ms) | ratio to input-gradient |")
    print("|---|---|---|---|")
    for layer_name, (ops, x_shape, w_shape, plain) in LAYERS.items():
        w = torch.randn(w_shape) / w_shape[1] ** 0.5
        b = 0.01 * torch.randn(w_shape[0])
        x_signed = torch.randn(x_shape)
        x_pos = x_signed.relu()
        grad = torch.randn(plain(x_pos, w, b).shape)
        steps = {"input-gradient": _step(lambda x: plain(x, w, b), x_pos, grad)}
        for rule_name, (rule, signed, relu) in RULES.items():
            x = x_signed if signed else x_pos
            steps[rule_name] = _step(lambda x, rule=rule, relu=relu: lrp_apply(ops, rule, x, w, b, relu=relu), x, grad)
        times = interleaved(steps, torch.device("cpu"), args.repeat, warmup=3)
        base = times["input-gradient"]
        for k, t in times.items():
            print(f"| {layer_name} | {k} | {1000 * t:.2f} | {t / base:.2f} |", flush=True)
    pool = AvgPoolOps(2, (2, 2), (2, 2), (0, 0), False, True)
    x = torch.rand(8, 64, 56, 56)
    grad = torch.randn(8, 64, 28, 28)
    times = interleaved({"input-gradient": _step(lambda x: F.avg_pool2d(x, 2), x, grad),
                         "Norm": _step(lambda x: lrp_apply(pool, Norm(), x), x, grad)}, torch.device("cpu"), args.repeat)
    for k, t in times.items():
        print(f"| AvgPool2d 2x2, 8x64x56x56 | {k} | {1000 * t:.2f} | {t / times['input-gradient']:.2f} |")


if __name__ == "__main__":
    main()
