"""Every rule against the float64 matrix oracle of ``tests/oracles.py``.

Each test builds one torch layer in float64, asks ``lrpx.layers.twin`` for its
LRP twin, propagates a random relevance ``R`` through the twin with autograd
(the relevance convention: the gradient of the converted model is the relevance) and
compares with the oracle, which implements docs/rules.md on an explicit matrix form of the layer.  The oracle's matrix is
checked against the torch module's own forward first, so a wrong oracle fails
loudly instead of agreeing with a wrong library.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from functools import lru_cache

import pytest
import torch
from torch import nn

try:
    from . import oracles
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import oracles

from lrpx.layers import twin
from lrpx.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, WSquare, ZBox, ZPlus

DT = torch.float64
BATCH = 2
RTOL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")


def assert_relevance_close(actual, expected):
    """Tight float64 comparison; the absolute floor scales with the values."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale)


def lrp(module, x, relevance):
    """Input relevance of ``module`` for output relevance ``relevance`` (and the output)."""
    x = x.detach().clone().requires_grad_()
    z = module(x)
    (r_in,) = torch.autograd.grad(z, x, grad_outputs=relevance)
    return r_in, z.detach()


# ------------------------------------------------------------------ layer grid


@dataclass(frozen=True)
class ConvCase:
    dim: int
    cin: int
    cout: int
    kernel: object
    stride: object = 1
    padding: object = 0
    mode: str = "zeros"
    dilation: object = 1
    groups: int = 1
    bias: bool = True
    size: tuple = ()

    def __str__(self):
        return (
            f"conv{self.dim}d-c{self.cin}to{self.cout}-k{self.kernel}-s{self.stride}"
            f"-p{self.padding}-{self.mode}-d{self.dilation}-g{self.groups}"
            f"-{'b' if self.bias else 'nob'}-in{self.size}"
        ).replace(" ", "")


HAND_CONV_CASES = [
    # 1d
    ConvCase(1, 2, 3, 3, size=(7,)),
    ConvCase(1, 4, 4, 3, stride=2, padding=1, mode="reflect", groups=2, size=(8,)),
    ConvCase(1, 3, 6, 2, padding="same", dilation=2, groups=3, bias=False, size=(6,)),
    ConvCase(1, 2, 4, 4, padding="same", mode="circular", groups=2, size=(5,)),
    ConvCase(1, 1, 2, 4, stride=3, padding="valid", size=(10,)),
    ConvCase(1, 2, 2, 3, padding=2, mode="replicate", dilation=2, groups=2, bias=False, size=(6,)),
    # padding wider than the kernel reach: some outputs see no real input at all
    ConvCase(1, 2, 3, 3, stride=2, padding=3, size=(5,)),
    ConvCase(1, 3, 3, 1, size=(4,)),
    # 2d
    ConvCase(2, 2, 3, (3, 3), padding=1, size=(5, 5)),
    ConvCase(2, 3, 2, (3, 2), stride=(2, 1), padding=(1, 0), mode="reflect", bias=False, size=(6, 5)),
    ConvCase(2, 2, 4, (2, 4), padding="same", mode="replicate", dilation=(1, 2), groups=2, size=(4, 6)),
    ConvCase(2, 2, 2, 3, padding=(1, 2), mode="circular", size=(4, 4)),
    ConvCase(2, 4, 4, 3, stride=2, padding=1, groups=4, size=(5, 6)),
    ConvCase(2, 2, 6, (3, 3), stride=(1, 2), padding="valid", dilation=(2, 1), groups=2, bias=False, size=(7, 6)),
    ConvCase(2, 3, 3, 3, padding="same", mode="reflect", groups=3, size=(4, 5)),
    ConvCase(2, 1, 2, (1, 3), stride=(3, 1), padding=(0, 1), size=(7, 4)),
    ConvCase(2, 2, 2, 2, stride=2, padding=1, mode="circular", dilation=2, size=(5, 5)),
    # 3d
    ConvCase(3, 2, 2, 2, size=(3, 3, 3)),
    ConvCase(3, 2, 4, (3, 2, 2), stride=(1, 2, 1), padding=(1, 0, 1), mode="reflect", groups=2, size=(3, 4, 3)),
    ConvCase(3, 1, 2, 3, padding="same", mode="replicate", bias=False, size=(3, 3, 4)),
    ConvCase(3, 2, 2, (2, 3, 2), stride=2, padding=1, mode="circular", dilation=(1, 1, 2), groups=2, size=(4, 4, 4)),
    ConvCase(3, 2, 3, 3, padding="same", dilation=(1, 2, 1), size=(3, 5, 3)),
]


