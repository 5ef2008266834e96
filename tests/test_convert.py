"""convert(): copies, twins, canonizers, errors, and custom twins."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrpx
from lrpx.core import lrp_apply
from lrpx.layers import Twin
from lrpx.ops import DiagonalOps
from lrpx.rules import Epsilon


def small_cnn(inplace=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3), nn.Linear(24, 5),
    ).eval().double()


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def test_convert_copies_and_never_mutates():
    model = _randomize_bn(small_cnn())
    model.train()  # convert must not flip the user's mode either
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    lrp = lrpx.convert(model)
    assert model.training and not lrp.training
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model[2].inplace and not lrp[2].inplace
    assert isinstance(lrp[0], lrpx.layers.weighted.LRPConv2d) and isinstance(lrp[0], nn.Conv2d)
    assert isinstance(lrp[1], nn.Identity)  # folded
    model.eval()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    ref = model(x)
    torch.testing.assert_close(lrp(x), ref, rtol=1e-12, atol=1e-12)


def test_inplace_shares_parameters_and_keeps_keys():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    weight = model[0].weight
    keys = list(model.state_dict())
    lrp = lrpx.convert(model, inplace=True)
    assert lrp is model and lrp[0].weight is weight
    assert list(lrp.state_dict()) == keys
    assert "rule=Epsilon(epsilon=1e-06)" in repr(lrp[0])


def test_unsupported_modules_are_all_listed():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x.exp() * self.weight  # no rule for exp

    class Square(nn.Module):
        def forward(self, x):
            return torch.where(x > 0, x * x, x)  # no rule for where

    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Sequential(Square()), nn.Linear(3, 1))
    with pytest.raises(lrpx.UnsupportedModuleError) as info:
        lrpx.convert(model)
    msg = str(info.value)
    assert "'1'" in msg and "Scale" in msg and "'2.0'" in msg and "Square" in msg
    assert "applies exp" in msg and "where" in msg
    assert "twins=" in msg


def test_registered_twin_for_custom_layer():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(-1, 2, n, dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    class LRPScale(Twin, Scale):
        lrp_kind = "weighted"

        def forward(self, x):
            return lrp_apply(DiagonalOps(channel_axis=-1), self.rule, x, self.weight, None)

    model = nn.Sequential(nn.Linear(4, 4).double(), Scale(4)).eval()
    lrp = lrpx.convert(model, lrpx.Composite([(Scale, Epsilon(0.1))]), twins={Scale: LRPScale})
    assert isinstance(lrp[1], LRPScale) and lrp[1].rule == Epsilon(0.1)
    x = torch.randn(2, 4, dtype=torch.float64)
    h = model[0](x).detach()
    R = torch.randn(2, 4, dtype=torch.float64)
    # epsilon on y = h * w: R_h = h w R / (h w + 0.1 sign(h w))
    z = h * model[1].weight.detach()
    expected_h = z * R / torch.where(z >= 0, z + 0.1, z - 0.1)
    hin = h.clone().requires_grad_()
    (got,) = torch.autograd.grad(lrp[1](hin), hin, R)
    torch.testing.assert_close(got, expected_h, rtol=1e-12, atol=1e-12)
    # mapping a class to None keeps it as it is
    kept = lrpx.convert(model, twins={Scale: None})
    assert type(kept[1]) is Scale


def test_untraceable_module_is_named_and_trace_false_works():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.a(x)
            return self.b(x) + x

    model = nn.Sequential(nn.Linear(3, 3), Branchy()).eval()
    graph = lrpx.convert(model).lrpx_graph  # its operations take their rules at run time
    assert "'1'" in graph.oplevel["1"] and "Branchy" in graph.oplevel["1"]
    lrp = lrpx.convert(model, trace=False)
    x = torch.randn(2, 3)
    torch.testing.assert_close(lrp(x), model(x))


def test_functional_add_becomes_norm_and_inplace_functional_is_safe():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1, bias=False)

        def forward(self, x):
            out = F.relu(self.conv(x), inplace=True)
            out = torch.add(out, x)
            out += x
            return out

    model = nn.Sequential(Block()).eval().double()
    lrp = lrpx.convert(model)
    adds = [n for n, m in lrp.named_modules() if isinstance(m, lrpx.layers.Add)]
    assert len(adds) == 2
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64).requires_grad_()
    y = lrp(x)
    torch.testing.assert_close(y, model(x))
    (rel,) = torch.autograd.grad(y, x, y.detach())
    # bias-free conv, Norm on the sums, Pass on relu: conservation up to the stabilizers
    torch.testing.assert_close(rel.sum(), y.detach().sum(), rtol=1e-5, atol=0)


def test_converting_a_converted_model_is_refused():
    lrp = lrpx.convert(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="already an LRP twin"):
        lrpx.convert(lrp)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        lrpx.convert(lambda x: x)


def test_twin_refuses_training_mode_batchnorm():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(2)).eval()  # nothing to fold into
    lrp = lrpx.convert(model)
    assert isinstance(lrp[1], lrpx.layers.weighted.LRPBatchNorm2d)
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(lrp(x), model(x))
    lrp.train()
    with pytest.raises(RuntimeError, match="eval"):
        lrp(x)


@pytest.mark.parametrize("padding,mode", [(1, "zeros"), (2, "reflect"), (1, "replicate"), (1, "circular"),
                                          ("same", "zeros"), ("valid", "zeros"), ("same", "reflect")])
def test_conv_padding_forward_equal(padding, mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, (3, 4), padding=padding, padding_mode=mode, dilation=(1, 2)).double().eval()
    lrp = lrpx.convert(nn.Sequential(conv))
    x = torch.randn(2, 2, 9, 10, dtype=torch.float64)
    torch.testing.assert_close(lrp(x), conv(x), rtol=1e-12, atol=1e-12)
    xin = x.clone().requires_grad_()
    (rel,) = torch.autograd.grad(lrp(xin), xin, torch.ones_like(conv(x)))
    assert rel.shape == x.shape and torch.isfinite(rel).all()


def test_fold_batchnorm_is_pure_and_exact():
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(3, 5, 3).double(), _randomize_bn(nn.Sequential(nn.BatchNorm2d(5))).double()[0].eval()
    w = conv.weight.clone()
    folded = lrpx.fold_batchnorm(conv, bn)
    assert torch.equal(conv.weight, w) and folded is not conv
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    ref = bn(conv(x))
    assert ((folded(x) - ref).abs().max() / ref.abs().max()) < 1e-12
    bn.train()
    with pytest.raises(ValueError, match="eval"):
        lrpx.fold_batchnorm(conv, bn)


def test_converted_model_is_freed_without_a_cyclic_gc():
    """Nothing in convert (tracing included) leaves the model in a reference cycle: a large
    model is freed when its last reference goes, not at the next cyclic collection."""
    import gc
    import weakref

    model = small_cnn()
    enabled = gc.isenabled()
    gc.disable()
    try:
        lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(-1.0, 1.0))
        alive = weakref.ref(lrp[0])
        del lrp
        assert alive() is None
    finally:
        if enabled:
            gc.enable()
