"""The model graph of ``convert``: each module traced at most once, and the hooks a user
registered survive conversion (or keep their module out of folding and fusion)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

import lrpx
from lrpx.graph import ModelGraph
from lrpx.layers import FusedReLU, Twin

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["resnet50", "densenet121"])
def test_convert_traces_each_module_at_most_once(name, monkeypatch):
    traced = Counter()
    trace = fx.Tracer.trace

    def counting(self, root, *args, **kwargs):
        traced[id(root)] += 1
        return trace(self, root, *args, **kwargs)

    monkeypatch.setattr(fx.Tracer, "trace", counting)
    model = torchvision.models.get_model(name, weights=None).eval()
    modules = {id(m): n for n, m in model.named_modules()}
    lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
    traced_ids = [i for i in traced if i not in modules]  # the copy's modules
    assert traced and max(traced.values()) == 1
    # one graph per module with a forward of its own and children; Sequentials need no trace
    expected = sum(1 for m in model.modules() if list(m.children()) and type(m) is not nn.Sequential
                   and type(m).forward is not nn.Module.forward)
    assert len(traced_ids) == expected


def test_model_graph_of_sequentials_is_built_without_tracing(monkeypatch):
    monkeypatch.setattr(fx.Tracer, "trace", lambda *a, **k: pytest.fail("traced"))
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 1)))
    graph = ModelGraph.build(model, trace=False)
    assert set(graph.graphs) == {"", "1"}
    assert graph.calls() == Counter({"0": 1, "1": 1, "1.0": 1, "1.1": 1})


def block_model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).double().eval()


def test_hooks_on_a_rewritten_module_survive():
    model = block_model()
    block = model.layer1[0]  # its forward holds `out += identity`: it becomes a GraphModule
    seen = {"original": [], "converted": []}
    key = ["original"]
    block.register_forward_pre_hook(lambda m, args: seen[key[0]].append(("pre", args[0].detach().clone())))
    block.register_forward_hook(lambda m, args, out: seen[key[0]].append(("post", out.detach().clone())))
    model.register_forward_hook(lambda m, args, out: seen[key[0]].append(("root", out.detach().clone())))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x)
    lrp = lrpx.convert(model)
    assert isinstance(lrp.layer1[0], fx.GraphModule)
    key[0] = "converted"
    lrpx.explain(lrp, x, 0)
    assert [k for k, _ in seen["converted"]] == ["pre", "post", "root"]
    for (_, a), (_, b) in zip(seen["original"], seen["converted"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def conv_bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(64, 2)).double().eval()
    model[1].running_mean.normal_()
    return model


def test_a_hooked_batchnorm_is_not_folded_and_a_hooked_relu_not_fused():
    model = conv_bn_model()
    outputs = []
    model[1].register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    model[4].register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    model(x)
    lrp = lrpx.convert(model)
    assert isinstance(lrp[1], Twin) and isinstance(lrp[1], nn.BatchNorm2d)  # kept, as an affine layer
    assert not lrp[0].fused_relu and not lrp[3].fused_relu
    assert not any(isinstance(m, FusedReLU) for m in lrp.modules())
    lrp(x)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs[3], outputs[1], rtol=1e-12, atol=1e-12)
    without_hooks = lrpx.convert(conv_bn_model())
    # the same model without hooks: folded and fused (the hooks alone kept the layers apart)
    assert isinstance(without_hooks[1], nn.Identity) and without_hooks[0].fused_relu


def test_hooks_registered_on_the_converted_model_do_not_reach_the_original():
    model = block_model()
    lrp = lrpx.convert(model)
    calls = []
    lrp.layer1[0].conv1.register_forward_hook(lambda *a: calls.append("converted"))
    model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    assert calls == []
