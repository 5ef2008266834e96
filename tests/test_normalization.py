"""LayerNorm, GroupNorm and LayerNorm2d twins against a float64 oracle of AttnLRP's rule.

The oracle below never calls the twins: every normalised set (found by explicit loops
over the layer's index space) is a flat vector ``x`` with per-element ``w``, ``b``; the
layer is ``y = (A x) / sigma * w + b`` with the centring matrix ``A = I - 1/M`` and
``sigma = sqrt(mean((A x)^2) + eps)``. The relevance is

    R_n = n * R / stab(y),  n = y - b                   (bias takes its share)
    R_x[j] = sum_k A[k, j] x[j] R_n[k] / stab((A x)_k)  (epsilon rule of z = A x)

written as the contribution matrix ``A[k, j] x[j]`` of ``oracles.spread``. The oracle's
``y`` is checked against torch's own layer first.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn
from torchvision.models.convnext import LayerNorm2d

try:
    from . import oracles
    from .strategies import SCALE
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import oracles
    from strategies import SCALE

import lrpx
from lrpx.composites import Composite
from lrpx.layers import kind_of
from lrpx.layers.normalization import NORM_TWINS, LRPGroupNorm, LRPLayerNorm, LRPLayerNorm2d
from lrpx.rules import Epsilon, Gamma, Norm, Pass, ZPlus

DT = torch.float64
RTOL = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ oracle


def set_oracle(x, r, w, b, eps: float, e: float):
    """``(y, R_x)`` of one normalised set (flat float64 vectors), from the matrix form."""
    m = x.numel()
    a = torch.eye(m, dtype=DT) - torch.full((m, m), 1.0 / m, dtype=DT)
    c = a @ x
    n = c / torch.sqrt((c * c).mean() + eps) * w
    y = n + b
    r_n = n * r / oracles.stab(y, e)
    return y, oracles.spread(a * x[None, :], c, r_n, e)


def layer_sets(module: nn.Module, shape):
    """``(set id, weight, bias)`` per element of an input of ``shape``, by explicit loops."""
    ids = torch.zeros(shape, dtype=torch.long)
    w, b = torch.ones(shape, dtype=DT), torch.zeros(shape, dtype=DT)
    weight = None if module.weight is None else module.weight.detach().to(DT)
    bias = None if module.bias is None else module.bias.detach().to(DT)
    if isinstance(module, LayerNorm2d):  # one set per (sample, position): the channels
        for i in range(shape[0]):
            for h in range(shape[2]):
                for v in range(shape[3]):
                    ids[i, :, h, v] = (i * shape[2] + h) * shape[3] + v
        per_channel = True
    elif isinstance(module, nn.LayerNorm):  # one set per leading index
        k = len(module.normalized_shape)
        lead = shape[: len(shape) - k]
        for flat in range(math.prod(lead)):
            ids[_unravel(flat, lead)] = flat
        if weight is not None:
            w[...] = weight
        if bias is not None:
            b[...] = bias
        per_channel = False
    else:  # GroupNorm: one set per (sample, group)
        size = shape[1] // module.num_groups
        for i in range(shape[0]):
            for ch in range(shape[1]):
                ids[i, ch] = i * module.num_groups + ch // size
        per_channel = True
    if per_channel:
        for ch in range(shape[1]):
            if weight is not None:
                w[:, ch] = weight[ch]
            if bias is not None:
                b[:, ch] = bias[ch]
    return ids, w, b


def _unravel(flat: int, shape) -> tuple[int, ...]:
    index = []
    for s in reversed(shape):
        index.append(flat % s)
        flat //= s
    return tuple(reversed(index))


def oracle(module: nn.Module, x, relevance, e: float):
    """``(y, R_x)`` of the whole layer, set by set."""
    ids, w, b = layer_sets(module, tuple(x.shape))
    x, relevance = x.to(DT), relevance.to(DT)
    y, r_x = torch.empty_like(x), torch.empty_like(x)
    for k in range(int(ids.max()) + 1):
        mask = ids == k
        y[mask], r_x[mask] = set_oracle(x[mask], relevance[mask], w[mask], b[mask], module.eps, e)
    return y, r_x


# ------------------------------------------------------------------ cases

CASES = {
    "ln-last": (lambda: nn.LayerNorm(5), (3, 5)),
    "ln-seq": (lambda: nn.LayerNorm(6), (2, 3, 6)),
    "ln-two-dims": (lambda: nn.LayerNorm((3, 4)), (2, 3, 4)),
    "ln-no-affine": (lambda: nn.LayerNorm(4, elementwise_affine=False), (3, 4)),
    "ln-no-bias": (lambda: nn.LayerNorm((2, 3), bias=False), (2, 2, 3)),
    "gn-1-group": (lambda: nn.GroupNorm(1, 4), (2, 4, 3)),
    "gn-2-groups-4d": (lambda: nn.GroupNorm(2, 4), (2, 4, 3, 2)),
    "gn-C-groups": (lambda: nn.GroupNorm(3, 3), (2, 3, 2, 2)),
    "gn-no-affine": (lambda: nn.GroupNorm(2, 6, affine=False), (2, 6, 3)),
    "gn-no-bias": (lambda: nn.GroupNorm(2, 4, bias=False), (2, 4, 3)),
    "gn-2d-input": (lambda: nn.GroupNorm(2, 6), (3, 6)),
    "ln2d": (lambda: LayerNorm2d(3), (2, 3, 2, 3)),
    "ln2d-no-affine": (lambda: LayerNorm2d(4, elementwise_affine=False), (1, 4, 3, 2)),
}
TWIN_OF = {nn.LayerNorm: LRPLayerNorm, nn.GroupNorm: LRPGroupNorm, LayerNorm2d: LRPLayerNorm2d}


def make(name: str, dtype=DT, seed: int = 0):
    """``(module, x, relevance)`` with random parameters, input and output relevance."""
    factory, shape = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    module = factory().to(dtype).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    x = 3 * torch.randn(shape, generator=gen, dtype=DT) + 1
    relevance = torch.randn(shape, generator=gen, dtype=DT)
    return module, x.to(dtype), relevance.to(dtype)


def lrp(module, x, relevance):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    (r_x,) = torch.autograd.grad(y, x, grad_outputs=relevance)
    return r_x, y.detach()


def twin_of(module, rule):
    return TWIN_OF[type(module)].from_module(module, rule)


def assert_relevance_close(actual, expected, rtol=RTOL):
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------ forward and rule


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", CASES)
def test_forward_equals_torch(name, dtype):
    module, x, _ = make(name, dtype)
    twin = twin_of(module, Norm())
    with torch.no_grad():
        assert torch.equal(twin(x), module(x))


@pytest.mark.parametrize("name", CASES)
def test_oracle_forward_is_torch(name):
    module, x, relevance = make(name)
    y, _ = oracle(module, x, relevance, 1e-6)
    with torch.no_grad():
        torch.testing.assert_close(y, module(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("e", [1e-6, 0.5])
@pytest.mark.parametrize("name", CASES)
def test_relevance_matches_oracle(name, e):
    module, x, relevance = make(name)
    r_x, _ = lrp(twin_of(module, Norm(e)), x, relevance)
    assert_relevance_close(r_x, oracle(module, x, relevance, e)[1])


@pytest.mark.parametrize("name", CASES)
def test_pass_is_identity(name):
    module, x, relevance = make(name)
    r_x, _ = lrp(twin_of(module, Pass()), x, relevance)
    assert torch.equal(r_x, relevance)


def test_module_called_twice():
    """Per-call state: two calls of one twin in a forward give the composed oracle."""
    module, x, relevance = make("ln-seq")
    r_x, _ = lrp(lambda t: (twin := twin_of(module, Norm()))(twin(t)), x, relevance)
    with torch.no_grad():
        h = module(x)
    expected = oracle(module, x, oracle(module, h, relevance, 1e-6)[1], 1e-6)[1]
    assert_relevance_close(r_x, expected)


@pytest.mark.parametrize("name", ["ln-two-dims", "gn-2-groups-4d", "ln2d"])
def test_meta_device(name):
    """Shape-only tensors: nothing reads a value on the host (no ``.item()``, no sync)."""
    module, x, relevance = make(name)
    r_x, y = lrp(twin_of(module, Norm()).to("meta"), x.to("meta"), relevance.to("meta"))
    assert r_x.device.type == "meta" and r_x.shape == x.shape == y.shape


def test_incoming_relevance_untouched():
    module, x, relevance = make("gn-2-groups-4d")
    kept = relevance.clone()
    lrp(twin_of(module, Norm()), x, relevance)
    assert torch.equal(relevance, kept)


# ------------------------------------------------------------------ conservation


@st.composite
def norm_specs(draw):
    """``(kind, shape, groups, affine, seed)`` of a bias-free normalisation layer."""
    kind = draw(st.sampled_from(["ln", "ln2", "gn", "ln2d"]))
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(2, 6))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(draw(st.integers(0 if kind == "gn" else 2, 2))))
    groups = draw(st.sampled_from([d for d in range(1, channels + 1) if channels % d == 0]))
    shape = (batch, channels, *spatial)
    set_size = {"ln": shape[-1], "ln2": math.prod(shape[1:]), "gn": channels // groups * math.prod(spatial),
                "ln2d": channels}[kind]
    assume(set_size >= 2)  # a one-element set is constant: its relevance is 0
    return kind, shape, groups, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def build_bias_free(kind, shape, groups, affine):
    if kind == "gn":
        module = nn.GroupNorm(groups, shape[1], affine=affine)
    elif kind == "ln2d":
        module = LayerNorm2d(shape[1], elementwise_affine=affine, bias=False)
    else:
        module = nn.LayerNorm(shape[1:] if kind == "ln2" else shape[-1:], elementwise_affine=affine, bias=False)
    return module.to(DT).eval()


@given(spec=norm_specs())
def test_conservation_without_bias(spec):
    """sum R_x == sum R: the stabilizers (epsilon 1e-9) are all that leaks."""
    kind, shape, groups, affine, seed = spec
    module = build_bias_free(kind, shape, groups, affine)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=DT))
            if module.bias is not None and p is module.bias:
                p.zero_()
    x = SCALE * torch.randn(shape, generator=gen, dtype=DT)
    relevance = 0.5 + torch.rand(shape, generator=gen, dtype=DT)  # positive: a meaningful relative error
    r_x, _ = lrp(twin_of(module, Norm(1e-9)), x, relevance)
    torch.testing.assert_close(r_x.sum(), relevance.sum(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ convert, construction


def test_convert_tiny_mlp():
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3)).to(DT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = lrpx.convert(model, twins=NORM_TWINS)
    assert type(converted[1]) is LRPLayerNorm
    assert converted[1].rule == Composite().sum == Norm()
    x, relevance = torch.randn(5, 4, generator=gen, dtype=DT), torch.randn(5, 3, generator=gen, dtype=DT)
    r_x, y = lrp(converted, x, relevance)
    with torch.no_grad():
        assert torch.equal(y, model(x))
        h1 = model[0](x)
        h2 = model[2](model[1](h1))
    # oracle chain: Epsilon(1e-6) Linear, ReLU passes, LayerNorm rule, Epsilon(1e-6) Linear
    r = oracles.epsilon(oracles.dense_linear(model[3]), h2, relevance, 1e-6)
    r = oracle(model[1], h1, r, 1e-6)[1]
    r = oracles.epsilon(oracles.dense_linear(model[0]), x, r, 1e-6)
    assert torch.isfinite(r_x).all()
    assert_relevance_close(r_x, r)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kind_and_registry():
    assert NORM_TWINS == {nn.LayerNorm: LRPLayerNorm, nn.GroupNorm: LRPGroupNorm, LayerNorm2d: LRPLayerNorm2d}
    for cls in NORM_TWINS.values():
        assert cls.lrp_kind == "normalization"
        assert issubclass(cls, tuple(k for k, v in NORM_TWINS.items() if v is cls))
    assert kind_of(nn.LayerNorm(3), twins=NORM_TWINS) == "normalization"
    assert kind_of(LRPGroupNorm.from_module(nn.GroupNorm(1, 2), Norm())) == "normalization"


@pytest.mark.parametrize("rule", [Epsilon(), ZPlus(), Gamma(0.25)])
@pytest.mark.parametrize("name", ["ln-last", "gn-1-group", "ln2d"])
def test_other_rules_raise(name, rule):
    module, _, _ = make(name)
    cls = TWIN_OF[type(module)]
    with pytest.raises(TypeError, match=rf"{cls.__name__}: .* does not fit normalization layers .* rules for "
                       r"normalization layers: Pass, Norm"):
        cls.from_module(module, rule)


@pytest.mark.parametrize("name", ["ln-two-dims", "gn-2-groups-4d", "ln2d"])
def test_parameters_shared_and_unchanged(name):
    module, x, relevance = make(name)
    params = dict(module.named_parameters())
    values = {k: p.detach().clone() for k, p in params.items()}
    twin = twin_of(module, Norm())
    lrp(twin, x, relevance)
    assert dict(twin.named_parameters()) == params  # the same Parameter objects
    assert twin.state_dict().keys() == module.state_dict().keys()
    assert all(torch.equal(p, values[k]) and p.grad is None for k, p in params.items())
    assert "rule=Norm(epsilon=1e-06)" in repr(twin) and not hasattr(module, "rule")


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_low_precision(name, dtype):
    """Finite, and within 16 ulps of the largest relevance of the float64 oracle on the same
    (rounded) input, parameters and relevance."""
    module, x, relevance = make(name, dtype)
    exact = make(name)[0]
    with torch.no_grad():
        for p, q in zip(exact.parameters(), module.parameters()):
            p.copy_(q)
    expected = oracle(exact, x.to(DT), relevance.to(DT), 1e-2)[1]
    r_x, _ = lrp(twin_of(module, Norm(1e-2)), x, relevance)
    assert r_x.dtype == dtype and torch.isfinite(r_x).all()
    atol = 16 * torch.finfo(dtype).eps * float(expected.abs().max())
    torch.testing.assert_close(r_x.to(DT), expected, rtol=0, atol=atol)
