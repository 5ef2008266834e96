"""Statistics of activations held constant (lrpx.statistics): RMSNorm, LayerNorm written out,
global response normalisation, in traced code and with rules at run time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrpx


class RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class OnePlusRMSNorm(RMSNorm):  # Gemma's form, through a method and a cast
    def _norm(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, x):
        return (self._norm(x.float()) * (1.0 + self.weight.float())).type_as(x)


class WrittenLayerNorm(nn.Module):
    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)


class Branchy(nn.Module):
    """Branches on the data: cannot be traced, so its operations (it has a child: it is not a
    leaf) take their rules at run time."""

    def __init__(self, d: int):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))
        self.inner = nn.Identity()

    def forward(self, x):
        x = self.inner(x)
        if x.sum() > -1e9:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * self.norm_weight


def _relevance(module, x, R):
    lrp = lrpx.convert(nn.Sequential(module)).double()
    x = x.clone().requires_grad_()
    y = lrp(x)
    (rel,) = torch.autograd.grad(y, x, R)
    with torch.no_grad():
        torch.testing.assert_close(y, module(x), rtol=0, atol=0)
    return lrp, rel


@pytest.mark.parametrize("cls", [RMSNorm, OnePlusRMSNorm, Branchy])
def test_rms_scaling_passes_relevance(cls):
    """``w * x / rms(x)``: the scaling and the weight are constant factors, so R_x = R (the
    statistic receives nothing)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    R = torch.randn(3, 8, generator=g, dtype=torch.float64)
    lrp, rel = _relevance(cls(8), x, R)
    # (OnePlusRMSNorm computes in float32: its relevance skips that round trip, not rounded)
    np.testing.assert_array_equal(rel.numpy(), R.numpy())
    assert all(p.grad is None for p in lrp.parameters())


def test_runtime_statistics_need_no_trace():
    lrp = lrpx.convert(nn.Sequential(Branchy(4)))
    assert list(lrp.lrpx_graph.oplevel) == ["0"]


def test_an_operation_that_only_feeds_a_held_statistic_is_not_reported():
    """``x.pow(2)`` has no rule, but at run time its result only feeds the root (held constant):
    no relevance reaches it, so no UnruledOperationWarning."""
    import warnings

    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", lrpx.oplevel.UnruledOperationWarning)
        _, rel = _relevance(Branchy(4), x, torch.ones(3, 4, dtype=torch.float64))
    assert torch.isfinite(rel).all()


def test_written_layer_norm_centring_takes_the_sum_rule():
    """``c / sqrt(var(c) + eps)`` with ``c = x - mean(x)``: the division passes relevance to ``c``,
    whose sum ``x + (-mean(x))`` splits it in proportion (Norm rule, epsilon 1e-6), and the mean
    spreads its share back over ``x`` in proportion to ``x``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, generator=g, dtype=torch.float64)
    R = torch.randn(2, 6, generator=g, dtype=torch.float64)
    _, rel = _relevance(WrittenLayerNorm(), x, R)
    xn, Rn = x.numpy(), R.numpy()
    mean = xn.mean(-1, keepdims=True)
    c = xn - mean
    s = Rn / (c + 1e-6 * np.where(c >= 0, 1, -1))
    r_x = xn * s
    r_mean = (-mean * s).sum(-1, keepdims=True)  # what -mean(x) gets, then the mean's z-rule
    r_x = r_x + xn / 6 * r_mean / (mean + 1e-6 * np.where(mean >= 0, 1, -1))
    np.testing.assert_allclose(rel.numpy(), r_x, rtol=1e-12, atol=1e-12)


def test_convnextv2_global_response_norm_converts_and_accounts():
    """timm's ConvNeXt-V2 (GlobalResponseNorm: ``x * (norm(x) / mean(norm(x)))``), refused before
    statistics were held, converts, traced, with exact accounting."""
    timm = pytest.importorskip("timm")
    from test_coverage import _explain_and_account

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", pretrained=False, num_classes=5).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name:
                p.copy_(0.2 * torch.randn(p.shape, dtype=torch.float64))
    lrp = lrpx.convert(model)
    assert not lrp.lrpx_graph.oplevel
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(lrp(x), model(x), rtol=1e-10, atol=1e-12)
    rel, logit, absorbed = _explain_and_account(lrp, x)
    assert torch.isfinite(rel).all()
    assert float((rel.sum() + absorbed - logit).abs().detach() / logit.abs()) <= 1e-8


class Float32RMSNorm(RMSNorm):
    """Llama's RMSNorm as transformers writes it: float32 inside, the input's dtype outside."""

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class Float32Scaled(nn.Module):
    """The same round trip around a product of two activations: no tunnel (relevance is split)."""

    def forward(self, x):
        h = x.to(torch.float32)
        return (h * h.sigmoid()).to(x.dtype)


def _net(norm: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), norm, nn.Linear(8, 3)).double().eval()


def test_a_precision_round_trip_passes_relevance_unrounded():
    """The float32 segment's forward is kept (the output equals the original exactly) while its
    relevance skips the segment: what reaches the norm's output reaches its input unchanged, not
    rounded to float32 (through the segment it would be, by ~1e-8)."""
    model = _net(Float32RMSNorm(8))
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lrp = lrpx.convert(model)
    torch.testing.assert_close(lrp(x), model(x), rtol=0, atol=0)
    assert "relevance_to" in lrp[1].code
    g = torch.Generator().manual_seed(2)
    h, R = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(2))
    _, rel = _relevance(Float32RMSNorm(8), h, R)
    np.testing.assert_array_equal(rel.numpy(), R.numpy())


def test_a_round_trip_around_a_product_of_activations_is_not_tunnelled():
    lrp = lrpx.convert(_net(Float32Scaled()))
    assert "relevance_to" not in lrp[1].code
