"""Hypothesis properties of whole converted networks (float64, random small nets).

* conservation: with zero bias, the input relevance of each sample sums to the
  target logit within 1e-6 relative (Epsilon, ZPlus, AlphaBeta, Gamma, ZBox on
  the first layer, Flat and WSquare on the first layer, Norm in average pools);
* batch independence: a batch is explained like each of its samples alone;
* ``ZPlus() == AlphaBeta(1, 0)``;
* LRP-0 (Epsilon with a tiny epsilon) equals gradient x input on bias-free ReLU nets;
* positive homogeneity: relevance(c x) = c relevance(x) for bias-free nets;
* the converted forward equals the original forward (non-zero biases too), and
  converting leaves the original model untouched;
* the whole converted network equals the layer-by-layer oracle of ``oracles.py``
  (``convert(model)`` with no composite is Epsilon(1e-6) on every Linear/Conv).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

try:
    from . import oracles
    from .strategies import SCALE, WEIGHTED, cases
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import oracles
    from strategies import SCALE, WEIGHTED, cases

import lrpx
from lrpx.composites import Composite, First, Last
from lrpx.rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, WSquare, ZBox, ZPlus

DT = torch.float64
E = 1e-12  # stabilizer for the properties that hold "up to e" (activations are ~SCALE)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
LOW, HIGH = -1.5 * SCALE, 1.5 * SCALE  # ZBox bounds around the "box" inputs in [-SCALE, SCALE]


pytestmark = pytest.mark.usefixtures("one_thread")


def targets_of(model, x):
    """Per sample the class with the largest |logit| (so the logit is not ~0)."""
    with torch.no_grad():
        out = model(x)
    return out.abs().argmax(1), out


def relevance(lrp_model, x, target):
    """The relevance convention: autograd through the converted model carries relevance."""
    x = x.detach().clone().requires_grad_()
    out = lrp_model(x)
    r_out = out * F.one_hot(target, out.shape[1]).to(out.dtype)
    (r_in,) = torch.autograd.grad(out, x, grad_outputs=r_out)
    return r_in, out.detach()


def per_sample_sum(t):
    return t.reshape(t.shape[0], -1).sum(1)


def assert_conserved(r_in, out, target):
    logit = out.gather(1, target[:, None])[:, 0]
    total = per_sample_sum(r_in)
    assert torch.isfinite(r_in).all()
    for got, want in zip(total.tolist(), logit.tolist()):
        assert abs(got - want) <= 1e-6 * abs(want) + 1e-12, (got, want)


# --------------------------------------------------------------------- conservation


def tight(entries, e=E):
    """A composite whose average pools use ``Norm(e)`` too.

    Conservation, LRP-0 and homogeneity hold up to the stabilizers; the default
    ``Norm(1e-6)`` of a pool whose window mean is small (a nearly dead ReLU map)
    visibly eats relevance (``R e / (mean + e)``, as the oracle agrees), so these
    properties run with every stabilizer tiny.  The default Norm is checked against
    the oracle in ``test_network_matches_layerwise_oracle`` and ``test_rules.py``.
    """
    return Composite([(AVG_POOLS, Norm(e)), *entries])


COMPOSITES = {
    "epsilon": lambda: tight([(WEIGHTED, Epsilon(E))]),
    # ZPlus/AlphaBeta drop the relevance of a neuron without positive (negative)
    # contributions; for hidden ReLU neurons that carry relevance that cannot happen
    # for ZPlus, so the top layer (a raw logit) gets Epsilon as in the presets.
    "zplus": lambda: tight([(Last(), Epsilon(E)), (WEIGHTED, ZPlus(epsilon=E))]),
    "alphabeta": lambda: tight([(Last(), Epsilon(E)), (WEIGHTED, AlphaBeta(2.0, 1.0, epsilon=E))]),
    "gamma": lambda: tight([(WEIGHTED, Gamma(0.25, epsilon=E))]),
    "zbox": lambda: tight([(First(), ZBox(LOW, HIGH, epsilon=E)), (WEIGHTED, Epsilon(E))]),
    "flat": lambda: tight([(First(), Flat(epsilon=E)), (WEIGHTED, Epsilon(E))]),
    "wsquare": lambda: tight([(First(), WSquare(epsilon=E)), (WEIGHTED, Epsilon(E))]),
    "gamma-flat": lambda: tight(
        [(First(), Flat(epsilon=E)), (Last(), Epsilon(E)), (WEIGHTED, Gamma(0.5, epsilon=E))]
    ),
}


def _check_conservation(name, case):
    model, x = case.model, case.x
    target, out = targets_of(model, x)
    assume(bool((out.gather(1, target[:, None]).abs() > 1e-6 * SCALE).all()))  # not a dead net
    lrp_model = lrpx.convert(model, COMPOSITES[name]())
    res = lrpx.explain(lrp_model, x, target)
    torch.testing.assert_close(res.output, out, rtol=1e-10, atol=1e-10 * SCALE)
    assert res.relevance.shape == x.shape
    assert_conserved(res.relevance, res.output, target)


@pytest.mark.parametrize("name", ["epsilon", "zplus", "gamma", "flat", "wsquare", "gamma-flat"])
@given(case=cases())
def test_conservation(name, case):
    _check_conservation(name, case)


@given(case=cases(input_kind="box"))
def test_conservation_zbox_first_layer(case):
    _check_conservation("zbox", case)


@given(case=cases(avgpool=True))
def test_conservation_norm_in_average_pools(case):
    assert any(isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d))
               for m in case.model)
    _check_conservation("epsilon", case)


def _every_live_neuron_has_both_signs(model, x) -> bool:
    """AlphaBeta conserves only where a neuron has positive AND negative contributions.

    Checked on every weighted layer but the last, for every output with z > 0 (only
    those can receive relevance after the ReLU); a neuron whose contributions are all
    of one sign would keep alpha (or lose beta) times its relevance, by definition.
    """
    ok = True

    def hook(module, inputs, output):
        nonlocal ok
        h = inputs[0]
        wp, wn = module.weight.clamp(min=0), module.weight.clamp(max=0)
        if isinstance(module, nn.Linear):
            fwd = lambda inp, w: F.linear(inp, w)  # noqa: E731
        else:
            fwd = lambda inp, w: module._conv_forward(inp, w, None)  # noqa: E731
        den_n = fwd(h.clamp(min=0), wn) + fwd(h.clamp(max=0), wp)
        den_p = fwd(h.clamp(min=0), wp) + fwd(h.clamp(max=0), wn)
        live = output > 0
        tol = 1e-6 * SCALE
        ok = ok and bool((den_n[live] < -tol).all()) and bool((den_p[live] > tol).all())

    weighted = [m for m in model if isinstance(m, WEIGHTED)][:-1]
    handles = [m.register_forward_hook(hook) for m in weighted]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return ok


@given(case=cases(min_width=6, max_width=10, min_kernel=2))
def test_conservation_alpha_beta(case):
    assume(_every_live_neuron_has_both_signs(case.model, case.x))
    _check_conservation("alphabeta", case)


# --------------------------------------------------------------------- batch independence

BATCH_COMPOSITES = {
    "epsilon-gamma-box": lambda: Composite(
        [(First(), ZBox(LOW, HIGH)), ((nn.Conv1d, nn.Conv2d), Gamma(0.25)), (nn.Linear, Epsilon(1e-6))]
    ),
    "alphabeta-flat": lambda: Composite(
        [(First(), Flat()), ((nn.Conv1d, nn.Conv2d), AlphaBeta(2.0, 1.0)), (nn.Linear, Epsilon(0.1))]
    ),
    "zplus-wsquare": lambda: Composite([(First(), WSquare()), (WEIGHTED, ZPlus())]),
}


@pytest.mark.parametrize("name", list(BATCH_COMPOSITES))
@given(case=cases(input_kind="box", min_batch=2, max_batch=4))
def test_batch_independence(name, case):
    model, x = case.model, case.x
    target, _ = targets_of(model, x)
    lrp_model = lrpx.convert(model, BATCH_COMPOSITES[name]())
    batched, out = relevance(lrp_model, x, target)
    alone = torch.cat([relevance(lrp_model, x[i : i + 1], target[i : i + 1])[0] for i in range(x.shape[0])])
    scale = max(1.0, float(alone.abs().max()))
    torch.testing.assert_close(batched, alone, rtol=1e-8, atol=1e-10 * scale)


# --------------------------------------------------------------------- equivalences


@given(case=cases())
def test_zplus_equals_alpha1_beta0(case):
    model, x = case.model, case.x
    target, _ = targets_of(model, x)
    r_plus, _ = relevance(lrpx.convert(model, Composite([(WEIGHTED, ZPlus())])), x, target)
    r_ab, _ = relevance(lrpx.convert(model, Composite([(WEIGHTED, AlphaBeta(1.0, 0.0))])), x, target)
    scale = max(1.0, float(r_plus.abs().max()))
    torch.testing.assert_close(r_ab, r_plus, rtol=1e-9, atol=1e-12 * scale)


@given(case=cases())
def test_lrp0_is_gradient_times_input(case):
    """Bias-free ReLU nets are piecewise linear and homogeneous: LRP-0 = x * d logit / dx."""
    model, x = case.model, case.x
    target, _ = targets_of(model, x)
    xg = x.clone().requires_grad_()
    out = model(xg)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), xg)
    expected = x * grad
    r_in, _ = relevance(lrpx.convert(model, tight([(WEIGHTED, Epsilon(1e-12))], 1e-12)), x, target)
    scale = max(1e-3, float(expected.abs().max()))
    torch.testing.assert_close(r_in, expected, rtol=1e-6, atol=1e-7 * scale)


@pytest.mark.parametrize("rule", ["zplus", "gamma"])
@given(case=cases())
def test_positive_homogeneity(rule, case):
    """Bias-free nets: explaining c*x gives c times the relevance of x (c > 0), up to e."""
    model, x = case.model, case.x
    target, _ = targets_of(model, x)
    composite = COMPOSITES[rule]()
    lrp_model = lrpx.convert(model, composite)
    r1, _ = relevance(lrp_model, x, target)
    r3, _ = relevance(lrp_model, 3.0 * x, target)
    scale = max(1.0, float(r1.abs().max()))
    torch.testing.assert_close(r3, 3.0 * r1, rtol=1e-6, atol=1e-8 * scale)


# --------------------------------------------------------------------- forward and cleanup

FORWARD_COMPOSITES = [
    None,
    lambda: Composite([(First(), ZBox(LOW, HIGH)), (WEIGHTED, Gamma(0.25))]),
    lambda: Composite([(First(), Flat()), ((nn.Conv1d, nn.Conv2d), AlphaBeta(2.0, 1.0)), (WEIGHTED, Epsilon(0.25))]),
    lambda: Composite([(WEIGHTED, WSquare())]),
]


@pytest.mark.parametrize("index", range(len(FORWARD_COMPOSITES)), ids=["default", "gamma-box", "ab-flat", "wsquare"])
@given(case=cases(bias=True))
def test_converted_forward_equals_original(index, case):
    model, x = case.model, case.x
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        expected = model(x)
    make = FORWARD_COMPOSITES[index]
    lrp_model = lrpx.convert(model) if make is None else lrpx.convert(model, make())
    with torch.no_grad():
        got = lrp_model(x)
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10 * max(scale, 1e-30))
    # convert works on a copy: the original model is untouched, and still plain torch
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(type(m).__module__.startswith("torch.") for m in model.modules())
    # explaining through the copy does not touch the original either
    relevance(lrp_model, x, targets_of(model, x)[0])
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@given(case=cases())
def test_explain_matches_autograd_convention(case):
    model, x = case.model, case.x
    target, _ = targets_of(model, x)
    lrp_model = lrpx.convert(model, Composite([(First(), Flat()), (WEIGHTED, Gamma(0.25))]))
    x_keep = x.clone()
    res = lrpx.explain(lrp_model, x, target)
    r_in, out = relevance(lrp_model, x, target)
    torch.testing.assert_close(res.output, out, rtol=0, atol=0)
    torch.testing.assert_close(res.relevance, r_in, rtol=1e-12, atol=0)
    assert torch.equal(x, x_keep) and not x.requires_grad


# --------------------------------------------------------------------- whole net vs oracle


ORACLE_RULES = {
    "default": (None, lambda i, n: (lambda d, x, r: oracles.epsilon(d, x, r, 1e-6))),
    "epsilon": (lambda: Composite([(WEIGHTED, Epsilon(0.01))]),
                lambda i, n: (lambda d, x, r: oracles.epsilon(d, x, r, 0.01))),
    "gamma-box": (lambda: Composite([(First(), ZBox(LOW, HIGH)), (WEIGHTED, Gamma(0.25))]),
                  lambda i, n: (lambda d, x, r: oracles.zbox(d, x, r, LOW, HIGH, 1e-6)) if i == 0
                  else (lambda d, x, r: oracles.gamma(d, x, r, 0.25, 1e-6))),
    "ab-flat": (lambda: Composite([(First(), Flat()), (Last(), Epsilon(0.5)), (WEIGHTED, AlphaBeta(2.0, 1.0))]),
                lambda i, n: (lambda d, x, r: oracles.flat(d, x, r, 1e-6)) if i == 0
                else (lambda d, x, r: oracles.epsilon(d, x, r, 0.5)) if i == n - 1
                else (lambda d, x, r: oracles.alpha_beta(d, x, r, 2.0, 1.0, 1e-6))),
}


@pytest.mark.parametrize("name", list(ORACLE_RULES))
@given(case=cases(input_kind="box", bias=True, max_width=4))
def test_network_matches_layerwise_oracle(name, case):
    model, x = case.model, case.x
    target, out = targets_of(model, x)
    make_composite, oracle_rule = ORACLE_RULES[name]
    weighted = [i for i, m in enumerate(model) if isinstance(m, WEIGHTED)]
    rules = {i: oracle_rule(rank, len(weighted)) for rank, i in enumerate(weighted)}
    r_out = out * F.one_hot(target, out.shape[1]).to(DT)
    expected = oracles.explain_sequential(model, x, r_out, rules)
    lrp_model = lrpx.convert(model) if make_composite is None else lrpx.convert(model, make_composite())
    r_in, _ = relevance(lrp_model, x, target)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(r_in, expected, rtol=1e-8, atol=1e-10 * scale)


# ------------------------------------------------------ normalisation by a divisor from the input


class _Normalised(nn.Module):
    """``y / (sum |y| + 1)`` of a network's output ``y``; with ``run_time`` the forward branches on
    the data, so that it runs with its rules at run time instead of being traced."""

    def __init__(self, net: nn.Module, run_time: bool) -> None:
        super().__init__()
        self.net, self.run_time = net, run_time

    def forward(self, x):
        y = self.net(x)
        if self.run_time and bool(y.abs().sum() >= 0):
            y = y.clone()
        return y / (y.abs().sum(1, keepdim=True) + 1.0)


@given(case=cases(), run_time=st.booleans())
def test_a_divisor_from_the_input_passes_all_relevance(case, run_time):
    """Dividing by a value computed from the activation holds the divisor constant, traced or
    at run time: the relevance stays conserved through the normalisation."""
    model = _Normalised(case.model, run_time).eval()
    target, out = targets_of(model, case.x)
    assume(bool((out.gather(1, target[:, None]).abs() > 1e-9).all()))
    lrp_model = lrpx.convert(model, COMPOSITES["epsilon"]())
    r_in, out = relevance(lrp_model, case.x, target)
    assert_conserved(r_in, out, target)
