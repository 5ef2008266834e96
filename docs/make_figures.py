"""Make the README's segmentation and detection figures from the built-in shapes data.

    python docs/make_figures.py [--out docs] [--threads 1]

Trains two small torchvision models on the CPU (seeded; the weights are cached in
``lrpx.datasets.cache_dir()``, so a second run only explains and draws), explains test images
with ``epsilon_gamma_box`` and writes ``segmentation.png`` and ``detection.png``:

* segmentation: torchvision's ``LRASPP`` head (the head of ``lraspp_mobilenet_v3_large``) on a
  three-layer convolutional backbone, 6 classes (background and the five shapes), on 64x64
  shapes images; per image the relevance of the true class's logits summed over the pixels
  predicted as that class (``lrpx.targets.segment`` with that mask), the object mask outlined
  in yellow, the predicted one in cyan;
* detection: torchvision's ``FasterRCNN`` (RPN, multi-scale RoIAlign, two-layer box head) on a
  four-layer convolutional backbone, on 128x128 images made of four shapes images tiled 2x2,
  boxes from the object masks; per image the relevance of the top detection's class logit
  (``lrpx.targets.detection(0)``), its box in yellow, the true boxes in green.

With torchvision's own backbones (MobileNetV3) one training step took seconds on a shared
two-core CPU (``lraspp_mobilenet_v3_large``: 4-7 s for 32 images of 64x64;
``fasterrcnn_mobilenet_v3_large_fpn``: 30-90 s for 8 images of 128x128), too slow for a figure
made in minutes; the small backbones here take 0.1 s and 0.7 s, with the same heads, pooling
and post-processing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.segmentation.lraspp import LRASPP
from torchvision.ops import MultiScaleRoIAlign

import lrpx
from lrpx.datasets import cache_dir
from lrpx.datasets.shapes import CLASSES, MEAN, STD, Shapes, make_shapes, normalize, zbox_bounds
from lrpx.image import heatmap, image_grid, mask_outline, save_png

SEED = 0
SEGMENTATION = {"size": 64, "images": 2000, "epochs": 6, "batch": 32, "lr": 1e-2, "background_weight": 0.2}
DETECTION = {"tiles": 2, "images": 600, "epochs": 3, "batch": 8, "lr": 2e-3, "min_size": 128}


# --- data -------------------------------------------------------------------------------------

def class_maps(data: Shapes) -> Tensor:
    """``(N, H, W)`` int64 maps: 0 on the background, ``label + 1`` on the object."""
    return data.masks[:, 0].long() * (data.labels.view(-1, 1, 1) + 1)


def tiled(n: int, *, seed: int, tiles: int = 2, size: int = 64) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """``n`` images of ``tiles x tiles`` shapes images each, and per image the detection targets
    (``boxes`` from the object masks, ``labels`` = class + 1)."""
    data = make_shapes(n * tiles * tiles, seed=seed, size=size)
    images = data.images.view(n, tiles, tiles, 3, size, size).permute(0, 3, 1, 4, 2, 5)
    images = images.reshape(n, 3, tiles * size, tiles * size)
    masks = data.masks[:, 0].view(n, tiles * tiles, size, size)
    targets = []
    for i in range(n):
        boxes = []
        for k in range(tiles * tiles):
            ys, xs = torch.nonzero(masks[i, k], as_tuple=True)
            dy, dx = (k // tiles) * size, (k % tiles) * size
            boxes.append(torch.stack([xs.min() + dx, ys.min() + dy, xs.max() + 1 + dx, ys.max() + 1 + dy]).float())
        labels = data.labels[i * tiles * tiles:(i + 1) * tiles * tiles] + 1
        targets.append({"boxes": torch.stack(boxes), "labels": labels})
    return images, targets


# --- models -----------------------------------------------------------------------------------

def conv_block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def segmentation_model() -> nn.Module:
    """torchvision's LRASPP head on a four-layer backbone: "low" features at stride 2, "high" at 8."""
    layers = nn.Sequential(*conv_block(3, 16, 2), *conv_block(16, 32, 2), *conv_block(32, 48, 2))
    backbone = IntermediateLayerGetter(layers, return_layers={"2": "low", "8": "high"})
    return LRASPP(backbone, low_channels=16, high_channels=48, num_classes=len(CLASSES) + 1, inter_channels=32)


def detection_model() -> nn.Module:
    """torchvision's Faster R-CNN (RPN, RoIAlign, two-layer box head) on a four-layer backbone
    of stride 8, anchors of 16 and 32 pixels."""
    backbone = nn.Sequential(*conv_block(3, 32, 2), *conv_block(32, 48, 2), *conv_block(48, 64, 2),
                             *conv_block(64, 64, 1))
    backbone.out_channels = 64
    size = DETECTION["min_size"]
    return FasterRCNN(backbone, min_size=size, max_size=size, image_mean=list(MEAN), image_std=list(STD),
                      rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
                      box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(64 * 7 * 7, 256),
                      box_predictor=FastRCNNPredictor(256, len(CLASSES) + 1), rpn_pre_nms_top_n_train=600,
                      rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                      box_batch_size_per_image=128, box_detections_per_img=20)


