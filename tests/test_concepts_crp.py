"""Conditional relevance against zennit-crp (runs where the ``bench`` extra installs zennit 0.5.1 and
zennit-crp 0.6): conditional heatmaps and the channel relevance of lower layers, float64."""
from __future__ import annotations

import pytest
import torch
import torchvision

import lrpx

crp_attribution = pytest.importorskip("crp.attribution")
zennit_composites = pytest.importorskip("zennit.composites")
zennit_torchvision = pytest.importorskip("zennit.torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "vgg11": ("features.13", "features.8", lambda: []),
    "resnet18": ("layer3", "layer2", lambda: [zennit_torchvision.ResNetCanonizer()]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conditional_heatmaps_and_channel_relevance_equal_zennit_crp(name):
    layer, lower, canonizers = CASES[name]
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).double().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            # zennit's canonizer folds eps into the convolution and leaves the BatchNorm dividing by
            # sqrt(1 + eps) once more (its forward differs from the model's by ~5e-5 on ResNet-18);
            # with eps = 0 both compute the model's forward and the rules can be compared
            module.eps = 0.0
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    channels = [0, 3, 7, 11]
    theirs = crp_attribution.CondAttribution(model)(
        x.clone().requires_grad_(), [{"y": [5], layer: [c]} for c in channels],
        zennit_composites.EpsilonPlus(canonizers=canonizers()), record_layer=[lower])
    ours = lrpx.concepts.attribute(lrpx.convert(model, lrpx.composites.epsilon_plus()), x, 5,
                                   conditions=[{layer: [c]} for c in channels], record=[lower])
    heat = ours.relevance[0].sum(1)
    assert (heat - theirs.heatmap).abs().max() <= 1e-6 * theirs.heatmap.abs().max()
    mine = lrpx.concepts.channel_relevance(ours.recorded[lower][0])
    other = theirs.relevances[lower].sum((2, 3))
    assert (mine - other).abs().max() <= 1e-6 * other.abs().max()
