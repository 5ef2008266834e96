"""The run-time rules look for values that carry relevance in the arguments of every call: the
quick scan sees exactly the tensors a pytree flattening sees."""
from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn

from lrpx.oplevel import OpRules

Pair = namedtuple("Pair", "a b")


def _cases():
    x = torch.ones(2, requires_grad=True)
    c = torch.ones(2)
    p = nn.Parameter(torch.ones(2))
    return [((c, 1, "a"), False), ((c, x), True), ((p,), False), (([c, [c, (x,)]],), True),
            ((c, {"k": [c, {"j": x}]}), True), ((Pair(c, x),), True), ((OrderedDict(a=x),), True),
            ((Pair(c, p), [None, 2.0]), False), ((), False), ((torch.Size([2, 3]),), False)]


@pytest.mark.parametrize("index", range(10))
def test_scan_matches_pytree(index):
    args, expected = _cases()[index]
    mode = OpRules({})
    flat = any(mode._carries(t) for t in torch.utils._pytree.tree_leaves(args))
    assert mode._any_carries(args) is flat is expected


def test_constants_are_not_carried():
    mode = OpRules({})
    table = nn.Parameter(torch.ones(3))
    with mode:
        derived = table * 2  # computed from a parameter alone: no relevance of the input
    assert derived.requires_grad and not mode._any_carries(([derived],))


def test_activation_called_with_inplace_false_by_name_takes_its_rule():
    """``nn.ReLU`` calls ``F.relu(x, inplace=False)``: the keyword is no reason to give up the rule."""
    import warnings

    import torch.nn.functional as F

    import lrpx
    from lrpx.rules import Pass

    x = torch.tensor([[-1.0, 2.0, 3.0]], requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        with OpRules({"elementwise": Pass()}):
            y = F.relu(x * 1.0, inplace=False)
    assert type(y.grad_fn).__name__ == "LRPFunctionBackward"
    # Pass gives the output's relevance to the input as it is; the plain gradient would mask it
    assert torch.autograd.grad(y, x, torch.ones_like(y))[0].tolist() == [[1.0, 1.0, 1.0]]


def _rules():
    from lrpx.rules import Epsilon, Norm, Pass, Uniform
    return {"elementwise": Pass(), "sum": Norm(0.0), "bilinear": Uniform(0.0), "product": Uniform(0.0),
            "weighted": Epsilon(0.0)}


def test_baddbmm_of_scores_and_a_constant_bias_takes_the_rules_of_its_parts():
    """``beta * bias + alpha * (q @ k)`` (BLOOM's ALiBi scores): the value is torch's fused one;
    the bias absorbs its share ``beta b / z`` of each score's relevance, the rest goes half to
    ``q`` and half to ``k`` by the product rule (epsilon 0 here), written out by hand."""
    import warnings

    import lrpx

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 1, 5, generator=g, dtype=torch.float64)
    R = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        with OpRules(_rules()):
            z = bias.baddbmm(batch1=q * 1.0, batch2=k * 1.0, beta=0.5, alpha=0.25)
    assert torch.equal(z.detach(), torch.baddbmm(bias, q.detach(), k.detach(), beta=0.5, alpha=0.25))
    r_q, r_k = torch.autograd.grad(z, (q, k), R)
    scores = 0.25 * (q.detach() @ k.detach())
    r_scores = R * scores / (0.5 * bias + scores)  # the sum rule: each operand in proportion
    # the product rule, epsilon 0: R_q[i, j] = sum_s q_ij k_js r_s / (2 (q k)_is), alike for k
    share = r_scores / (2 * scores / 0.25)
    expected_q = q.detach() * (share @ k.detach().mT)
    expected_k = k.detach() * (q.detach().mT @ share)
    torch.testing.assert_close(r_q, expected_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r_k, expected_k, rtol=1e-10, atol=1e-12)


def test_a_sum_of_two_dtypes_takes_the_sum_rule_in_the_wider_one():
    """float32 scores plus a float64 mask (GPT-J's eager attention in a float64 model): the sum
    rule applies, computed in float64 as torch computes the sum; no unruled-operation warning."""
    import warnings

    import lrpx

    x = torch.tensor([[1.0, 2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        with OpRules(_rules()):
            z = (x * 1.0) + mask
    assert z.dtype == torch.float64 and torch.equal(z.detach(), x.detach().double() + mask)
    (r,) = torch.autograd.grad(z, x, torch.ones_like(z))
    assert r.dtype == torch.float32
    torch.testing.assert_close(r.double(), x.detach().double() / z.detach(), rtol=1e-7, atol=0)


def test_baddbmm_with_beta_zero_ignores_even_a_nan_bias():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.full((2, 3, 5), float("nan"), dtype=torch.float64)
    R = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    with OpRules(_rules()):
        z = torch.baddbmm(bias, q * 1.0, k * 1.0, beta=0, alpha=2.0)
    r_q, r_k = torch.autograd.grad(z, (q, k), R)
    # no bias: the scaling passes, the product rule (epsilon 0) gives half of each score to each factor
    share = R / (2 * (q.detach() @ k.detach()))
    torch.testing.assert_close(r_q, q.detach() * (share @ k.detach().mT), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r_k, k.detach() * (q.detach().mT @ share), rtol=1e-10, atol=1e-12)


def test_baddbmm_of_a_residual_gives_it_its_share_by_the_sum_rule():
    """A bias that carries relevance (a residual, broadcast over the rows): the sum rule splits
    each output's relevance between ``beta * bias`` and the scores in proportion."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    R = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    with OpRules(_rules()):
        z = torch.baddbmm(h * 1.0, q * 1.0, k, beta=3.0)
    r_h, r_q = torch.autograd.grad(z, (h, q), R)
    base, scores = 3.0 * h.detach(), q.detach() @ k
    expected_h = (R * base / z.detach()).sum(1, keepdim=True)
    torch.testing.assert_close(r_h, expected_h, rtol=1e-10, atol=1e-12)
    # k is a constant: the scores' share R s / z goes to q by the weighted rule (epsilon 0 here)
    r_scores = R * scores / z.detach()
    torch.testing.assert_close(r_q, q.detach() * ((r_scores / scores) @ k.mT), rtol=1e-10, atol=1e-12)