def cached(name: str, settings: dict, build, fit) -> nn.Module:
    """``build()`` with the weights ``fit(model)`` trains, kept in the cache under a key of ``settings``."""
    key = hashlib.sha256(json.dumps({"name": name, "seed": SEED, "torchvision": torchvision.__version__, **settings},
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / f"figure-{name}-{key}.pt"
    torch.manual_seed(SEED)
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    start = time.perf_counter()
    fit(model)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def fit_segmentation(model: nn.Module) -> None:
    s = SEGMENTATION
    data = make_shapes(s["images"], seed=SEED, size=s["size"])
    x, y = normalize(data.images), class_maps(data)
    steps = s["epochs"] * (len(x) // s["batch"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, s["lr"], total_steps=steps)
    weight = torch.tensor([s["background_weight"]] + [1.0] * len(CLASSES))  # objects cover few pixels
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(s["epochs"]):
        for batch in torch.randperm(len(x), generator=g).split(s["batch"])[:len(x) // s["batch"]]:
            loss = F.cross_entropy(model(x[batch])["out"], y[batch], weight=weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    print(f"segmentation: last loss {loss.item():.3f}", flush=True)


def fit_detection(model: nn.Module) -> None:
    s = DETECTION
    images, targets = tiled(s["images"], seed=SEED, tiles=s["tiles"])
    steps = s["epochs"] * (len(images) // s["batch"])
    optimiser = torch.optim.AdamW(model.parameters(), lr=s["lr"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, s["lr"], total_steps=steps)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(s["epochs"]):
        for batch in torch.randperm(len(images), generator=g).split(s["batch"])[:len(images) // s["batch"]]:
            losses = model(list(images[batch]), [targets[i] for i in batch.tolist()])
            loss = sum(losses.values())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    print(f"detection: last losses {({k: round(v.item(), 3) for k, v in losses.items()})}", flush=True)


# --- figures ----------------------------------------------------------------------------------

def box_outline(image: Tensor, box: Tensor, colour=(1.0, 0.85, 0.0)) -> Tensor:
    """``image`` ``(3, H, W)`` with the border of ``box`` (x1, y1, x2, y2) painted ``colour``."""
    h, w = image.shape[-2:]
    x1, y1 = (int(v) for v in box[:2].floor().clamp(min=0))
    x2, y2 = min(int(box[2].ceil()) - 1, w - 1), min(int(box[3].ceil()) - 1, h - 1)
    mask = torch.zeros(1, 1, h, w, dtype=torch.bool)
    mask[..., y1:y2 + 1, x1:x2 + 1] = True
    return mask_outline(image[None], mask, colour=colour)[0]


def segmentation_figure(model: nn.Module, out: Path) -> Path:
    test = make_shapes(4, seed=1_000_000, size=SEGMENTATION["size"])
    low, high = zbox_bounds()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low, high))
    x = normalize(test.images)
    rows, titles = [], []
    for i in range(len(test)):
        label = int(test.labels[i])
        with torch.no_grad():
            predicted = model(x[i:i + 1])["out"].argmax(1, keepdim=True) == label + 1
        region = predicted[0, 0] if predicted.any() else test.masks[i, 0]
        e = lrpx.explain(lrp, x[i:i + 1], lrpx.targets.segment(label + 1, mask=region))
        rows.append([mask_outline(test.images[i:i + 1], test.masks[i:i + 1])[0],
                     mask_outline(test.images[i:i + 1], predicted, colour=(0.0, 0.9, 1.0))[0],
                     heatmap(e.relevance)[0]])
        titles.append(CLASSES[label])
    grid = image_grid(rows, column_titles=["true mask", "predicted", "relevance"], row_titles=titles, scale=2)
    return save_png(grid, out / "segmentation.png")


def detection_figure(model: nn.Module, out: Path) -> Path:
    images, targets = tiled(3, seed=1_000_000, tiles=DETECTION["tiles"])
    low, high = zbox_bounds()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low, high))
    rows, titles = [], []
    for i in range(len(images)):
        e = lrpx.explain(lrp, images[i:i + 1], lrpx.targets.detection(0))
        top = e.output[0]
        label, score = int(top["labels"][0]), float(top["scores"][0])
        truth = images[i]
        for box in targets[i]["boxes"]:
            truth = box_outline(truth, box, colour=(0.2, 0.9, 0.2))
        rows.append([truth, box_outline(images[i], top["boxes"][0]), heatmap(e.relevance)[0]])
        titles.append(f"{CLASSES[label - 1]} {score:.2f}")
    grid = image_grid(rows, column_titles=["true boxes", "top detection", "relevance"], row_titles=titles, scale=2)
    return save_png(grid, out / "detection.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["segmentation", "detection"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only != "detection":
        model = cached("segmentation", SEGMENTATION, segmentation_model, fit_segmentation)
        print("wrote", segmentation_figure(model, args.out), flush=True)
    if args.only != "segmentation":
        model = cached("detection", DETECTION, detection_model, fit_detection)
        print("wrote", detection_figure(model, args.out), flush=True)


if __name__ == "__main__":
    main()
