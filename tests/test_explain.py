"""explain(): initial relevance, targets, dtypes and input checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 5)).eval()


@pytest.fixture
def lrp64():
    return lrpx.convert(net().double(), lrpx.composites.epsilon_gamma_box(-1.0, 1.0))


def x64(batch=3):
    return torch.rand(batch, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_matches_the_autograd_convention(lrp64):
    x = x64()
    rel, out = lrpx.explain(lrp64, x, [0, 4, 2])
    xin = x.clone().requires_grad_()
    y = lrp64(xin)
    mask = torch.zeros_like(y)
    mask[torch.arange(3), torch.tensor([0, 4, 2])] = 1
    (ref,) = torch.autograd.grad(y, xin, y.detach() * mask)
    assert torch.equal(rel, ref)
    torch.testing.assert_close(out, y.detach())


def test_logit_is_one_hot_scaled_by_the_logit(lrp64):
    x = x64()
    rel_logit, out = lrpx.explain(lrp64, x, 1)
    rel_one, _ = lrpx.explain(lrp64, x, 1, initial="one_hot")
    torch.testing.assert_close(rel_logit, rel_one * out[:, 1].view(-1, 1, 1, 1), rtol=1e-12, atol=1e-14)


def test_default_target_is_argmax(lrp64):
    x = x64()
    rel, out = lrpx.explain(lrp64, x)
    rel2, _ = lrpx.explain(lrp64, x, out.argmax(1))
    assert torch.equal(rel, rel2)


def test_tensor_initial(lrp64):
    x = x64()
    init = torch.randn(3, 5, dtype=torch.float64)
    rel, _ = lrpx.explain(lrp64, x, initial=init)
    parts = sum(lrpx.explain(lrp64, x, initial=init * (torch.arange(5) == k)).relevance for k in range(5))
    torch.testing.assert_close(rel, parts, rtol=1e-10, atol=1e-12)  # linear in the initial relevance


def test_callers_x_untouched(lrp64):
    x = x64()
    copy = x.clone()
    lrpx.explain(lrp64, x, 0)
    assert torch.equal(x, copy) and not x.requires_grad and x.grad is None


def test_explanation_carries_the_target(lrp64):
    explanation = lrpx.explain(lrp64, x64())
    torch.testing.assert_close(explanation.target, explanation.output.argmax(1))
    assert lrpx.explain(lrp64, x64(), 4).target.tolist() == [4, 4, 4]
    out = lrpx.explain(lrp64, x64(), initial=torch.ones(3, 5, dtype=torch.float64))
    assert out.target is None
    relevance, output = out  # unpacks as (relevance, output)
    assert relevance is out.relevance and output is out.output


@pytest.mark.parametrize("target,error,match", [
    (5, ValueError, "out of range"), (-1, ValueError, "out of range"), ([0, 1], ValueError, r"expected \(3,\)"),
    (1.5, TypeError, "integer"), ([], ValueError, r"target is empty; expected \(3,\)"),
])
def test_bad_targets(lrp64, target, error, match):
    with pytest.raises(error, match=match):
        lrpx.explain(lrp64, x64(), target)


def test_bad_inputs(lrp64):
    with pytest.raises(TypeError, match="floating point"):
        lrpx.explain(lrp64, torch.ones(1, 3, 8, 8, dtype=torch.long), 0)
    x = x64()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lrpx.explain(lrp64, x, 0)
    with pytest.raises(ValueError, match="shape"):
        lrpx.explain(lrp64, x64(), initial=torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="initial"):
        lrpx.explain(lrp64, x64(), 0, initial="softmax")
    with pytest.raises(ValueError, match=r"x has shape \(0, 3, 8, 8\): explain needs a batch of at least one"):
        lrpx.explain(lrp64, x64()[:0], [])


def test_non_finite_relevance_is_reported():
    model = nn.Sequential(nn.Linear(2, 2, bias=False)).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=lrpx.rules.Epsilon(0.0)))
    with pytest.raises(FloatingPointError, match="epsilon"):
        lrpx.explain(lrp, torch.zeros(1, 2, dtype=torch.float64), 0, initial="one_hot")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1), (torch.float16, 2e-2)])
def test_low_precision_dtypes_agree_with_float64(dtype, tol):
    base = net()
    x = x64().abs()
    ref = lrpx.explain(lrpx.convert(base.double(), lrpx.composites.epsilon_plus()), x, 1).relevance
    try:
        rel = lrpx.explain(lrpx.convert(net().to(dtype), lrpx.composites.epsilon_plus()), x.to(dtype), 1).relevance
    except RuntimeError as err:  # a CPU kernel missing for this dtype in old torch builds
        pytest.skip(f"{dtype} not supported on this CPU build: {err}")
    assert rel.dtype == dtype
    err = (rel.double() - ref).abs().max() / ref.abs().max()
    assert err < tol
