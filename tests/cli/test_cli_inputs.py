"""Image and weights files a new user hands the command line: 16-bit and rotated photos,
decompression bombs, non-finite or legacy weights, and images whose names collide."""
from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lrpx.cli.common import UsageError
from lrpx.cli.images import output_names, read_rgb

from test_cli_explain import decoded, resnet18_state, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(resnet18_state(), path)
    return path


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = np.full((6, 5), 32896, dtype=np.uint16)  # 0.502 of full scale
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode.startswith("I")  # Pillow reads it as 16/32-bit integers
    rgb = np.asarray(read_rgb(tmp_path / "grey16.png"))
    assert rgb.shape == (6, 5, 3)
    assert (rgb[1:, 1:] == 128).all() and (rgb[0, 0] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high: left half red, right half blue
    pixels[:, :10, 0] = 255
    pixels[:, 10:, 2] = 255
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # Orientation: the camera was turned, show it rotated 90 degrees clockwise
    img.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    rgb = np.asarray(read_rgb(tmp_path / "turned.jpg")).astype(int)
    assert rgb.shape == (20, 10, 3)  # upright: 10 wide, 20 high
    assert rgb[2, 5, 0] > 200 and rgb[2, 5, 2] < 60  # the left (red) half is on top now
    assert rgb[17, 5, 2] > 200 and rgb[17, 5, 0] < 60


def test_decompression_bomb_is_a_usage_error(tmp_path, weights, monkeypatch):
    Image.new("RGB", (40, 40), "white").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels > 2 x 100: Pillow refuses
    with pytest.raises(UsageError, match="too large to read safely"):
        read_rgb(tmp_path / "big.png")
    code, _, stderr = run_cli(["explain", tmp_path / "big.png", "--model", "resnet18", "--weights", weights,
                               "--composite", "epsilon_plus", "--out", tmp_path / "o"])
    assert code == 2 and stderr.count("\n") == 1 and "too large to read safely" in stderr
    assert not (tmp_path / "o").exists()


def test_weights_with_nan_are_refused(tmp_path):
    state = resnet18_state()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "x.png")
    for method in ("gradient", "epsilon_plus"):
        code, _, stderr = run_cli(["explain", tmp_path / "x.png", "--model", "resnet18", "--weights",
                                   tmp_path / "nan.pt", "--composite", method, "--out", tmp_path / "o"])
        assert code == 2 and stderr.count("\n") == 1
        assert "holds NaN or inf in 1 tensor(s) (e.g. 'layer2.0.conv1.weight')" in stderr


@pytest.mark.parametrize("save", ["pickle", "legacy torch.save of a whole model"])
def test_legacy_pickle_weights_give_one_line_and_no_warning(tmp_path, save):
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "weights.pt"
    if save == "pickle":  # protocol 4: torch warns before it refuses the file
        path.write_bytes(pickle.dumps(model.state_dict(), protocol=4))
    else:
        torch.save(model, path, _use_new_zipfile_serialization=False)
    Image.new("RGB", (32, 32), "grey").save(tmp_path / "x.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, stderr = run_cli(["explain", tmp_path / "x.png", "--model", "resnet18", "--weights", path,
                                        "--composite", "gradient", "--out", tmp_path / "o"])
    assert code == 2 and stdout == "" and [str(w.message) for w in caught] == []
    assert stderr.count("\n") == 1 and stderr.startswith("lrpx: error: cannot read weights file")


def test_output_names_never_collide():
    paths = [p for p in map(__import__("pathlib").Path, ["a/img.png", "b/img.png", "img-1.png", "c/img-1.jpg"])]
    assert output_names(paths) == ["img", "img-2", "img-1", "img-1-1"]


def test_explain_writes_a_file_pair_per_image_when_names_collide(tmp_path, weights):
    for folder, shade in (("a", "red"), ("b", "blue")):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (40, 40), shade).save(tmp_path / folder / "img.png")
    Image.new("RGB", (40, 40), "green").save(tmp_path / "img-1.png")
    out = tmp_path / "o"
    code, stdout, stderr = run_cli(["explain", tmp_path / "a" / "img.png", tmp_path / "b" / "img.png",
                                    tmp_path / "img-1.png", "--model", "resnet18", "--weights", weights,
                                    "--composite", "gradient", "--out", out])
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{n}_{kind}.png" for n in ("img", "img-1", "img-2") for kind in ("heatmap", "overlay"))
    lines = stdout.splitlines()
    for i, (image, name) in enumerate([("a/img.png", "img"), ("b/img.png", "img-2"), ("img-1.png", "img-1")]):
        assert lines[2 * i].startswith(str(tmp_path / image))
        assert f"heatmap: {out / f'{name}_heatmap.png'}" in lines[2 * i + 1]
    overlays = [decoded(out / f"{n}_overlay.png") for n in ("img", "img-1", "img-2")]
    assert not any(torch.equal(overlays[i], overlays[j]) for i, j in ((0, 1), (0, 2), (1, 2)))
