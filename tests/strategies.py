"""Hypothesis strategies: random small float64 networks and their inputs.

Profiles (chosen with the environment variable ``HYPOTHESIS_PROFILE``, default ``ci``):

* ``ci``: derandomized, 50 examples per property, no deadline;
* ``dev``: random, 300 examples per property, no deadline (a longer local sweep).

A network is drawn as a :class:`NetSpec` (plain data, shown by hypothesis on
failure) and built by :func:`build_net`: a stack of Conv1d/Conv2d blocks
(conv, ReLU, optional MaxPool/AvgPool) or none, an optional AdaptiveAvgPool,
Flatten, hidden Linear+ReLU layers and a final Linear.  Weights are He-scaled
normal draws from a seeded ``torch.Generator``; biases are zero (``bias=False``
or a zero tensor) unless ``bias=True`` is asked for.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DT = torch.float64
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: typical magnitude of the inputs; large against the default stabilizers (1e-6)
#: so that conservation within 1e-6 is not eaten by Norm's fixed epsilon
SCALE = 100.0


@dataclass(frozen=True)
class NetSpec:
    dim: int  # 0: MLP on flat features, 1: Conv1d, 2: Conv2d
    in_shape: tuple  # per-sample input shape
    layers: tuple  # (("conv", c_out, k, stride, pad, mode), ("relu",), ...)
    bias: str  # "none" | "zero" | "random"
    seed: int


@dataclass(frozen=True)
class Case:
    spec: NetSpec
    batch: int
    input_kind: str  # "signed" | "box" (uniform in [-SCALE, SCALE])
    input_seed: int

    @property
    def model(self) -> nn.Sequential:
        return build_net(self.spec)

    @property
    def x(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.input_seed)
        shape = (self.batch, *self.spec.in_shape)
        if self.input_kind == "box":
            return SCALE * (2 * torch.rand(shape, generator=gen, dtype=DT) - 1)
        return SCALE * torch.randn(shape, generator=gen, dtype=DT)


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


@st.composite
def net_specs(
    draw,
    *,
    dims=(0, 1, 2),
    bias: bool = False,
    avgpool: bool | None = None,
    min_width: int = 2,
    max_width: int = 6,
    min_kernel: int = 1,
) -> NetSpec:
    """A random small network.

    ``min_width`` bounds conv channels and hidden features from below (and the
    input channels at ``min_width // 2``), ``min_kernel`` the kernel size (where the
    feature map allows).  ``avgpool``: ``True`` forces at least one average pool, ``False`` forbids them
    (their ``Norm`` rule has a fixed stabilizer), ``None`` draws.
    """
    if avgpool:  # pooling needs a spatial input
        dims = tuple(d for d in dims if d > 0) or (1, 2)
    dim = draw(st.sampled_from(dims))
    layers = []
    want_avg = avgpool
    if dim == 0:
        in_shape = (draw(st.integers(max(2, min_width), max_width + 2)),)
    else:
        channels = draw(st.integers(min(3, max(1, min_width // 2)), 3))
        spatial = tuple(draw(st.integers(4, 9 if dim == 1 else 7)) for _ in range(dim))
        in_shape = (channels, *spatial)
        size = list(spatial)
        n_blocks = draw(st.integers(1, 2))
        for block in range(n_blocks):
            k_max = min(3, *size)
            k = draw(st.integers(min(min_kernel, k_max), k_max))
            stride = draw(st.integers(1, 2))
            pad = draw(st.integers(0, (k - 1) // 2))
            mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
            c_out = draw(st.integers(min_width, max_width))
            layers += [("conv", c_out, k, stride, pad, mode), ("relu",)]
            size = [_conv_out(s, k, stride, pad) for s in size]
            pool = draw(st.sampled_from(["none", "max"] if avgpool is False else ["none", "max", "avg"]))
            if want_avg and block == n_blocks - 1:
                pool = "avg"
            if pool != "none" and min(size) >= 2:
                pool_pad = draw(st.integers(0, 1)) if pool == "avg" else 0
                layers.append((pool + "pool", 2, 2, pool_pad))
                size = [_conv_out(s, 2, 2, pool_pad) for s in size]
                if pool == "avg":
                    want_avg = False
        if avgpool is not False and (draw(st.booleans()) or want_avg):
            target = tuple(draw(st.integers(1, min(2, s))) for s in size)
            layers.append(("adaptiveavg", target))
            size = list(target)
        layers.append(("flatten",))
    if avgpool and not any(layer[0] in ("avgpool", "adaptiveavg") for layer in layers):
        layers.insert(len(layers) - 1, ("adaptiveavg", (1,) * dim))
    n_hidden = draw(st.integers(1 if dim == 0 else 0, 2))
    for _ in range(n_hidden):
        layers += [("linear", draw(st.integers(max(2, min_width), max_width + 4))), ("relu",)]
    layers.append(("linear", draw(st.integers(2, 4))))
    bias_kind = "random" if bias else draw(st.sampled_from(["none", "zero"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return NetSpec(dim, in_shape, tuple(layers), bias_kind, seed)


@st.composite
def cases(draw, *, input_kind: str = "signed", min_batch: int = 1, max_batch: int = 3, **net_kwargs) -> Case:
    spec = draw(net_specs(**net_kwargs))
    batch = draw(st.integers(min_batch, max_batch))
    return Case(spec, batch, input_kind, draw(st.integers(0, 2**31 - 1)))


_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}
_ADAPTIVE = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}


def build_net(spec: NetSpec) -> nn.Sequential:
    """The float64 eval-mode network described by ``spec`` (deterministic in ``spec.seed``)."""
    gen = torch.Generator().manual_seed(spec.seed)
    use_bias = spec.bias != "none"
    modules = []
    channels = spec.in_shape[0]
    flat_features = None
    size = list(spec.in_shape[1:])
    for layer in spec.layers:
        kind = layer[0]
        if kind == "conv":
            _, c_out, k, stride, pad, mode = layer
            modules.append(
                _CONV[spec.dim](channels, c_out, k, stride=stride, padding=pad, padding_mode=mode, bias=use_bias)
            )
            channels = c_out
            size = [_conv_out(s, k, stride, pad) for s in size]
        elif kind == "relu":
            modules.append(nn.ReLU())
        elif kind == "maxpool":
            modules.append(_MAXPOOL[spec.dim](layer[1], layer[2], layer[3]))
            size = [_conv_out(s, layer[1], layer[2], layer[3]) for s in size]
        elif kind == "avgpool":
            modules.append(_AVGPOOL[spec.dim](layer[1], layer[2], layer[3]))
            size = [_conv_out(s, layer[1], layer[2], layer[3]) for s in size]
        elif kind == "adaptiveavg":
            modules.append(_ADAPTIVE[spec.dim](layer[1]))
            size = list(layer[1])
        elif kind == "flatten":
            modules.append(nn.Flatten())
            flat_features = channels * math.prod(size)
        elif kind == "linear":
            fin = flat_features if flat_features is not None else spec.in_shape[0]
            modules.append(nn.Linear(fin, layer[1], bias=use_bias))
            flat_features = layer[1]
        else:
            raise ValueError(kind)
    model = nn.Sequential(*modules).to(DT)
    with torch.no_grad():
        for m in model:
            if isinstance(m, WEIGHTED):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=DT) * math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    if spec.bias == "random":
                        m.bias.copy_(SCALE * 0.3 * torch.randn(m.bias.shape, generator=gen, dtype=DT))
                    else:
                        m.bias.zero_()
    return model.eval()
