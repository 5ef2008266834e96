"""A ReLU that alone reads a layer's output is applied by that layer in place: the forward
and the relevance are those of the unfused model (for rules proportional to their inputs
downstream), and what is fused is exactly the Linear/Conv/BatchNorm -> ReLU pairs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx
from lrpx.layers import FusedReLU
from zoo import randomized

pytestmark = pytest.mark.usefixtures("one_thread")

COMPOSITES = {
    "epsilon": lambda: lrpx.Composite(),
    "epsilon_gamma_box": lambda: lrpx.composites.epsilon_gamma_box(-3.0, 3.0),
    "epsilon_plus_flat": lambda: lrpx.composites.epsilon_plus_flat(),
    "epsilon_alpha2_beta1": lambda: lrpx.composites.epsilon_alpha2_beta1(),
    "tutorial": lambda: lrpx.composites.tutorial(-3.0, 3.0),
}


def _relevance(model, x):
    xin = x.clone().requires_grad_()
    y = model(xin)
    (rel,) = torch.autograd.grad(y, xin, y.detach())
    return y.detach(), rel


@pytest.fixture(scope="module", params=["vgg11_bn", "resnet18", "densenet121"])
def net(request):
    return request.param, randomized(request.param, num_classes=10)


@pytest.mark.parametrize("composite", list(COMPOSITES))
def test_fused_equals_unfused(net, composite):
    name, model = net
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fused = lrpx.convert(model, COMPOSITES[composite]())
    plain = lrpx.convert(model, COMPOSITES[composite](), fuse=False)
    y1, r1 = _relevance(fused, x)
    y0, r0 = _relevance(plain, x)
    assert torch.equal(y1, y0)
    torch.testing.assert_close(r1, r0, rtol=1e-10, atol=1e-12 * float(r0.abs().max()))
    n_fused = sum(getattr(m, "fused_relu", False) for m in fused.modules())
    assert n_fused > 0 and not any(getattr(m, "fused_relu", False) for m in plain.modules())
    if composite == "tutorial":  # relative epsilon reads all of z: those layers stay separate
        relative = [m for m in fused.modules() if isinstance(getattr(m, "rule", None), lrpx.rules.Epsilon)
                    and m.rule.relative]
        assert relative and not any(m.fused_relu for m in relative)


def test_what_is_fused():
    model = randomized("vgg11_bn", num_classes=10)
    lrp = lrpx.convert(model)
    convs = [m for m in lrp.features if isinstance(m, nn.Conv2d)]
    # every conv (BatchNorm folded in between) and the two hidden Linear layers apply their ReLU
    assert all(m.fused_relu for m in convs)
    assert [m.fused_relu for m in lrp.classifier if isinstance(m, nn.Linear)] == [True, True, False]
    assert sum(isinstance(m, FusedReLU) for m in lrp.modules()) == len(convs) + 2
    resnet = lrpx.convert(randomized("resnet18", num_classes=10))
    block = resnet.layer1[0]
    # conv1 -> bn1 -> relu is fused into conv1, the ReLU after the residual sum (the same
    # module, called twice) into the sum; conv2 feeds the sum and stays separate
    assert block.conv1.fused_relu and not block.conv2.fused_relu and block.add.fused_relu
    assert "self.relu(" not in block.code


def test_shared_layer_and_second_reader_are_not_fused():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu, self.head = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            z = self.fc(x)
            return self.head(self.relu(z) + z)  # z has a second reader

    lrp = lrpx.convert(TwoReaders().double().eval())
    assert not lrp.fc.fused_relu
    shared = nn.Linear(3, 3)
    lrp2 = lrpx.convert(nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU()).double().eval())
    assert not any(getattr(m, "fused_relu", False) for m in lrp2.modules())


def test_flat_after_relu_dead_units_pass_nothing():
    """Flat gives relevance to dead units too; fused, those units pass none (documented)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double().eval()
    composite = lrpx.Composite([(lrpx.composites.Last(), lrpx.rules.Flat())])
    x = torch.randn(3, 4, dtype=torch.float64)
    fused = lrpx.convert(model, composite)
    assert fused[0].fused_relu
    y, rel = _relevance(fused, x)
    _, unfused = _relevance(lrpx.convert(model, composite, fuse=False), x)
    # by hand: Flat spreads each output's relevance over its 6 inputs alike; the first layer's
    # epsilon rule then divides by relu(z) + e, passing nothing from units with z <= 0
    e = 1e-6
    z = model[0](x).detach()
    r_hidden = (y.sum(1, keepdim=True) / (6 + e)).expand(-1, 6)
    s = torch.where(z > 0, r_hidden / (z.clamp(min=0) + e), 0.0)
    torch.testing.assert_close(rel, x * (s @ model[0].weight.detach()), rtol=1e-10, atol=1e-12)
    s_unfused = r_hidden / (z + e * torch.where(z >= 0, 1.0, -1.0))
    assert (z <= 0).any()  # some unit is dead here, so the two differ by exactly that unit's share
    torch.testing.assert_close(unfused, x * (s_unfused @ model[0].weight.detach()), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ inputs >= 0 by construction

def test_nonnegative_inputs_are_known_from_the_model():
    for name, first in [("vgg11_bn", "features.0"), ("resnet18", "conv1")]:
        lrp = lrpx.convert(randomized(name, num_classes=10), lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
        weighted = {n: m for n, m in lrp.named_modules()
                    if isinstance(m, lrpx.layers.Twin) and lrpx.layers.kind_of(m) == "weighted"}
        assert [n for n, m in weighted.items() if not m.input_nonnegative] == [first]


def test_signed_inputs_are_not_marked():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.ConstantPad2d(1, -1.0), nn.Conv2d(3, 3, 3),  # pad with -1
        nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Tanh(), nn.Conv2d(3, 3, 1),  # tanh is signed
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 2),  # after ReLU and pooling: >= 0
    ).double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=lrpx.rules.Gamma(0.25)))
    marks = [m.input_nonnegative for m in lrp if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert marks == [False, False, True, False, True]


def test_marked_layers_never_look_at_the_data_and_agree_with_the_signed_forms(monkeypatch):
    model = randomized("resnet18", num_classes=10)
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    checks = []
    real = lrpx.rules.base.is_nonnegative

    def counting(t, layer=None):
        if not getattr(layer, "input_nonnegative", False):
            checks.append(layer)
        return real(t, layer)

    monkeypatch.setattr(lrpx.rules.linear, "is_nonnegative", counting)
    _, hinted = _relevance(lrp, x)
    assert checks == []  # conv1 takes ZBox: no rule had to look at its input
    # the general (signed) forms on the same non-negative inputs give the same relevance
    monkeypatch.setattr(lrpx.rules.linear, "is_nonnegative", lambda t, layer=None: False)
    _, general = _relevance(lrp, x)
    torch.testing.assert_close(hinted, general, rtol=1e-9, atol=1e-12 * float(general.abs().max()))


@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_channels_last_inputs_and_weights(composite):
    model = randomized("resnet18", num_classes=10)
    lrp = lrpx.convert(model, COMPOSITES[composite]())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, reference = _relevance(lrp, x)
    _, rel = _relevance(lrp, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(rel, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))
    lrp_cl = lrpx.convert(model.to(memory_format=torch.channels_last), COMPOSITES[composite]())
    _, rel_cl = _relevance(lrp_cl, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(rel_cl, reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))


def test_unknown_signs_are_read_on_the_cpu_only():
    # reading the data of a GPU tensor would make the host wait; a meta tensor has no data to read
    is_nonnegative, unknown = lrpx.rules.base.is_nonnegative, lrpx.ops.LinearOps()
    assert is_nonnegative(torch.rand(2, 3), unknown) is True
    assert is_nonnegative(torch.rand(2, 3) - 0.5, unknown) is False
    assert is_nonnegative(torch.empty(2, 3, device="meta"), unknown) is False
    assert is_nonnegative(torch.rand(2, 3) - 0.5, lrpx.ops.LinearOps(input_nonnegative=True)) is True


def test_gamma_without_stabilizer_after_a_fused_relu_stays_finite():
    # dead units read relu(z) = 0 for z: zz = 0 and R = 0 there, which must pass 0, not 0/0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double().eval()
    composite = lrpx.Composite(rules=[(nn.Conv2d, lrpx.rules.Gamma(0.25, epsilon=0.0))])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)  # signed: the general Gamma form
    fused = _relevance(lrpx.convert(model, composite), x)[1]
    unfused = _relevance(lrpx.convert(model, composite, fuse=False), x)[1]
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=1e-12)


def test_tensor_stabilizer_follows_the_denominator_device():
    z = torch.tensor([2.0, -0.0, 0.0])
    out = lrpx.rules.base.stabilize(z, torch.tensor(0.5, dtype=torch.float64))
    assert out.dtype == torch.float32 and out.tolist() == [2.5, -0.5, 0.5]
    assert lrpx.rules.base.stabilize(z.to("meta"), torch.tensor(0.5)).device.type == "meta"
