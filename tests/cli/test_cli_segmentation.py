"""``lrpx explain --task segmentation`` with a local state dict (never downloaded)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from PIL import Image

from test_cli_explain import decoded, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=4)
    with torch.no_grad():
        model.classifier.low_classifier.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))  # class 2 everywhere
    torch.save(model.state_dict(), root / "lraspp.pt")
    noise = (torch.rand(48, 64, 3, generator=torch.Generator().manual_seed(1)) * 255).byte()
    Image.fromarray(noise.numpy()).save(root / "street.png")
    return root


def test_explain_a_segmentation_class(files, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["explain", files / "street.png", "--task", "segmentation", "--model",
                                    "lraspp_mobilenet_v3_large", "--weights", files / "lraspp.pt", "--composite",
                                    "epsilon_plus", "--out", out])
    assert code == 0, stderr
    assert "explained class 2" in stdout and "predicted on 100.0% of the pixels" in stdout
    heat = decoded(out / "street_heatmap.png")
    assert heat.shape == (520, 693, 3)  # the weights' transform: the short side to 520
    assert (heat.amin(-1) < 200).double().mean() > 0.01


@pytest.mark.parametrize("extra, message", [
    (["--class", "7"], r"--class 7 is out of range: 'lraspp_mobilenet_v3_large' has 4 classes \(0..3\)"),
    (["--target", "1"], "--target is for classifiers"),
])
def test_bad_segmentation_arguments(files, tmp_path, extra, message):
    code, _, stderr = run_cli(["explain", files / "street.png", "--task", "segmentation", "--model",
                               "lraspp_mobilenet_v3_large", "--weights", files / "lraspp.pt", "--composite",
                               "gradient", "--out", tmp_path / "out", *extra])
    assert code == 2 and stderr.count("\n") == 1
    assert __import__("re").search(message, stderr), stderr
    assert not (tmp_path / "out").exists()


def test_class_needs_the_segmentation_task(files, tmp_path):
    code, _, stderr = run_cli(["explain", files / "street.png", "--model", "resnet18", "--composite", "gradient",
                               "--class", "1", "--out", tmp_path / "out"])
    assert code == 2 and "--class goes with --task segmentation" in stderr
