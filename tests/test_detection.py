"""Detection: the RoIAlign rule against a numpy oracle, the detection layers' twins, torchvision's
detection families converted (same detections) and accounted for exactly, the detection target
and its bad inputs, and pixel flipping of one detection."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, roi_align
from zoo import DETECTION, Recorder, randomized_detector, stab

import lrpx
from lrpx.layers.detection import (
    LRPConvTranspose2d,
    LRPFrozenBatchNorm2d,
    LRPMultiScaleRoIAlign,
    RoIAlignOps,
)
from lrpx.rules import Epsilon, Norm
from lrpx.targets import detection, matched_detection

pytestmark = pytest.mark.usefixtures("one_thread")


def roi_align_matrix(height, width, box, scale, pooled, sampling_ratio, aligned) -> np.ndarray:
    """The ``(pooled_h * pooled_w, height * width)`` matrix of RoIAlign for one box, from its
    definition: each bin averages bilinear samples on a regular grid."""
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (float(v) * scale - offset for v in box)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
    bin_h, bin_w = roi_h / pooled[0], roi_w / pooled[1]
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled[0])
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled[1])
    count = max(grid_h * grid_w, 1)
    m = np.zeros((pooled[0] * pooled[1], height * width))
    for ph in range(pooled[0]):
        for pw in range(pooled[1]):
            row = ph * pooled[1] + pw
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    if y < -1.0 or y > height or x < -1.0 or x > width:
                        continue
                    y, x = max(y, 0.0), max(x, 0.0)
                    y0, x0 = int(y), int(x)
                    if y0 >= height - 1:
                        y0 = y1_ = height - 1
                        y = float(y0)
                    else:
                        y1_ = y0 + 1
                    if x0 >= width - 1:
                        x0 = x1_ = width - 1
                        x = float(x0)
                    else:
                        x1_ = x0 + 1
                    ly, lx = y - y0, x - x0
                    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x1_, (1 - ly) * lx),
                                      (y1_, x0, ly * (1 - lx)), (y1_, x1_, ly * lx)):
                        m[row, yy * width + xx] += w / count
    return m


ROI_CASES = [  # box (x1, y1, x2, y2) in image coordinates, spatial scale, output size, sampling ratio, aligned
    ((1.0, 2.0, 13.0, 9.0), 0.5, (3, 2), 2, False),
    ((0.3, 0.7, 6.1, 11.9), 0.5, (2, 3), -1, False),
    ((-3.0, 4.0, 20.0, 30.0), 0.5, (4, 4), 2, True),
    ((5.0, 5.0, 5.5, 5.2), 1.0, (2, 2), 0, False),  # smaller than one cell: widened to 1
]


@pytest.mark.parametrize("box, scale, pooled, ratio, aligned", ROI_CASES)
def test_roi_align_rule_against_a_dense_oracle(box, scale, pooled, ratio, aligned):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 2, 7, 8, generator=g, dtype=torch.float64) + 0.05
    rois = torch.tensor([[0.0, *box]], dtype=torch.float64)
    ops = RoIAlignOps(rois, pooled, scale, ratio, aligned)
    xin = x.clone().requires_grad_()
    y = lrpx.core.lrp_apply(ops, Norm(1e-6), xin)
    torch.testing.assert_close(y, roi_align(x, rois, pooled, scale, ratio, aligned), rtol=0, atol=0)
    r = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xin, r)
    m = roi_align_matrix(7, 8, box, scale, pooled, ratio, aligned)
    for c in range(2):
        xc = x[0, c].numpy().ravel()
        z = m @ xc
        # the oracle's matrix is the forward too: a wrong oracle fails here first
        np.testing.assert_allclose(z, y[0, c].detach().numpy().ravel(), rtol=1e-12, atol=1e-14)
        rc = r[0, c].numpy().ravel()
        expected = xc * (m.T @ (rc / (z + 1e-6 * np.where(z >= 0, 1.0, -1.0))))
        np.testing.assert_allclose(got[0, c].numpy().ravel(), expected, rtol=1e-10, atol=1e-12)


def test_multiscale_roi_align_twin_equals_the_original_and_conserves():
    g = torch.Generator().manual_seed(1)
    pool = MultiScaleRoIAlign(["0", "1"], 3, 2)
    feats = {"0": torch.rand(2, 3, 64, 64, generator=g, dtype=torch.float64),
             "1": torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64),
             "pool": torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)}
    boxes = [torch.tensor([[1.0, 1.0, 220.0, 250.0], [2.0, 3.0, 9.0, 12.0]], dtype=torch.float64),
             torch.tensor([[0.0, 0.0, 255.0, 255.0], [10.0, 10.0, 20.0, 40.0], [5.0, 6.0, 7.0, 8.0]],
                          dtype=torch.float64)]
    shapes = [(256, 256), (256, 256)]
    twin = LRPMultiScaleRoIAlign.from_module(pool, Norm(0.0))
    leaves = {k: v.clone().requires_grad_() for k, v in feats.items()}
    y = twin(leaves, boxes, shapes)
    torch.testing.assert_close(y, pool(feats, boxes, shapes), rtol=0, atol=0)
    assert pool.scales == [0.25, 0.125] and set(twin.map_levels(boxes).tolist()) == {0, 1}  # both levels used
    r = torch.rand(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(y, [leaves["0"], leaves["1"]], r)
    # Norm(0): every box's relevance arrives at its own level, nothing is absorbed
    torch.testing.assert_close(sum(gr.sum() for gr in grads), r.sum(), rtol=1e-12, atol=0)
    levels = twin.map_levels(boxes)
    for level, gr in enumerate(grads):
        torch.testing.assert_close(gr.sum(), r[levels == level].sum(), rtol=1e-12, atol=0)


def test_conv_transpose_twin_against_its_dense_map():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 2, 2, stride=2).double()
    twin = LRPConvTranspose2d.from_module(conv, Epsilon(1e-6))
    x = torch.rand(1, 3, 3, 4, dtype=torch.float64)
    xin = x.clone().requires_grad_()
    y = twin(xin)
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
    r = torch.randn(y.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xin, r)
    # the dense map from unit inputs through torch's own transposed convolution
    with torch.no_grad():
        basis = torch.eye(x.numel(), dtype=torch.float64).view(-1, 3, 3, 4)
        w = (nn.functional.conv_transpose2d(basis, conv.weight, None, 2)).flatten(1).T  # (out, in)
    z = w @ x.flatten() + conv.bias.detach().repeat_interleave(y.shape[2] * y.shape[3])
    expected = x.flatten() * (w.T @ (r.flatten() / stab(z, 1e-6)))
    torch.testing.assert_close(got.flatten(), expected, rtol=1e-10, atol=1e-12)


def test_frozen_batchnorm_twin_and_folding():
    torch.manual_seed(0)
    bn = FrozenBatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_mean.copy_(torch.tensor([0.2, 0.0, -0.4]))
        bn.running_var.copy_(torch.tensor([0.8, 1.2, 2.0]))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    twin = LRPFrozenBatchNorm2d.from_module(bn, Epsilon(0.0))
    xin = x.clone().requires_grad_()
    y = twin(xin)
    torch.testing.assert_close(y, bn(x), rtol=1e-14, atol=1e-14)
    r = torch.randn(y.shape, dtype=torch.float64)
    (got,) = torch.autograd.grad(y, xin, r)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(got, x * scale.view(1, -1, 1, 1) * r / y.detach(), rtol=1e-10, atol=1e-12)
    model = nn.Sequential(nn.Conv2d(3, 3, 3), bn).double().eval()
    lrp = lrpx.convert(model)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in lrp.modules())  # folded into the conv
    torch.testing.assert_close(lrp(x), model(x), rtol=1e-12, atol=1e-12)
    assert isinstance(model[1], FrozenBatchNorm2d) and type(model[1]) is FrozenBatchNorm2d  # user's model unchanged


class L2Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.scale.view(1, -1, 1, 1) * nn.functional.normalize(self.conv(x))


def test_l2_normalisation_passes_relevance_unchanged():
    torch.manual_seed(0)
    model = L2Scaled().double().eval()
    lrp = lrpx.convert(model, lrpx.Composite(default=Epsilon(0.0)))
    assert sum(isinstance(m, lrpx.layers.Normalize) for m in lrp.modules()) == 1
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(lrp(x), model(x), rtol=1e-14, atol=1e-14)
    xin = x.clone().requires_grad_()
    y = lrp(xin)
    (rel,) = torch.autograd.grad(y, xin, y.detach())
    # the constant scale and the norm pass relevance; the bias-free conv with LRP-0 conserves it
    torch.testing.assert_close(rel.sum((1, 2, 3)), y.detach().sum((1, 2, 3)), rtol=1e-10, atol=1e-12)


def explained(lrp, x, index=0):
    """Relevance of detection ``index`` of each image, the explained logits and the relevance
    absorbed, accounted for from the rule definitions (``zoo.Recorder``)."""
    rec = Recorder(lrp)
    padding = []  # relevance on the zeros that batch the images to a multiple of 32 (outside every image)

    def on_batch(module, args, output):
        images = output[0]

        def keep(grad):
            inside = sum(grad[i, :, :h, :w].sum() for i, (h, w) in enumerate(images.image_sizes))
            padding.append(grad.sum() - inside)
        images.tensors.register_hook(keep)

    handle = lrp.transform.register_forward_hook(on_batch)
    xin = x.clone().requires_grad_()
    out = lrp(xin)
    handle.remove()
    logits = [r["class_logits"] for r in out]
    r_out, score = [], torch.zeros((), dtype=x.dtype)
    for r, lg in zip(out, logits):
        start = torch.zeros_like(lg)
        label = int(r["labels"][index])
        start[index, label] = lg.detach()[index, label]
        score = score + lg.detach()[index, label]
        r_out.append(start)
    params = [p for p in lrp.parameters() if p.requires_grad]
    rel, *param_rel = torch.autograd.grad(logits, [xin] + params, r_out, allow_unused=True)
    rec.remove()
    absorbed = rec.total_absorbed() + sum((g.sum() for g in param_rel if g is not None), torch.zeros((), dtype=x.dtype))
    absorbed = absorbed.detach() + sum(padding)
    rec.calls.clear()
    return rel, score, absorbed, out


def check_family(name, frozen, batch=1):
    size, _ = DETECTION[name]
    net = randomized_detector(name, frozen=frozen)
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lrp = lrpx.convert(net, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
    with torch.no_grad():
        ref, got = net(x), lrp(x)
    assert len(ref) == len(got) == batch
    for a, b in zip(ref, got):
        assert len(a["boxes"]) > 0, name
        assert set(b) == set(a) | {"class_logits"}
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=0, atol=1e-8)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=1e-8)
        assert torch.equal(b["labels"], a["labels"])
        assert b["class_logits"].shape == (len(a["boxes"]), 5)
        # each detection's logit row is the one its reported score was computed from
        picked = b["class_logits"].gather(1, b["labels"].view(-1, 1)).squeeze(1)
        if name.startswith(("retinanet", "fcos")):  # sigmoid scores (FCOS: times a centre-ness <= 1)
            probability = torch.sigmoid(picked)
        else:  # softmax scores over the classes and the background
            probability = torch.softmax(b["class_logits"], 1).gather(1, b["labels"].view(-1, 1)).squeeze(1)
        if name.startswith("fcos"):
            assert (b["scores"] ** 2 <= probability + 1e-12).all()
        else:
            torch.testing.assert_close(probability, b["scores"], rtol=1e-10, atol=1e-12)
    rel, score, absorbed, _ = explained(lrp, x)
    assert torch.isfinite(rel).all() and rel.abs().sum() > 0
    assert abs(float(rel.sum() + absorbed - score)) <= 1e-8 * max(1.0, abs(float(score))), \
        (name, float(rel.sum()), float(absorbed), float(score))
    if name != "ssd300_vgg16":  # the slowest family: its explanation is checked above only
        explanation = lrpx.explain(lrp, x, detection(0))
        torch.testing.assert_close(explanation.relevance, rel, rtol=1e-10, atol=1e-12)
    return net, lrp


def test_faster_rcnn_with_frozen_batchnorms_converts_and_accounts_for_relevance():
    before = randomized_detector("fasterrcnn_resnet50_fpn", frozen=True).state_dict()
    net, lrp = check_family("fasterrcnn_resnet50_fpn", frozen=True, batch=2)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert any(type(m) is FrozenBatchNorm2d for m in net.modules())
    assert type(net.roi_heads) is torchvision.models.detection.roi_heads.RoIHeads  # not mutated
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in lrp.modules())  # folded
    assert any(isinstance(m, LRPMultiScaleRoIAlign) for m in lrp.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in DETECTION if n != "fasterrcnn_resnet50_fpn"])
def test_detection_family_converts_and_accounts_for_relevance(name):
    check_family(name, frozen=name.endswith("resnet50_fpn"))


def rcnn(**kwargs):
    torch.manual_seed(0)
    return torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=4, min_size=64, max_size=64, rpn_pre_nms_top_n_test=30,
        rpn_post_nms_top_n_test=10, box_detections_per_img=3, **kwargs).double().eval()


def test_detection_target_picks_one_logit_and_refuses_bad_input():
    net = rcnn(box_score_thresh=0.0)
    lrp = lrpx.convert(net)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = lrpx.explain(lrp, x, detection(1))
    out = e.output
    expected = torch.stack([r["class_logits"][1, r["labels"][1]] for r in out])
    torch.testing.assert_close(e.score, expected)
    other = lrpx.explain(lrp, x, detection(1, class_index=0))
    torch.testing.assert_close(other.score, torch.stack([r["class_logits"][1, 0] for r in out]))
    assert not torch.equal(other.relevance, e.relevance)
    with pytest.raises(ValueError, match=r"detection 3 does not exist: image 0 has 3 detections \(indices 0..2\)"):
        lrpx.explain(lrp, x, detection(3))
    with pytest.raises(ValueError, match=r"class 4 is outside the head's 4 classes \(0..3\)"):
        lrpx.explain(lrp, x, detection(0, class_index=4))
    with pytest.raises(ValueError, match=r"the target callable returned shape \(2, 3\); it must return \(2,\)"):
        lrpx.explain(lrp, x, lambda o: torch.stack([r["class_logits"][:, 0] for r in o]))
    with pytest.raises(ValueError, match="index must be a non-negative int"):
        detection(-1)
    with pytest.raises(TypeError, match="hold no 'class_logits': explain a model returned by lrpx.convert"):
        detection(0)(net(x))
    with pytest.raises(TypeError, match="needs the list of dicts"):
        detection(0)(torch.zeros(2, 4))
    with torch.inference_mode():  # detections only, also in inference mode: the same ones
        again = lrp(x)
    for a, b in zip(again, out):
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["boxes"], b["boxes"])
        torch.testing.assert_close(a["class_logits"], b["class_logits"], rtol=0, atol=0)
    empty = lrpx.convert(rcnn(box_score_thresh=1.0))  # softmax scores never exceed 1: no detections
    with pytest.raises(ValueError, match="detection 0 does not exist: image 0 has no detections"):
        lrpx.explain(empty, x, detection(0))


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_matched_detection_scores_the_best_overlap_of_the_same_class():
    ref_boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 40.0]])
    target = matched_detection(ref_boxes, torch.tensor([1, 2]))
    output = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 8.0], [1.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]),
         "labels": torch.tensor([1, 1, 2]), "scores": torch.tensor([0.9, 0.7, 0.95])},
        {"boxes": torch.tensor([[20.0, 20.0, 30.0, 29.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.8])},
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.6])},
    ]
    # IoUs with sample 0's box: 0.8 and 0.9 for class 1 (the class-2 box is ignored);
    # sample 1's box overlaps its only detection by 9 / 20 < 0.5
    assert iou([0, 0, 10, 10], [1, 0, 10, 10]) == 0.9 and iou([20, 20, 30, 40], [20, 20, 30, 29]) == 0.45
    scores = target(output, torch.tensor([0, 1, 0]))
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.0, 0.6]))


def test_pixel_flipping_of_one_detection():
    net = rcnn(box_score_thresh=0.0)
    lrp = lrpx.convert(net)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    e = lrpx.explain(lrp, x, detection(0))
    boxes = torch.stack([r["boxes"][0] for r in e.output])
    labels = torch.stack([r["labels"][0] for r in e.output])
    target = matched_detection(boxes, labels)
    result = lrpx.eval.pixel_flipping(net, x, e.relevance, target, patch_size=8, steps=4, fill=0.0, order="morf")
    inputs, _ = lrpx.eval.perturbed_inputs(x, e.relevance, at=[0, 1, 4], order="morf", steps=4, fill=0.0,
                                           patch_size=8)
    for k, step in enumerate([0, 1, 4]):
        with torch.no_grad():
            out = net(inputs[k])
        expected = []
        for b, r in enumerate(out):
            best, best_iou = 0.0, 0.0
            for box, label, score in zip(r["boxes"].tolist(), r["labels"].tolist(), r["scores"].tolist()):
                overlap = iou(boxes[b].tolist(), box)
                if label == int(labels[b]) and overlap >= 0.5 and overlap > best_iou:
                    best, best_iou = score, overlap
            expected.append(best)
        torch.testing.assert_close(result.curve("morf")[:, step], torch.tensor(expected, dtype=torch.float64))
    # step 0 is the clean input: the detection matches itself
    torch.testing.assert_close(result.curve("morf")[:, 0], torch.stack([r["scores"][0] for r in e.output]))


def test_saturated_scores_still_find_their_proposals():
    """float32 scores of exactly 1.0 have no gradient; the boxes still tell the proposals apart."""
    net = rcnn(box_score_thresh=0.0).float()
    with torch.no_grad():
        net.roi_heads.box_predictor.cls_score.bias[2] = 1000.0  # softmax(...)[2] == 1.0 for every proposal
    lrp = lrpx.convert(net)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = net(x)[0], lrp(x)[0]
    assert (ref["scores"] == 1.0).all() and (ref["labels"] == 2).all() and len(ref["boxes"]) == 3
    assert torch.equal(out["labels"], ref["labels"]) and torch.equal(out["boxes"], ref["boxes"])
    assert (out["class_logits"][:, 2] > 900).all()
    e = lrpx.explain(lrp, x, detection(2))
    assert torch.isfinite(e.relevance).all() and e.relevance.abs().sum() > 0
