"""Random-init torchvision models with non-zero biases and random BatchNorm statistics,
plus an independent account of the relevance each LRP layer absorbs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lrpx
from lrpx.layers import Add


def randomized(name: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """torchvision ``name`` with random weights, non-zero biases and BatchNorm statistics.

    torchvision initialises biases to zero and BatchNorm to the identity, which hides bias
    and folding bugs.
    """
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(0.05 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return model.eval().to(dtype)


def sign0(z):
    return torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def stab(z, e):
    return z + e * sign0(z)


def _layer_forward(m: nn.Module, x, w, b):
    if isinstance(m, nn.Linear):
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)


def _bias(m, b, z):
    if b is None:
        return torch.zeros((), dtype=z.dtype)
    return b.view(1, -1, *([1] * (z.dim() - 2))) if z.dim() > 2 else b


def absorbed(m: nn.Module, x: torch.Tensor, z: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Sum of output relevance minus sum of input relevance that layer ``m`` should give,
    computed from the rule's definition in RULES.md (not from the library's fast forms)."""
    rule = m.rule
    if isinstance(rule, lrpx.rules.Pass):
        return torch.zeros((), dtype=R.dtype)
    if isinstance(rule, lrpx.rules.Norm):
        return (R * rule.epsilon * sign0(z) / stab(z, rule.epsilon)).sum()
    w, b = m.weight, m.bias
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp = None if b is None else b.clamp(min=0)
    bn = None if b is None else b.clamp(max=0)
    if isinstance(rule, lrpx.rules.Epsilon):
        kept = R * (z - _bias(m, b, z)) / stab(z, rule.epsilon)
    elif isinstance(rule, lrpx.rules.Gamma):
        g = rule.gamma
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        P, N = w + g * wp, w + g * wn
        bb_p = _bias(m, b, z) + g * _bias(m, bp, z)
        bb_n = _bias(m, b, z) + g * _bias(m, bn, z)
        z_p = _layer_forward(m, xp, P, None) + _layer_forward(m, xn, N, None) + bb_p
        z_n = _layer_forward(m, xp, N, None) + _layer_forward(m, xn, P, None) + bb_n
        kept = torch.where(z > 0, R, 0.0) * (z_p - bb_p) / stab(z_p, rule.epsilon) + \
            torch.where(z < 0, R, 0.0) * (z_n - bb_n) / stab(z_n, rule.epsilon)
    elif isinstance(rule, lrpx.rules.ZBox):
        low = torch.full_like(x, rule.low) if not torch.is_tensor(rule.low) else rule.low.expand_as(x)
        high = torch.full_like(x, rule.high) if not torch.is_tensor(rule.high) else rule.high.expand_as(x)
        z_b = _layer_forward(m, x, w, None) - _layer_forward(m, low, wp, None) - _layer_forward(m, high, wn, None)
        kept = R * z_b / stab(z_b, rule.epsilon)
    else:
        raise NotImplementedError(type(rule))
    return R.sum() - kept.sum()


class Recorder:
    """Records (module, input, output, output relevance) for every LRP layer call."""

    def __init__(self, model: nn.Module):
        self.calls = []
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, (lrpx.layers.Twin, Add))]

    def _hook(self, module, args, output):
        entry = {"module": module, "inputs": args, "output": output.detach(), "relevance": None}
        self.calls.append(entry)
        output.register_hook(lambda grad, e=entry: e.__setitem__("relevance", grad))

    def total_absorbed(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for c in self.calls:
            m, R = c["module"], c["relevance"]
            if isinstance(m, Add):
                total = total + (R * m.rule.epsilon * sign0(c["output"]) / stab(c["output"], m.rule.epsilon)).sum()
            else:
                total = total + absorbed(m, c["inputs"][0].detach(), c["output"], R)
        return total

    def remove(self):
        for h in self.handles:
            h.remove()
