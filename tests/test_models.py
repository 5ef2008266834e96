"""torchvision models end to end: forward equality, finite relevance, and conservation up
to exactly the relevance that biases and stabilizers absorb (accounted independently)."""
from __future__ import annotations

import threading

import pytest
import torch

import lrpx
from zoo import Recorder, randomized

MODELS = ["vgg16", "vgg16_bn", "resnet18", "resnet50"]
SIZE = 64


def _composites():
    return {
        "epsilon": lrpx.Composite(),
        "epsilon_gamma_box": lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0),
    }


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param, randomized(request.param)


def _input(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=g, dtype=torch.float64).clamp(-3, 3)


@pytest.mark.slow
@pytest.mark.parametrize("composite", ["epsilon"])  # the presets: tests/test_coverage.py
def test_forward_equal_and_relevance_accounted(model, composite):
    name, net = model
    x = _input()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    lrp = lrpx.convert(net, _composites()[composite])
    ref = net(x)
    out = lrp(x)
    scale = ref.detach().abs().max()
    assert (out - ref).abs().max() <= 1e-10 * scale

    rec = Recorder(lrp)
    target = torch.tensor([3, 7])
    xin = x.clone().requires_grad_()
    y = lrp(xin)
    r_out = torch.zeros_like(y)
    r_out[torch.arange(2), target] = y.detach()[torch.arange(2), target]
    (rel,) = torch.autograd.grad(y, xin, r_out)
    rec.remove()
    assert torch.isfinite(rel).all()
    logit_sum = r_out.sum()
    leak = rec.total_absorbed()
    # what the biases/stabilizers absorb is real (non-zero biases) and accounts for the gap
    assert leak.abs() > 1e-6 * logit_sum.abs()
    torch.testing.assert_close(rel.sum() + leak, logit_sum, rtol=1e-8, atol=1e-10 * float(scale.detach()))
    # the caller's model is untouched
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_batchnorm_folding_default_eps():
    net = randomized("vgg16_bn")
    lrp = lrpx.convert(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in lrp.modules())
    x = _input(1)
    ref, out = net(x), lrp(x)
    assert ((out - ref).abs().max() / ref.abs().max()) <= 1e-10


@pytest.mark.slow
def test_two_threads_get_what_they_get_in_turn():
    net = randomized("resnet18")
    lrp = lrpx.convert(net, lrpx.composites.epsilon_gamma_box(-3.0, 3.0))
    xs = [_input(s, batch=1) for s in (10, 11)]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = [lrpx.explain(lrp, x, 5).relevance for x in xs]
        results = [None, None]

        def work(i):
            for _ in range(3):
                results[i] = lrpx.explain(lrp, xs[i], 5).relevance

        ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        torch.set_num_threads(threads_before)
    for a, b in zip(serial, results):
        assert torch.equal(a, b)


def test_resnet_relu_called_twice_is_correct():
    """BasicBlock calls one ReLU module twice; each call must route its own relevance."""
    net = randomized("resnet18")
    block = net.layer1[0]
    lrp = lrpx.convert(torch.nn.Sequential(block), fuse=False)  # keep both ReLU calls
    x = torch.randn(1, 64, 8, 8, dtype=torch.float64)
    # conv-bn-relu-conv-bn (+x) -relu: the input relevance is sum(y) minus exactly what the
    # folded biases and the stabilizers absorb, call by call
    rec = Recorder(lrp)
    xin2 = x.clone().requires_grad_()
    y2 = lrp(xin2)
    (rel2,) = torch.autograd.grad(y2, xin2, y2.detach())
    rec.remove()
    relu_calls = [c for c in rec.calls if isinstance(c["module"], torch.nn.ReLU)]
    assert len(relu_calls) == 2
    torch.testing.assert_close(rel2.sum() + rec.total_absorbed(), y2.detach().sum(), rtol=1e-9, atol=1e-9)
