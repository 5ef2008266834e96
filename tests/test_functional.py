"""Functional operations in forward code become layers with a rule: activations, average
pooling, means, products (gates, constant factors, two activations) and softmax. The
references are the rule formulas written out here in float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpx
from lrpx.layers import Add, Mean, Product

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64
E = 1e-6


def stab(z, e=E):
    return z + e * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def epsilon_linear(x, w, b, r, e=E):
    """LRP-epsilon of ``x @ w.T + b`` (rows of x)."""
    return x * ((r / stab(x @ w.T + b, e)) @ w)


def relevance(model, x, r_out=None):
    xin = x.clone().requires_grad_()
    y = model(xin)
    r_out = y.detach() if r_out is None else r_out
    (rel,) = torch.autograd.grad(y, xin, r_out)
    return y, rel


def _types(model):
    return [type(m) for m in model.modules()]


class TwoLinear(nn.Module):
    def __init__(self, act):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.act = nn.Linear(5, 4), nn.Linear(4, 3), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("act, cls", [
    (F.gelu, nn.GELU), (F.silu, nn.SiLU), (torch.sigmoid, nn.Sigmoid), (torch.relu, nn.ReLU),
    (lambda x: x.tanh(), nn.Tanh), (lambda x: F.leaky_relu(x, 0.2), nn.LeakyReLU),
    (lambda x: F.relu(x, inplace=True), nn.ReLU), (F.hardswish, nn.Hardswish),
])
def test_functional_activation_becomes_a_pass_layer(act, cls):
    model = TwoLinear(act).double().eval()
    lrp = lrpx.convert(model, fuse=False)  # fused, a ReLU leaves the graph
    assert any(issubclass(t, cls) and issubclass(t, lrpx.layers.Twin) for t in _types(lrp))
    x = torch.randn(3, 5, dtype=DT)
    y, rel = relevance(lrp, x)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    # fc2 epsilon, the activation passes relevance unchanged, fc1 epsilon
    h = model.fc1(x)
    a = act(h.clone())
    r_a = epsilon_linear(a, model.fc2.weight, model.fc2.bias, y.detach())
    expected = epsilon_linear(x, model.fc1.weight, model.fc1.bias, r_a)
    torch.testing.assert_close(rel, expected.detach(), rtol=1e-9, atol=1e-12)


class Pooled(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.how = nn.Conv2d(2, 3, 3, padding=1, bias=False), how

    def forward(self, x):
        h = self.conv(x)
        if self.how == "mean":
            return h.mean([2, 3])
        if self.how == "mean_keepdim":
            return torch.mean(h, dim=(2, 3), keepdim=True).flatten(1)
        if self.how == "adaptive":
            return torch.flatten(F.adaptive_avg_pool2d(h, (1, 1)), 1)
        return torch.flatten(F.avg_pool2d(h, 4), 1)


@pytest.mark.parametrize("how, cls", [("mean", Mean), ("mean_keepdim", Mean), ("adaptive", nn.AdaptiveAvgPool2d),
                                      ("avg", nn.AvgPool2d)])
def test_functional_pooling_and_means_take_the_norm_rule(how, cls):
    model = Pooled(how).double().eval()
    lrp = lrpx.convert(model)
    assert any(issubclass(t, cls) for t in _types(lrp))
    x = torch.randn(2, 2, 4, 4, dtype=DT)
    r_out = torch.randn(2, 3, dtype=DT)
    y, rel = relevance(lrp, x, r_out)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    # Norm on the global average: R_h = h * R / (n * stab(mean h)); then the conv's epsilon rule
    h = model.conv(x).detach()
    r_h = h * (r_out / stab(h.mean((2, 3))))[..., None, None] / 16
    w = model.conv.weight
    z = F.conv2d(x, w, padding=1)
    s = r_h / stab(z)
    expected = x * torch.nn.grad.conv2d_input(x.shape, w, s, padding=1)
    torch.testing.assert_close(rel, expected, rtol=1e-9, atol=1e-12)


def test_mean_over_everything():
    mean = Mean()
    x = torch.randn(3, 4, dtype=DT).requires_grad_()
    y = mean(x)
    (rel,) = torch.autograd.grad(y, x, torch.tensor(2.0, dtype=DT))
    torch.testing.assert_close(y, x.mean())
    torch.testing.assert_close(rel, x.detach() * 2.0 / (12 * stab(x.mean().detach())))


class SqueezeExcite(nn.Module):
    def __init__(self, gate=torch.sigmoid, gate_first=True):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.gate, self.gate_first = nn.Linear(3, 3), gate, gate_first

    def forward(self, x):
        s = self.gate(self.fc(x.mean([2, 3])))
        s = s.view(x.shape[0], -1, 1, 1)
        return s * x if self.gate_first else x * s


@pytest.mark.parametrize("gate", [torch.sigmoid, F.hardsigmoid, nn.Sigmoid()])
@pytest.mark.parametrize("gate_first", [True, False])
def test_gate_takes_no_relevance(gate, gate_first):
    model = SqueezeExcite(gate, gate_first).double().eval()
    lrp = lrpx.convert(model)
    products = [m for m in lrp.modules() if isinstance(m, Product)]
    assert len(products) == 1 and products[0].signal == (1 if gate_first else 0)
    x = torch.randn(2, 3, 4, 4, dtype=DT)
    r_out = torch.randn(2, 3, 4, 4, dtype=DT)
    y, rel = relevance(lrp, x, r_out)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rel, r_out, rtol=0, atol=0)  # signal-take-all: exactly R


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.layer_scale = nn.Parameter(torch.randn(2, 1, 1))

    def forward(self, x):
        return self.layer_scale * self.conv(x / 2.0) * 3.0


def test_constant_factors_pass_relevance():
    torch.manual_seed(0)
    model = Scaled().double().eval()
    lrp = lrpx.convert(model)
    assert sum(isinstance(m, Product) for m in lrp.modules()) == 3
    x = torch.randn(1, 2, 3, 3, dtype=DT)
    r_out = torch.randn(1, 2, 3, 3, dtype=DT)
    y, rel = relevance(lrp, x, r_out)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    xs = x / 2.0
    z = F.conv2d(xs, model.conv.weight)
    expected = xs * torch.nn.grad.conv2d_input(xs.shape, model.conv.weight, r_out / stab(z))
    torch.testing.assert_close(rel, expected.detach(), rtol=1e-9, atol=1e-12)


def test_product_of_two_activations_splits_evenly_and_broadcasts():
    a = torch.randn(2, 3, dtype=DT).requires_grad_()
    b = torch.randn(1, 3, dtype=DT).requires_grad_()
    r = torch.randn(2, 3, dtype=DT)
    y = Product(None)(a, b)
    ra, rb = torch.autograd.grad(y, (a, b), r)
    torch.testing.assert_close(y, a * b)
    torch.testing.assert_close(ra, r / 2)
    torch.testing.assert_close(rb, (r / 2).sum(0, keepdim=True))


def test_product_of_two_linear_branches_is_uniform():
    class Bilinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2, bias=False), nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.a(x) * self.b(x)

    torch.manual_seed(1)
    model = Bilinear().double().eval()
    lrp = lrpx.convert(model)
    (product,) = [m for m in lrp.modules() if isinstance(m, Product)]
    assert product.signal is None
    x = torch.randn(4, 3, dtype=DT)
    y, rel = relevance(lrp, x)
    half = y.detach() / 2
    expected = sum(epsilon_linear(x, lin.weight, torch.zeros(2, dtype=DT), half) for lin in (model.a, model.b))
    torch.testing.assert_close(rel, expected.detach(), rtol=1e-9, atol=1e-12)
    # conservation up to the stabilizers: sum R_in == sum R_out
    torch.testing.assert_close(rel.sum(), y.detach().sum(), rtol=1e-4, atol=0)


def test_shape_arithmetic_stays_plain_and_a_divisor_from_the_input_is_held():
    """``h / h.abs().sum()``: the divisor is a statistic held constant, so all of the output
    relevance reaches ``h`` (where the plain gradient would subtract a share through the sum)."""
    class Reshaping(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            n, c = x.shape
            h = self.fc(x).reshape(n * 2, c // 2)
            return h / h.abs().sum()

    torch.manual_seed(0)
    model = Reshaping().double().eval()
    lrp = lrpx.convert(model)
    assert sum(isinstance(m, Product) for m in lrp.modules()) == 1 and not any(isinstance(m, Add) for m in lrp.modules())
    x = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(lrp(x), model(x), rtol=0, atol=0)
    y, rel = relevance(lrp, x)
    r_h = y.detach().reshape(3, 4)  # y = h / S with S constant: R_h = R_y
    expected = epsilon_linear(x, model.fc.weight.detach(), model.fc.bias.detach(), r_h)
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-14)


def test_a_divisor_at_run_time_is_held_as_in_traced_code():
    """The same normalisation in forward code that cannot be traced (a data-dependent branch)
    takes the same relevance."""
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            if h.sum() > -1e9:  # data-dependent: runs with rules at run time
                h = h.clone()
                h /= h.abs().sum(-1, keepdim=True)
            return h

    torch.manual_seed(1)
    model = Untraceable().double().eval()
    lrp = lrpx.convert(model)
    assert "" in lrp.lrpx_graph.oplevel  # the root runs with its rules at run time
    x = torch.randn(3, 4, dtype=DT)
    torch.testing.assert_close(lrp(x), model(x), rtol=0, atol=0)
    y, rel = relevance(lrp, x)
    expected = epsilon_linear(x, model.fc.weight.detach(), model.fc.bias.detach(), y.detach())
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-14)


def test_functional_softmax_gets_the_attnlrp_rule():
    model = TwoLinear(lambda h: F.softmax(h, dim=-1)).double().eval()
    lrp = lrpx.convert(model)
    assert any(t.__name__ == "LRPSoftmax" for t in _types(lrp))
    x = torch.randn(3, 5, dtype=DT)
    y, rel = relevance(lrp, x)
    h = model.fc1(x).detach()
    s = torch.softmax(h, -1)
    r_s = epsilon_linear(s, model.fc2.weight, model.fc2.bias, y.detach())
    r_h = h * (r_s - s * r_s.sum(-1, keepdim=True))
    expected = epsilon_linear(x, model.fc1.weight, model.fc1.bias, r_h)
    torch.testing.assert_close(rel, expected.detach(), rtol=1e-9, atol=1e-12)


def test_parameter_in_an_unrewritten_operation_is_refused():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.mix = nn.Parameter(torch.randn(3, 3))

        def forward(self, x):
            return torch.atan2(self.fc(x), self.mix)

    with pytest.raises(lrpx.UnsupportedModuleError, match=r"'<root>' \(.*Mixer\)"):
        lrpx.convert(Mixer())


def test_product_with_a_parameter_is_a_linear_map():
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(3, 3)
            self.mix = nn.Parameter(torch.randn(3, 2))

        def forward(self, x):
            return self.fc(x) @ self.mix

    model = Mixer().double().eval()
    lrp = lrpx.convert(model)
    x = torch.randn(4, 3, dtype=DT)
    y, rel = relevance(lrp, x)
    h = model.fc(x).detach()
    r_h = epsilon_linear(h, model.mix.detach().T, torch.zeros(2, dtype=DT), y.detach())
    expected = epsilon_linear(x, model.fc.weight, model.fc.bias, r_h)
    torch.testing.assert_close(rel, expected.detach(), rtol=1e-9, atol=1e-12)


def test_class_token_and_position_embedding_absorb_like_biases():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(3, 3, bias=False)
            self.token = nn.Parameter(torch.randn(1, 1, 3))
            self.position = nn.Parameter(torch.randn(1, 3, 3))

        def forward(self, x):
            x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.fc(x + self.position)

    model = Tokens().double().eval()
    lrp = lrpx.convert(model)
    x = torch.rand(2, 2, 3, dtype=DT)
    xin = x.clone().requires_grad_()
    y = lrp(xin)
    rel, r_token, r_position = torch.autograd.grad(y, (xin, lrp.token, lrp.position), y.detach(), allow_unused=True)
    torch.testing.assert_close(y, model(x))
    # the class token, joined to the activations, is one of them; the position embedding takes
    # its share of the sum like a bias, and the share stays there (no gradient reaches it)
    z = (torch.cat([model.token.expand(2, -1, -1), x], dim=1) + model.position).detach()
    r_z = z * ((y.detach() / (y.detach() + 1e-6 * torch.where(y >= 0, 1.0, -1.0))) @ model.fc.weight.detach())
    r_cat = r_z * (z - model.position.detach()) / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0))
    torch.testing.assert_close(rel, r_cat[:, 1:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r_token, r_cat[:, :1].sum(0, keepdim=True), rtol=1e-9, atol=1e-12)
    assert r_position is None


# ------------------------------------------------------------------ conservation properties

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import strategies  # noqa: E402,F401  (registers the hypothesis profiles)
from lrpx.layers.attention import lrp_matmul  # noqa: E402


@given(seed=st.integers(0, 2**16), batch=st.lists(st.integers(1, 3), max_size=2),
       m=st.integers(1, 4), k=st.integers(1, 4), n=st.integers(1, 4), broadcast=st.booleans())
def test_matmul_rule_conserves(seed, batch, m, k, n, broadcast):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(*batch, m, k, generator=g, dtype=DT).requires_grad_()
    b = torch.rand(*([1] * len(batch) if broadcast else batch), k, n, generator=g, dtype=DT).requires_grad_()
    y = lrp_matmul(a, b, epsilon=1e-12)
    r = torch.randn(y.shape, generator=g, dtype=DT)
    ra, rb = torch.autograd.grad(y, (a, b), r)
    assert ra.shape == a.shape and rb.shape == b.shape
    torch.testing.assert_close(ra.sum() + rb.sum(), r.sum(), rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 2**16), shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
       data=st.data(), keepdim=st.booleans())
def test_mean_conserves(seed, shape, data, keepdim):
    dims = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, unique=True))
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=DT) + 0.1).requires_grad_()
    y = Mean(tuple(dims), keepdim, lrpx.rules.Norm(1e-12))(x)
    torch.testing.assert_close(y, x.mean(dims, keepdim=keepdim))
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    (rel,) = torch.autograd.grad(y, x, r)
    torch.testing.assert_close(rel.sum(), r.sum(), rtol=1e-9, atol=1e-9)


class GatedResidual(nn.Module):
    """conv-ReLU, a squeeze-excitation gate, a residual sum, a mean and a Linear: bias-free."""

    def __init__(self, channels: int, hidden: int, gate, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.squeeze = nn.Linear(channels, hidden, bias=False)
        self.excite = nn.Linear(hidden, channels, bias=False)
        self.head = nn.Linear(channels, 3, bias=False)
        self.gate = gate
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)

    def forward(self, x):
        h = F.relu(self.conv(x))
        s = self.gate(self.excite(F.relu(self.squeeze(h.mean((2, 3))))))
        h = h * s[:, :, None, None] + x
        return self.head(h.mean([2, 3]))


@given(seed=st.integers(0, 2**16), channels=st.integers(1, 4), hidden=st.integers(1, 3),
       size=st.integers(2, 5), gate=st.sampled_from([torch.sigmoid, F.hardsigmoid]))
def test_gated_residual_net_conserves(seed, channels, hidden, size, gate):
    model = GatedResidual(channels, hidden, gate, seed).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=lrpx.rules.Epsilon(1e-12), sum=lrpx.rules.Norm(1e-12)))
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=DT) + 0.05
    y, rel = relevance(lrp, x)
    torch.testing.assert_close(y, model(x), rtol=1e-12, atol=1e-12)
    # every operation conserves with zero biases; the gate branch takes nothing
    scale = y.detach().abs().sum()
    torch.testing.assert_close(rel.sum(), y.detach().sum(), rtol=0, atol=1e-9 * float(scale) + 1e-12)


class _Quotients(nn.Module):
    """``h * (2 / h.abs().sum(-1, keepdim=True))``, ``h / p.exp()`` with a parameter and
    ``torch.divide``: traced, or (``run_time``) with a data-dependent branch, at run time."""

    def __init__(self, run_time: bool):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.p = nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 2.0]))
        self.run_time = run_time

    def forward(self, x):
        h = self.fc(x)
        if self.run_time and bool(h.sum() > -1e9):
            h = h.clone()
        scale = 2 / h.abs().sum(-1, keepdim=True)  # a number over an activation: a constant
        return torch.divide(h * scale, self.p.exp() / (h * h).sum())


@pytest.mark.parametrize("run_time", [False, True], ids=["traced", "run-time"])
def test_quotients_hold_their_divisors_alike_traced_and_at_run_time(run_time):
    """Every divisor computed from the input is a constant, whatever the numerator: the output
    relevance passes whole to ``h`` (the epsilon rule of ``fc`` after it, by hand), and no
    operation goes without a rule."""
    import warnings

    torch.manual_seed(2)
    model = _Quotients(run_time).double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        lrp = lrpx.convert(model)
        assert ("" in lrp.lrpx_graph.oplevel) is run_time
        x = torch.randn(3, 4, dtype=DT)
        torch.testing.assert_close(lrp(x), model(x), rtol=0, atol=0)
        y, rel = relevance(lrp, x)
    expected = epsilon_linear(x, model.fc.weight.detach(), model.fc.bias.detach(), y.detach())
    torch.testing.assert_close(rel, expected, rtol=1e-12, atol=1e-14)
    assert torch.equal(lrp.p, model.p)


def test_a_module_that_returns_a_parameter_for_an_activation_is_refused():
    """A parameter that a submodule returns, given an activation, meets that activation in the
    caller as if it carried relevance: refused (a forward without inputs, as Swin's position
    bias table, returns a constant)."""
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.g.expand_as(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gain = nn.Linear(4, 4), Gain()

        def forward(self, x):
            h = self.fc(x)
            return h * self.gain(h)

    with pytest.raises(lrpx.UnsupportedModuleError, match="'gain'"):
        lrpx.convert(Net())
    Gain.forward = lambda self, x: self.g[: x.shape[-1]]  # sliced by a size read off the activation
    with pytest.raises(lrpx.UnsupportedModuleError, match="'gain'"):
        lrpx.convert(Net())
