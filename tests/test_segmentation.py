"""Segmentation: the interpolation rule against a numpy oracle, callable targets, and torchvision's
FCN / DeepLabV3 / LRASPP families converted and accounted for exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import lrpx
from lrpx.layers import Interpolate
from lrpx.rules import Norm
from lrpx.targets import segment
from zoo import SEGMENTATION, Recorder, randomized

pytestmark = pytest.mark.usefixtures("one_thread")


def weights_1d(size_in: int, size_out: int, mode: str, align_corners: bool, scale: float | None) -> np.ndarray:
    """The ``(out, in)`` matrix of 1-d interpolation, from the coordinate formulas."""
    w = np.zeros((size_out, size_in))
    ratio = (1 / scale if scale else size_in / size_out)
    for k in range(size_out):
        if mode == "nearest":
            w[k, min(int(math.floor(k * ratio)), size_in - 1)] = 1.0
            continue
        if align_corners:
            src = k * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        else:
            src = max((k + 0.5) * ratio - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        lam = src - i0
        w[k, i0] += 1 - lam
        w[k, i1] += lam
    return w


def norm_rule(x: np.ndarray, matrix: np.ndarray, r: np.ndarray, e: float) -> np.ndarray:
    z = matrix @ x
    return x * (matrix.T @ (r / (z + e * np.where(z >= 0, 1.0, -1.0))))


CASES = [  # (input h, w), size or scale, mode, align_corners
    ((3, 4), {"size": (7, 9)}, "bilinear", False),
    ((3, 4), {"size": (7, 9)}, "bilinear", True),
    ((5, 6), {"scale_factor": 2.0}, "bilinear", False),
    ((6, 8), {"size": (4, 3)}, "bilinear", False),
    ((3, 5), {"scale_factor": 3.0}, "nearest", None),
    ((4, 4), {"size": (6, 10)}, "nearest", None),
]


@pytest.mark.parametrize("shape, size, mode, corners", CASES)
def test_interpolation_rule_against_a_dense_oracle(shape, size, mode, corners):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, *shape, generator=g, dtype=torch.float64) + 0.1
    layer = Interpolate(mode, corners, rule=Norm(1e-6))
    xin = x.clone().requires_grad_()
    y = layer(xin, **size)
    torch.testing.assert_close(y, F.interpolate(x, mode=mode, align_corners=corners, **size), rtol=0, atol=0)
    r = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xin, r)
    scale = size.get("scale_factor")
    matrix = np.kron(weights_1d(shape[0], y.shape[2], mode, bool(corners), scale),
                     weights_1d(shape[1], y.shape[3], mode, bool(corners), scale))
    for b in range(2):
        for c in range(3):
            # the oracle's matrix is the forward too: a wrong oracle fails here first
            np.testing.assert_allclose(matrix @ x[b, c].numpy().ravel(), y[b, c].detach().numpy().ravel(), rtol=1e-12)
            expected = norm_rule(x[b, c].numpy().ravel(), matrix, r[b, c].numpy().ravel(), 1e-6)
            np.testing.assert_allclose(got[b, c].numpy().ravel(), expected, rtol=1e-10, atol=1e-12)


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear")
        self.head = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        size = x.shape[-2:]
        y = self.head(self.up(self.conv(x)))
        return {"out": F.interpolate(y, size=size, mode="bilinear", align_corners=False)}


def test_upsample_and_runtime_interpolate_conserve_relevance():
    torch.manual_seed(0)
    model = Decoder().double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=lrpx.rules.Epsilon(0.0), sum=Norm(0.0)))
    assert isinstance(lrp.up, lrpx.layers.Twin) and isinstance(lrp.up, nn.Upsample)
    assert sum(isinstance(m, Interpolate) for m in lrp.modules()) == 1  # the F.interpolate call
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(lrp(x)["out"], model(x)["out"], rtol=1e-12, atol=1e-12)
    explanation = lrpx.explain(lrp, x, segment(1))
    # no biases and no stabilizer: everything of the score arrives at the input
    torch.testing.assert_close(explanation.relevance.sum((1, 2, 3)), explanation.score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(explanation.score, model(x)["out"][:, 1].sum((1, 2)))
    assert explanation.target is None and set(explanation.output) == {"out"}


def test_segment_target_region_and_bad_input():
    torch.manual_seed(0)
    lrp = lrpx.convert(Decoder().double().eval())
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    mask = torch.zeros(6, 5, dtype=torch.bool)
    mask[1:3, 2:4] = True
    full, part = lrpx.explain(lrp, x, segment(0)), lrpx.explain(lrp, x, segment(0, mask))
    torch.testing.assert_close(part.score, full.output["out"][:, 0, 1:3, 2:4].sum((1, 2)))
    with pytest.raises(ValueError, match=r"class 2 is outside the head's 2 classes \(0..1\)"):
        lrpx.explain(lrp, x, segment(2))
    with pytest.raises(ValueError, match=r"mask has shape \(5, 6\); expected \(H, W\) or \(B, H, W\)"):
        lrpx.explain(lrp, x, segment(0, torch.ones(5, 6)))
    with pytest.raises(ValueError, match=r"the target callable returned shape \(2, 6, 5\); it must return \(2,\)"):
        lrpx.explain(lrp, x, lambda out: out["out"][:, 0])
    with pytest.raises(TypeError, match="the target callable returned float"):
        lrpx.explain(lrp, x, lambda out: 1.0)
    with pytest.raises(TypeError, match="a callable target that picks the scores"):
        lrpx.explain(lrp, x, 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SEGMENTATION))
def test_segmentation_family_converts_and_accounts_for_relevance(name):
    size, kwargs = SEGMENTATION[name]
    net = randomized(name, num_classes=4, weights_backbone=None, **kwargs)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-3, 3)
    lrp = lrpx.convert(net, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
    with torch.no_grad():
        ref, out = net(x), lrp(x)
    assert ref.keys() == out.keys()
    for key in ref:
        assert (out[key] - ref[key]).abs().max() <= 1e-8 * ref[key].abs().max(), (name, key)
    rec = Recorder(lrp)
    xin = x.clone().requires_grad_()
    y = lrp(xin)["out"]
    r_out = torch.zeros_like(y)
    r_out[:, 2] = y.detach()[:, 2]  # class 2 over the whole map
    params = [p for p in lrp.parameters() if p.requires_grad]
    rel, *param_rel = torch.autograd.grad(y, [xin] + params, r_out, allow_unused=True)
    rec.remove()
    absorbed = rec.total_absorbed() + sum((g.sum() for g in param_rel if g is not None), torch.zeros(()).double())
    rec.calls.clear()
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert (rel.sum() + absorbed - r_out.sum()).abs() <= 1e-8 * r_out.sum().abs(), name
    # lrpx.explain with the segment target gives the same relevance
    torch.testing.assert_close(lrpx.explain(lrp, x, segment(2)).relevance, rel, rtol=1e-10, atol=1e-12)
    assert sum(isinstance(m, Interpolate) for m in lrp.modules()) >= 1


def test_segmentation_models_need_no_download():
    # weights_backbone=None: nothing is fetched to build the families above
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pixel_flipping_of_a_segmentation_region():
    """The score of each perturbed input is the mean class logit over the sample's own region."""
    torch.manual_seed(0)
    model = Decoder().double().eval()
    x = torch.rand(2, 3, 6, 5, dtype=torch.float64)
    masks = torch.zeros(2, 6, 5, dtype=torch.bool)
    masks[0, :3], masks[1, 3:] = True, True
    relevance = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    target = segment(1, masks, reduce="mean")
    result = lrpx.eval.pixel_flipping(model, x, relevance, target, patch_size=1, steps=4, fill=0.0,
                                      order=("morf", "random"), generator=torch.Generator().manual_seed(0))
    assert result.target.tolist() == [-1, -1] and result.score == "segment(1)"
    inputs, _ = lrpx.eval.perturbed_inputs(x, relevance, at=[0, 2, 4], order="morf", steps=4, fill=0.0)
    for k, step in enumerate([0, 2, 4]):
        out = model(inputs[k])["out"][:, 1]
        expected = torch.stack([out[b][masks[b]].mean() for b in range(2)])
        torch.testing.assert_close(result.curve("morf")[:, step], expected)
    corr = lrpx.eval.faithfulness_correlation(model, x, relevance, target, subsets=6, subset_size=5, fill=0.0,
                                              generator=torch.Generator().manual_seed(0))
    assert corr.shape == (2,) and torch.isfinite(corr).all()
    with pytest.raises(ValueError, match=r"the target callable returned shape"):
        lrpx.eval.pixel_flipping(model, x, relevance, lambda out, sample: out["out"][:, 1], steps=2, fill=0.0)
