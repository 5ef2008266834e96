"""The pieces of the concept atlas: crops of reference images, conditional heatmaps of (input,
channel) pairs, and the scan of a layer, against hand-computed boxes and lrpx.concepts."""
from __future__ import annotations

import pytest
import torch

import lrpx
from lrpx import datasets as ds
from lrpx.atlas import crop_box, mass_box, position_box, scan_layer
from lrpx.atlas.layer import conditional_heatmaps

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mass_box_holds_the_central_mass_along_each_axis():
    heat = torch.zeros(64, 64)
    heat[10:20, 30:40] = -1.0  # magnitude counts: ten rows and columns of 10% each
    assert mass_box(heat, 0.8) == (11, 31, 19, 39)  # rows 11..18: the 10% tails at both ends left out
    assert mass_box(heat, 1.0) == (10, 30, 20, 40)
    assert mass_box(heat, 0.8, min_side=16) == (7, 27, 23, 43)  # widened about the centre
    corner = torch.zeros(64, 64)
    corner[0:2, 60:64] = 1.0
    assert mass_box(corner, 1.0, min_side=8) == (0, 56, 8, 64)  # widened inside the image
    assert mass_box(torch.zeros(8, 8)) is None
    with pytest.raises(ValueError, match="mass must be in"):
        mass_box(heat, 0.0)


def test_crop_box_falls_back_to_the_largest_activation():
    position = 5 * 16 + 7  # row 5, column 7 of a 16 x 16 map on a 64 x 64 input: cells of 4 pixels
    assert position_box(position, (16, 16), (64, 64)) == (16, 24, 28, 36)  # 3 x 3 cells around it
    assert position_box(0, (16, 16), (64, 64)) == (0, 0, 8, 8)
    assert crop_box(torch.zeros(64, 64), position, (16, 16)) == ((16, 24, 28, 36), True)
    heat = torch.zeros(64, 64)
    heat[40, 50] = 2.0  # one pixel: widened to one feature cell
    assert crop_box(heat, position, (16, 16)) == ((39, 49, 43, 53), False)  # 1 pixel before, 2 after


def test_conditional_heatmaps_of_pairs_equal_attribute_per_input():
    torch.manual_seed(0)
    model = ds.ShapesVGG().eval().double()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus())
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    rows, channels = torch.tensor([0, 0, 1, 2, 2]), torch.tensor([4, 9, 4, 0, 31])
    target = torch.tensor([1, 1, 3, 0, 0])
    ours = conditional_heatmaps(lrp, x[rows], target, "0.10", channels, rows_per_pass=2)
    for k in range(len(rows)):
        theirs = lrpx.concepts.attribute(lrp, x[rows[k]][None], int(target[k]),
                                         conditions=[{"0.10": [int(channels[k])]}]).relevance[0, 0]
        torch.testing.assert_close(ours[k], theirs, rtol=1e-10, atol=1e-12)


def test_scan_layer_reads_relevance_and_activation_of_each_channel():
    torch.manual_seed(1)
    model = ds.ShapesResNet().eval().double()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus())
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    found = scan_layer(lrp, x, "blocks.1")
    explained = lrpx.explain(lrp, x, record=["blocks.1"])
    torch.testing.assert_close(found.relevance, explained.recorded["blocks.1"].sum((2, 3)))
    assert found.prediction.tolist() == model(x).argmax(1).tolist()
    activation = model.blocks[:2](model.stem(x)).detach()  # the plain model cut after the block
    torch.testing.assert_close(found.activation, activation.flatten(2).amax(2))
    assert found.spatial == (16, 16)
    at = activation.flatten(2).gather(2, found.position[..., None])[..., 0]  # the value where the scan says
    torch.testing.assert_close(at, found.activation)