def _random_conv_cases(n: int, seed: int) -> list[ConvCase]:
    """Valid random configurations (fixed seed, so the grid is reproducible)."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        dim = rng.choice([1, 2, 2, 3])
        groups = rng.choice([1, 1, 2, 3])
        cin = groups * rng.randint(1, 2)
        cout = groups * rng.randint(1, 2)
        kernel = tuple(rng.randint(1, 3) for _ in range(dim))
        dilation = tuple(rng.choice([1, 1, 2]) for _ in range(dim))
        size = tuple(rng.randint(3, 6 if dim < 3 else 4) for _ in range(dim))
        mode = rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        style = rng.choice(["int", "tuple", "same", "valid"])
        stride = tuple(rng.randint(1, 2) for _ in range(dim))
        if style == "same":
            padding, stride = "same", 1
            reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
            pads = [(r - r // 2) for r in reach]
        elif style == "valid":
            padding, pads = "valid", [0] * dim
        elif style == "int":
            padding = rng.randint(0, 2)
            pads = [padding] * dim
        else:
            padding = tuple(rng.randint(0, 2) for _ in range(dim))
            pads = list(padding)
        if mode == "reflect" and any(p >= s for p, s in zip(pads, size)):
            continue
        if mode == "circular" and any(p > s for p, s in zip(pads, size)):
            continue
        strides = (stride,) * dim if isinstance(stride, int) else stride
        outs = [
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, k, d, st in zip(size, pads, kernel, dilation, strides)
        ]
        if any(o < 1 for o in outs):
            continue
        cases.append(
            ConvCase(dim, cin, cout, kernel, stride, padding, mode, dilation, groups, rng.random() < 0.7, size)
        )
    return cases


CONV_CASES = HAND_CONV_CASES + _random_conv_cases(10, seed=2024)


@dataclass(frozen=True)
class LinearCase:
    fin: int
    fout: int
    bias: bool = True

    def __str__(self):
        return f"linear-{self.fin}to{self.fout}-{'b' if self.bias else 'nob'}"


LINEAR_CASES = [
    LinearCase(5, 3),
    LinearCase(7, 4, bias=False),
    LinearCase(1, 6),
    LinearCase(16, 9),
    LinearCase(12, 1, bias=False),
]

LAYER_CASES = LINEAR_CASES + CONV_CASES

CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _seed(case) -> int:
    return sum(map(ord, str(case))) * 7919 % (2**31)


def build_layer(case):
    """Fresh float64 module with deterministic random weights (and bias)."""
    gen = torch.Generator().manual_seed(_seed(case))
    if isinstance(case, LinearCase):
        module = nn.Linear(case.fin, case.fout, bias=case.bias)
        in_shape = (case.fin,)
    else:
        module = CONV_TYPES[case.dim](
            case.cin,
            case.cout,
            case.kernel,
            stride=case.stride,
            padding=case.padding,
            dilation=case.dilation,
            groups=case.groups,
            bias=case.bias,
            padding_mode=case.mode,
        )
        in_shape = (case.cin, *case.size)
    module = module.to(DT).eval()
    with torch.no_grad():
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen, dtype=DT) / math.sqrt(fan_in))
        if module.bias is not None:
            module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=gen, dtype=DT))
    return module, in_shape


@lru_cache(maxsize=None)
def layer_and_oracle(case):
    module, in_shape = build_layer(case)
    return module, in_shape, oracles.dense(module, in_shape)


def make_input(kind: str, in_shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((BATCH, *in_shape), generator=gen, dtype=DT)
    if kind == "relu":  # post-ReLU: nonnegative with exact zeros
        return x.clamp(min=0)
    if kind == "positive":
        return x.abs() + 0.1
    if kind == "nonpositive":
        return -x.clamp(min=0)
    assert kind == "signed"
    return x


def make_relevance(out_shape, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randn((BATCH, *out_shape), generator=gen, dtype=DT)


# ------------------------------------------------------------------ the oracle guards itself


@pytest.mark.parametrize("case", LAYER_CASES, ids=str)
def test_oracle_matrix_reproduces_forward(case):
    module, in_shape, dense = layer_and_oracle(case)
    x = make_input("signed", in_shape, 1)
    with torch.no_grad():
        expected = module(x)
    torch.testing.assert_close(oracles.dense_forward(dense, x), expected, rtol=1e-12, atol=1e-12)


def test_oracle_loops_match_identity_basis():
    """The looped conv matrix equals the one read off by pushing the identity basis."""
    for case in CONV_CASES:
        module, in_shape, dense = layer_and_oracle(case)
        n = math.prod(in_shape)
        basis = torch.eye(n, dtype=DT).reshape(n, *in_shape)
        bias, module.bias = module.bias, None
        try:
            with torch.no_grad():
                pushed = module(basis).reshape(n, -1).T
        finally:
            module.bias = bias
        torch.testing.assert_close(dense.weight @ dense.pad, pushed, rtol=0, atol=1e-14)


@pytest.mark.parametrize("case", [LINEAR_CASES[0], CONV_CASES[1], CONV_CASES[10]], ids=str)
def test_oracle_self_consistency(case):
    """Known identities of the formulas, checked on the oracle alone."""
    module, in_shape, dense = layer_and_oracle(case)
    x = make_input("signed", in_shape, 3)
    r = make_relevance(dense.out_shape, 3)
    # ZPlus == AlphaBeta(1, 0)
    torch.testing.assert_close(
        oracles.zplus(dense, x, r), oracles.alpha_beta(dense, x, r, 1.0, 0.0), rtol=1e-13, atol=1e-13
    )
    # Epsilon(e -> 0) == gradient x input on the bias-free layer
    nobias = replace(dense, bias=torch.zeros_like(dense.bias))
    z = oracles.dense_forward(nobias, x).reshape(BATCH, -1)
    grad = (r.reshape(BATCH, -1) / z) @ dense.weight @ dense.pad
    torch.testing.assert_close(
        oracles.epsilon(nobias, x, r, e=1e-14), x * grad.reshape(x.shape), rtol=1e-8, atol=1e-10
    )
    # conservation without bias: every z-rule hands on all of R (up to e)
    for name, fn in [
        ("epsilon", lambda: oracles.epsilon(nobias, x, r, 1e-14)),
        ("flat", lambda: oracles.flat(nobias, x, r, 1e-14)),
        ("wsquare", lambda: oracles.wsquare(nobias, x, r, 1e-14)),
        ("gamma", lambda: oracles.gamma(nobias, x, r, 0.5, 1e-14)),
    ]:
        total = fn().reshape(BATCH, -1).sum(1)
        expected = r.reshape(BATCH, -1)
        if name == "flat":  # outputs with no real input keep their relevance
            expected = expected * (dense.mask.sum(1) > 0)
        torch.testing.assert_close(total, expected.sum(1), rtol=1e-9, atol=1e-9, msg=name)


# ------------------------------------------------------------------ rules on Linear / Conv


@dataclass(frozen=True)
class RuleCase:
    name: str
    make: object  # () -> lrpx rule
    oracle: object  # (dense, x, R, in_shape) -> R_in
    inputs: tuple = ("relu", "signed")


def _channel_bound(in_shape, values, sign):
    """A per-channel (or per-feature) bound tensor of shape (1, C, 1, ...)."""
    c = in_shape[0]
    shape = (1, c) + (1,) * (len(in_shape) - 1)
    return sign * torch.tensor([values[i % len(values)] for i in range(c)], dtype=DT).reshape(shape)


def _elementwise_bound(in_shape, sign):
    """A bound with one value per input element, shape (1, *in_shape)."""
    gen = torch.Generator().manual_seed(sum(in_shape) + (5 if sign > 0 else 0))
    return sign * (1.0 + torch.rand((1, *in_shape), generator=gen, dtype=DT))


ZBOX_LOW, ZBOX_HIGH = -1.5, 2.0
CH_LOW = (1.2, 2.0, 1.6, 3.0)
CH_HIGH = (2.5, 1.1, 1.9, 2.2)

RULE_CASES = [
    RuleCase("epsilon-1e-6", lambda s: Epsilon(), lambda d, x, r, s: oracles.epsilon(d, x, r, 1e-6)),
    RuleCase("epsilon-0.25", lambda s: Epsilon(0.25), lambda d, x, r, s: oracles.epsilon(d, x, r, 0.25)),
    RuleCase("zplus", lambda s: ZPlus(), lambda d, x, r, s: oracles.zplus(d, x, r, 1e-6),
             ("relu", "signed", "nonpositive")),
    RuleCase("zplus-e0.1", lambda s: ZPlus(epsilon=0.1), lambda d, x, r, s: oracles.zplus(d, x, r, 0.1)),
    RuleCase("alphabeta-2-1", lambda s: AlphaBeta(2.0, 1.0),
             lambda d, x, r, s: oracles.alpha_beta(d, x, r, 2.0, 1.0, 1e-6),
             ("relu", "signed", "nonpositive")),
    RuleCase("alphabeta-1-0", lambda s: AlphaBeta(1.0, 0.0),
             lambda d, x, r, s: oracles.alpha_beta(d, x, r, 1.0, 0.0, 1e-6)),
    RuleCase("alphabeta-1.5-0.5-e0.2", lambda s: AlphaBeta(1.5, 0.5, epsilon=0.2),
             lambda d, x, r, s: oracles.alpha_beta(d, x, r, 1.5, 0.5, 0.2)),
    RuleCase("gamma-0.25", lambda s: Gamma(), lambda d, x, r, s: oracles.gamma(d, x, r, 0.25, 1e-6),
             ("relu", "positive", "signed", "nonpositive")),
    RuleCase("gamma-1.0-e0.1", lambda s: Gamma(1.0, epsilon=0.1),
             lambda d, x, r, s: oracles.gamma(d, x, r, 1.0, 0.1), ("relu", "signed")),
    RuleCase("gamma-0", lambda s: Gamma(0.0), lambda d, x, r, s: oracles.gamma(d, x, r, 0.0, 1e-6),
             ("relu", "signed")),
    RuleCase("zbox-scalar", lambda s: ZBox(ZBOX_LOW, ZBOX_HIGH),
             lambda d, x, r, s: oracles.zbox(d, x, r, ZBOX_LOW, ZBOX_HIGH, 1e-6), ("box",)),
    RuleCase("zbox-channel",
             lambda s: ZBox(_channel_bound(s, CH_LOW, -1), _channel_bound(s, CH_HIGH, 1), epsilon=1e-3),
             lambda d, x, r, s: oracles.zbox(
                 d, x, r, _channel_bound(s, CH_LOW, -1), _channel_bound(s, CH_HIGH, 1), 1e-3),
             ("box-channel",)),
    RuleCase("zbox-elementwise", lambda s: ZBox(_elementwise_bound(s, -1), _elementwise_bound(s, 1)),
             lambda d, x, r, s: oracles.zbox(d, x, r, _elementwise_bound(s, -1), _elementwise_bound(s, 1), 1e-6),
             ("box-elementwise",)),
    RuleCase("flat", lambda s: Flat(), lambda d, x, r, s: oracles.flat(d, x, r, 1e-6), ("signed",)),
    RuleCase("wsquare", lambda s: WSquare(), lambda d, x, r, s: oracles.wsquare(d, x, r, 1e-6), ("signed",)),
    RuleCase("wsquare-e0.5", lambda s: WSquare(epsilon=0.5), lambda d, x, r, s: oracles.wsquare(d, x, r, 0.5),
             ("relu",)),
]


def rule_input(kind, in_shape, seed):
    gen = torch.Generator().manual_seed(seed + 17)
    if kind == "box":  # inside [low, high]
        u = torch.rand((BATCH, *in_shape), generator=gen, dtype=DT)
        return ZBOX_LOW + (ZBOX_HIGH - ZBOX_LOW) * u
    if kind == "box-channel":
        u = torch.rand((BATCH, *in_shape), generator=gen, dtype=DT)
        lo, hi = _channel_bound(in_shape, CH_LOW, -1), _channel_bound(in_shape, CH_HIGH, 1)
        return lo + (hi - lo) * u
    if kind == "box-elementwise":
        u = torch.rand((BATCH, *in_shape), generator=gen, dtype=DT)
        lo, hi = _elementwise_bound(in_shape, -1), _elementwise_bound(in_shape, 1)
        return lo + (hi - lo) * u
    return make_input(kind, in_shape, seed)


def _rule_params():
    for rc in RULE_CASES:
        for kind in rc.inputs:
            for case in LAYER_CASES:
                yield pytest.param(rc, kind, case, id=f"{rc.name}-{kind}-{case}")


def check_twin(module, in_shape, dense, rule_case, kind, seed):
    x = rule_input(kind, in_shape, seed)
    r = make_relevance(dense.out_shape, seed)
    tw = twin(module, rule_case.make(in_shape))
    r_in, z = lrp(tw, x, r)
    with torch.no_grad():
        torch.testing.assert_close(z, module(x), rtol=1e-12, atol=1e-12)  # forward unchanged
    expected = rule_case.oracle(dense, x, r, in_shape)
    assert r_in.shape == x.shape and r_in.dtype == DT
    assert_relevance_close(r_in, expected)


@pytest.mark.parametrize("rule_case,kind,case", list(_rule_params()))
def test_rule_matches_oracle(rule_case, kind, case):
    module, in_shape, dense = layer_and_oracle(case)
    check_twin(module, in_shape, dense, rule_case, kind, _seed(case) + len(kind))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("x_values", [[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, -1.0, 0.0]], ids=["relu", "signed"])
@pytest.mark.parametrize(
    "name", ["alphabeta-2-1", "alphabeta-1.5-0.5-e0.2", "zplus", "gamma-0.25", "epsilon-1e-6"]
)
def test_empty_branch_is_exact(name, x_values, dtype):
    """A neuron whose contributions all have one sign (output 0 here, bias > 0).

    Its other branch has denominator 0 -> stab = e and a numerator that is exactly
    zero, so that branch adds exactly nothing.  An implementation that forms the
    numerator by cancellation (e.g. ``g(s; W) - g(s; W+)``) multiplies rounding
    noise by R/e; in float32 that is visible at the percent level.
    """
    rule_case = next(rc for rc in RULE_CASES if rc.name == name)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.5, 1.5, 2.0, 1.0], [-1.0, 2.0, 1.0, -0.5]]))
        lin.bias.copy_(torch.tensor([0.5, 1.0, -0.2]))
    x = torch.tensor([x_values])
    r = torch.tensor([[1.0, 1.0, 1.0]])
    dense = oracles.dense(lin.to(DT), (4,))
    expected = rule_case.oracle(dense, x.to(DT), r.to(DT), (4,))
    lin = lin.to(dtype)
    r_in, _ = lrp(twin(lin, rule_case.make((4,))), x.to(dtype), r.to(dtype))
    tol = RTOL if dtype == DT else 1e-5
    torch.testing.assert_close(r_in.to(DT), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------ BatchNorm as an affine layer

BN_CASES = [
    ("bn1d-flat", nn.BatchNorm1d, (4,), True),
    ("bn1d-seq", nn.BatchNorm1d, (3, 5), True),
    ("bn2d", nn.BatchNorm2d, (3, 4, 3), True),
    ("bn2d-noaffine", nn.BatchNorm2d, (2, 3, 3), False),
    ("bn3d", nn.BatchNorm3d, (2, 2, 3, 2), True),
]


@lru_cache(maxsize=None)
def batchnorm_and_oracle(index):
    name, cls, in_shape, affine = BN_CASES[index]
    gen = torch.Generator().manual_seed(100 + index)
    c = in_shape[0]
    bn = cls(c, affine=affine).to(DT)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen, dtype=DT))
        bn.running_var.copy_(0.5 + 2 * torch.rand(c, generator=gen, dtype=DT))
        if affine:  # signed scales exercise both weight signs
            bn.weight.copy_(torch.randn(c, generator=gen, dtype=DT))
            bn.bias.copy_(torch.randn(c, generator=gen, dtype=DT))
    bn.eval()
    return bn, in_shape, oracles.dense(bn, in_shape)


@pytest.mark.parametrize("index", range(len(BN_CASES)), ids=[c[0] for c in BN_CASES])
def test_batchnorm_oracle_forward(index):
    bn, in_shape, dense = batchnorm_and_oracle(index)
    x = make_input("signed", in_shape, 5)
    with torch.no_grad():
        torch.testing.assert_close(oracles.dense_forward(dense, x), bn(x), rtol=1e-12, atol=1e-12)


def _bn_params():
    for rc in RULE_CASES:
        for kind in rc.inputs:
            for index, c in enumerate(BN_CASES):
                yield pytest.param(rc, kind, index, id=f"{rc.name}-{kind}-{c[0]}")


@pytest.mark.parametrize("rule_case,kind,index", list(_bn_params()))
def test_batchnorm_rule_matches_oracle(rule_case, kind, index):
    bn, in_shape, dense = batchnorm_and_oracle(index)
    check_twin(bn, in_shape, dense, rule_case, kind, 31 * index + len(kind))


# ------------------------------------------------------------------ pooling with Norm

POOL_CASES = [
    ("avg1d-k2", lambda: nn.AvgPool1d(2), (2, 7)),
    ("avg1d-k3s2p1-ceil", lambda: nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True), (2, 8)),
    ("avg1d-k3-nopadcount", lambda: nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False), (1, 5)),
    ("avg2d-k2", lambda: nn.AvgPool2d(2), (2, 4, 5)),
    ("avg2d-k3s1p1", lambda: nn.AvgPool2d(3, stride=1, padding=1), (2, 4, 4)),
    ("avg2d-k32-s21-nopadcount-ceil",
     lambda: nn.AvgPool2d((3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True, count_include_pad=False), (1, 5, 4)),
    ("avg2d-divisor", lambda: nn.AvgPool2d(2, divisor_override=3), (2, 4, 4)),
    ("avg3d-k2", lambda: nn.AvgPool3d(2, stride=1), (2, 3, 3, 3)),
    ("avg3d-k3p1s2", lambda: nn.AvgPool3d(3, stride=2, padding=1), (1, 4, 4, 4)),
    ("adaptive1d-3", lambda: nn.AdaptiveAvgPool1d(3), (2, 7)),
    ("adaptive2d-1", lambda: nn.AdaptiveAvgPool2d(1), (3, 4, 4)),
    ("adaptive2d-3x2", lambda: nn.AdaptiveAvgPool2d((3, 2)), (2, 5, 5)),
    ("adaptive2d-none", lambda: nn.AdaptiveAvgPool2d((2, None)), (2, 5, 3)),
    ("adaptive3d-2", lambda: nn.AdaptiveAvgPool3d((2, 3, 2)), (1, 3, 4, 5)),
]


@pytest.mark.parametrize("epsilon", [1e-6, 0.3])
@pytest.mark.parametrize("kind", ["relu", "positive", "signed"])
@pytest.mark.parametrize("index", range(len(POOL_CASES)), ids=[c[0] for c in POOL_CASES])
def test_pooling_norm_matches_oracle(index, kind, epsilon):
    name, make, in_shape = POOL_CASES[index]
    pool = make()
    x = make_input(kind, in_shape, 40 + index)
    with torch.no_grad():
        z = pool(x)
    matrix = oracles.pooling_matrix(pool, in_shape)
    torch.testing.assert_close((matrix @ x.reshape(BATCH, -1).T).T, z.reshape(BATCH, -1), rtol=1e-12, atol=1e-12)
    r = make_relevance(z.shape[1:], 40 + index)
    tw = twin(pool, Norm(epsilon))
    r_in, z_tw = lrp(tw, x, r)
    torch.testing.assert_close(z_tw, z, rtol=1e-12, atol=1e-12)
    assert_relevance_close(r_in, oracles.norm(matrix, x, r, epsilon))


def test_norm_average_pool_by_hand():
    # AvgPool1d(2) on x = [1, 3, 2, 0]: means [2, 1]; R = [4, -1].
    # Norm: R_in_j = x_j * (1/2) * R_k / stab(mean_k); e = 0.5:
    #   window 0: stab(2) = 2.5 -> [1, 3] * 0.5 * 4 / 2.5 = [0.8, 2.4]
    #   window 1: stab(1) = 1.5 -> [2, 0] * 0.5 * -1 / 1.5 = [-2/3, 0]
    x = torch.tensor([[[1.0, 3.0, 2.0, 0.0]]], dtype=DT)
    r = torch.tensor([[[4.0, -1.0]]], dtype=DT)
    r_in, _ = lrp(twin(nn.AvgPool1d(2), Norm(0.5)), x, r)
    assert_relevance_close(r_in, torch.tensor([[[0.8, 2.4, -2 / 3, 0.0]]], dtype=DT))


# ------------------------------------------------------------------ Pass on activations

ACTIVATIONS = [
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.ReLU6,
]


@pytest.mark.parametrize("cls", ACTIVATIONS, ids=lambda c: c.__name__)
def test_pass_activation(cls):
    act = cls()
    x = make_input("signed", (3, 4), 7)
    r = make_relevance((3, 4), 7)
    r_in, z = lrp(twin(act, Pass()), x, r)
    torch.testing.assert_close(z, act(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r_in, r, rtol=0, atol=0)  # R_in = R exactly


def test_pass_relu_inplace_leaves_input_alone():
    x = make_input("signed", (5,), 8)
    keep = x.clone()
    tw = twin(nn.ReLU(inplace=True), Pass())
    with torch.no_grad():
        out = tw(x)
    torch.testing.assert_close(x, keep, rtol=0, atol=0)
    torch.testing.assert_close(out, keep.clamp(min=0), rtol=0, atol=0)
    r = make_relevance((5,), 8)
    r_in, _ = lrp(tw, x, r)
    torch.testing.assert_close(r_in, r, rtol=0, atol=0)


# ------------------------------------------------------------------ twin contract, argument checks


@pytest.mark.parametrize("case", [LINEAR_CASES[0], CONV_CASES[2], CONV_CASES[9]], ids=str)
def test_twin_shares_parameters(case):
    module, in_shape = build_layer(case)
    tw = twin(module, Epsilon())
    assert tw.weight is module.weight
    assert (tw.bias is None) == (module.bias is None)
    if module.bias is not None:
        assert tw.bias is module.bias
    assert isinstance(tw, type(module))
    assert set(tw.state_dict()) == set(module.state_dict())


@pytest.mark.parametrize(
    "alpha,beta", [(3.0, 1.0), (1.0, 1.0), (2.0, 0.5), (0.5, -0.5), (0.0, 1.0), (1.0, 0.5)]
)
def test_alpha_beta_rejects_invalid(alpha, beta):
    with pytest.raises(ValueError):
        AlphaBeta(alpha, beta)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (2.0, 1.0), (1.5, 0.5), (3.0, 2.0)])
def test_alpha_beta_accepts_valid(alpha, beta):
    AlphaBeta(alpha, beta)


def test_rule_object_is_shared_between_layers():
    """One rule instance on two layers; each layer still gets its own relevance."""
    rule = Gamma(0.5)
    cases = [LINEAR_CASES[3], LinearCase(9, 4)]
    m1, s1, d1 = layer_and_oracle(cases[0])
    m2, s2, d2 = layer_and_oracle(cases[1])
    t1, t2 = twin(m1, rule), twin(m2, rule)
    x = make_input("relu", s1, 9)
    x1 = x.detach().requires_grad_()
    h = t1(x1)
    out = t2(h.clamp(min=0))
    r = make_relevance(d2.out_shape, 9)
    (r_in,) = torch.autograd.grad(out, x1, grad_outputs=r)
    with torch.no_grad():
        h_plain = m1(x)
    r_mid = oracles.gamma(d2, h_plain.clamp(min=0), r, 0.5)
    assert_relevance_close(r_in, oracles.gamma(d1, x, r_mid, 0.5))
