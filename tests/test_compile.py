"""torch.compile on a converted model gives the eager relevance."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx


@pytest.mark.slow
def test_compiled_relevance_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(-1.0, 1.0))
    x = torch.rand(2, 3, 10, 10) * 2 - 1
    eager = lrpx.explain(lrp, x, [0, 2]).relevance
    compiled = lrpx.explain(torch.compile(lrp), x, [0, 2]).relevance
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("composite", ["epsilon_gamma_box", "epsilon_alpha2_beta1"])
def test_converted_model_compiles_without_graph_breaks(composite):
    from zoo import randomized
    model = randomized("resnet18", num_classes=10, dtype=torch.float32)
    make = {"epsilon_gamma_box": lambda: lrpx.composites.epsilon_gamma_box(-3.0, 3.0),
            "epsilon_alpha2_beta1": lrpx.composites.epsilon_alpha2_beta1}[composite]
    lrp = lrpx.convert(model, make())
    torch._dynamo.reset()
    report = torch._dynamo.explain(lrp)(torch.randn(2, 3, 32, 32))
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
