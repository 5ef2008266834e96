"""``lrpx explain --task detection`` with a local state dict (never downloaded)."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from PIL import Image

from test_cli_explain import decoded, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3)
    torch.save(model.state_dict(), root / "frcnn.pt")
    noise = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte()
    Image.fromarray(noise.numpy()).save(root / "street.png")
    return root


def base(files, out, *extra):
    return ["explain", files / "street.png", "--task", "detection", "--model", "fasterrcnn_resnet50_fpn",
            "--weights", files / "frcnn.pt", "--min-size", "64", "--composite", "epsilon_plus", "--out", out, *extra]


def test_explain_one_detection(files, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(base(files, out, "--detection", "0"))
    assert code == 0, stderr
    found = re.search(r"explained detection 0 of (\d+): class (\d), score ([0-9.]+), "
                      r"box \(([0-9.]+), ([0-9.]+), ([0-9.]+), ([0-9.]+)\)", stdout)
    assert found, stdout
    assert int(found.group(1)) >= 1 and int(found.group(2)) in (1, 2) and 0 < float(found.group(3)) <= 1
    heat = decoded(out / "street_heatmap.png")
    over = decoded(out / "street_overlay.png")
    assert heat.shape == over.shape == (48, 64, 3)  # the input's own size: the model resizes inside
    assert (heat.amin(-1) < 250).double().mean() > 0.01  # relevance somewhere
    x1, y1, x2, y2 = (round(float(found.group(i))) for i in range(4, 8))
    x1, x2, y1, y2 = min(x1, 63), min(x2, 63), min(y1, 47), min(y2, 47)
    yellow = torch.tensor([255, 217, 0], dtype=torch.int32)
    # the explained box is outlined: its corners are painted
    for y, x in ((y1, x1), (y1, x2), (y2, x1), (y2, x2)):
        assert torch.equal(over[y, x], yellow), (y, x, over[y, x])


@pytest.mark.parametrize("extra, message", [
    (["--detection", "500"], r"--detection 500: 'fasterrcnn_resnet50_fpn' found \d+ detections \(0\.\.\d+\) in "),
    (["--class", "7"], r"--class 7 is out of range: 'fasterrcnn_resnet50_fpn' has 3 classes \(0\.\.2\)"),
    (["--target", "1"], "--target is for classifiers"),
    (["--detection", "-1"], "--detection must be >= 0"),
])
def test_bad_detection_arguments(files, tmp_path, extra, message):
    code, _, stderr = run_cli(base(files, tmp_path / "out", *extra))
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert re.search(message, stderr), stderr
    assert not (tmp_path / "out").exists()


def test_detection_needs_an_lrp_preset_and_the_task(files, tmp_path):
    args = base(files, tmp_path / "out")
    args[args.index("epsilon_plus")] = "gradient"
    code, _, stderr = run_cli(args)
    assert code == 2 and "baseline 'gradient' has no class logit of a detection" in stderr
    code, _, stderr = run_cli(["explain", files / "street.png", "--model", "resnet18", "--composite", "gradient",
                               "--detection", "1", "--out", tmp_path / "out"])
    assert code == 2 and "--detection and --min-size go with --task detection" in stderr
