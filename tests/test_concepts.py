"""Relevance at named layers and conditional relevance (CRP) against independent computations:
the sub-network above a layer explained on its own, one condition at a time, threads."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torchvision
from torch import nn

import lrpx
from lrpx import concepts

pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(),
                         nn.Linear(10, 4)).double().eval()


def composite():
    return lrpx.composites.epsilon_plus()  # by layer type: the same rules in a sub-network


def test_recorded_relevance_is_the_relevance_of_the_network_above():
    model = small_cnn()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    explanation = lrpx.explain(lrpx.convert(model, composite()), x, 2, record=["3", "6"])
    with torch.no_grad():
        after_3 = model[:4](x)
        after_6 = model[:7](x)
    above_3 = lrpx.explain(lrpx.convert(model[4:], composite()), after_3, 2).relevance
    above_6 = lrpx.explain(lrpx.convert(model[7:], composite()), after_6, 2).relevance
    torch.testing.assert_close(explanation.recorded["3"], above_3, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(explanation.recorded["6"], above_6, rtol=1e-12, atol=1e-14)
    plain = lrpx.explain(lrpx.convert(model, composite()), x, 2)
    torch.testing.assert_close(explanation.relevance, plain.relevance, rtol=0, atol=0)  # recording changes nothing


def test_recorded_relevance_in_a_resnet_through_skip_connections():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=5).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    explanation = lrpx.explain(lrpx.convert(model, composite()), x, 3, record=["layer3", "layer4"])
    with torch.no_grad():
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)
        after_layer3 = model.layer3(stem(x))
    top = nn.Sequential(copy.deepcopy(model.layer4), model.avgpool, nn.Flatten(), model.fc).eval()
    above = lrpx.explain(lrpx.convert(top, composite()), after_layer3, 3).relevance
    torch.testing.assert_close(explanation.recorded["layer3"], above, rtol=1e-10, atol=1e-13)
    assert explanation.recorded["layer4"].shape == (2, 512, 1, 1)


def test_conditions_on_every_channel_sum_to_the_unconditioned_heatmap():
    lrp = lrpx.convert(small_cnn(), composite())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    every = concepts.attribute(lrp, x, 1, conditions=[{"2": [c]} for c in range(8)])
    plain = lrpx.explain(lrp, x, 1).relevance
    torch.testing.assert_close(every.relevance.sum(1), plain, rtol=1e-10, atol=1e-13)
    assert every.relevance.shape == (2, 8, 3, 8, 8) and every.target.tolist() == [1, 1]


def test_batched_conditions_equal_conditions_one_by_one():
    lrp = lrpx.convert(small_cnn(), composite())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    conditions = [{}, {"2": [0, 3]}, {"2": [5], "6": [1, 2]}, {"6": [4]}]
    batched = concepts.attribute(lrp, x, 0, conditions=conditions, record=["0", "6"])
    for k, condition in enumerate(conditions):
        alone = concepts.attribute(lrp, x, 0, conditions=[condition], record=["0", "6"])
        torch.testing.assert_close(batched.relevance[:, k], alone.relevance[:, 0], rtol=1e-12, atol=1e-14)
        for name in ("0", "6"):
            torch.testing.assert_close(batched.recorded[name][:, k], alone.recorded[name][:, 0], rtol=1e-12,
                                       atol=1e-14)
    # a recorded layer that is also conditioned reports the relevance before its own mask
    torch.testing.assert_close(batched.recorded["6"][:, 3], batched.recorded["6"][:, 0], rtol=1e-12, atol=1e-14)
    # passes of fewer rows than input x conditions give the same result, in the same order
    for rows in (1, 3, 5):
        split = concepts.attribute(lrp, x, 0, conditions=conditions, record=["0", "6"], batch_size=rows)
        torch.testing.assert_close(split.relevance, batched.relevance, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(split.recorded["6"], batched.recorded["6"], rtol=1e-12, atol=1e-14)
        assert split.conditions == batched.conditions and split.target.tolist() == [0, 0]
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        concepts.attribute(lrp, x, 0, conditions=conditions, batch_size=0)


def test_channel_relevance_top_and_sub_concepts():
    lrp = lrpx.convert(small_cnn(), composite())
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    recorded = lrpx.explain(lrp, x, 2, record=["2"]).recorded["2"]
    per_channel = concepts.channel_relevance(recorded)
    torch.testing.assert_close(per_channel, recorded.sum((2, 3)))
    channels, values, share = concepts.top_concepts(lrp, x, 2, layer="2", k=3)
    assert channels.tolist()[0] == per_channel[0].argsort(descending=True)[:3].tolist()
    torch.testing.assert_close(share, values / per_channel.sum(1, keepdim=True))
    lower = concepts.sub_concepts(lrp, x, 2, layer="2", channel=int(channels[0, 0]), lower="0")
    conditional = concepts.attribute(lrp, x, 2, conditions=[{"2": [int(channels[0, 0])]}], record=["0"])
    torch.testing.assert_close(lower, conditional.recorded["0"][:, 0].sum((2, 3)))


def test_skip_connections_carry_relevance_around_a_condition():
    torch.manual_seed(0)
    lrp = lrpx.convert(torchvision.models.resnet18(weights=None, num_classes=5).double().eval(), composite())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with pytest.warns(UserWarning, match="keep channels that receive no relevance"):  # the empty channel lists
        result = concepts.attribute(lrp, x, 1, conditions=[{"layer4.1.conv2": []}, {"layer4": []}])
    assert result.relevance[0, 0].abs().sum() > 0  # the identity of the block still carries relevance
    assert result.relevance[0, 1].abs().sum() == 0  # the block's output is masked whole


def test_two_threads_record_different_layers():
    lrp = lrpx.convert(small_cnn(), composite())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    expected = {name: lrpx.explain(lrp, x, 1, record=[name]).recorded[name] for name in ("0", "6")}
    results, errors = {}, []

    def run(name):
        try:
            for _ in range(20):
                results[name] = lrpx.explain(lrp, x, 1, record=[name]).recorded
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("0", "6")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in ("0", "6"):
        assert list(results[name]) == [name]
        torch.testing.assert_close(results[name][name], expected[name], rtol=0, atol=0)


def test_bad_layers_channels_and_unreached_conditions():
    lrp = lrpx.convert(small_cnn(), composite())
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"no module named 'feature.2'"):
        lrpx.explain(lrp, x, 0, record=["feature.2"])
    with pytest.raises(ValueError, match=r"channel 8 is out of range for '2', whose output has 8 channels \(0..7\)"):
        concepts.attribute(lrp, x, 0, conditions=[{"2": [8]}])
    with pytest.raises(TypeError, match="needs a model returned by lrpx.convert"):
        lrpx.explain(small_cnn(), x, 0, record=["2"])
    dead = lrpx.convert(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval())
    with torch.no_grad():
        dead[2].weight.zero_()  # the output does not depend on layer 0
    with pytest.warns(UserWarning, match="keep channels that receive no relevance"):
        concepts.attribute(dead, torch.rand(1, 4, dtype=torch.float64), 0, conditions=[{"0": [1]}])
