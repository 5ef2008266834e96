"""``lrpx demo`` end to end at tiny settings, and the acceptance check on the built-in data.

Models are trained into a temporary ``LRPX_CACHE`` once per module: tiny ones (one epoch on
200 images) for the command-line runs, a modest one for the acceptance check.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch
from PIL import Image

from lrpx import datasets as ds
from lrpx.cli import main
from lrpx.demo import DEMO_METHODS, DemoOptions, run_demo
from lrpx.methods import attributor
from lrpx.eval import pixel_flipping, relevance_mass_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits
TINY = ["--epochs", "1", "--train-size", "200"]
METRICS = {"auc_morf", "auc_lrf", "aopc_morf", "srg", "mrg"}
RANDOM_METRICS = {"auc_random", "aopc_random"}


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``lrpx ARGS`` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def pixels(path) -> torch.Tensor:
    with Image.open(path) as img:
        raw = bytearray(img.convert("RGB").tobytes())
        return torch.frombuffer(raw, dtype=torch.uint8).view(img.height, img.width, 3).int()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("lrpx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LRPX_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def demo(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code, stdout, stderr = run_cli(["demo", "--out", str(out), "--images", "3", "--steps", "3", "--show", "2",
                                    *TINY, "--no-progress"])
    assert code == 0, stderr
    return out, stdout, json.loads((out / "summary.json").read_text())


def test_demo_writes_every_file_and_says_where(demo):
    out, stdout, _ = demo
    for name in ("heatmaps.png", "curves.png", "schedule.png", "summary.md", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert str(out / name) in stdout
    assert "| method" in stdout and "RMA" in stdout and "AUC MoRF" in stdout


def test_heatmap_grid_has_one_row_per_image_and_model_and_shows_both_signs(demo):
    out, _, summary = demo
    grid = pixels(out / "heatmaps.png")
    rows, columns = 2 * 2, 1 + len(DEMO_METHODS)  # 2 models x --show 2; input + methods
    assert grid.shape[0] == 20 + rows * (128 + 4) + 4  # title line + 2x-scaled 64-pixel tiles
    assert columns * 132 + 4 < grid.shape[1] < columns * 132 + 4 + 200  # + the row titles
    r, g, b = grid.unbind(-1)
    red = (r > 150) & (g < 90) & (b < 90)
    blue = (b > 150) & (r < 90) & (g < 90)
    assert red.sum() > 50 and blue.sum() > 50
    left = grid.shape[1] - (columns * 132 + 4)
    for i in range(rows):
        for j in range(columns):
            tile = grid[24 + 132 * i: 24 + 132 * i + 128, left + 4 + 132 * j: left + 4 + 132 * j + 128]
            if j == 0:
                assert tile.double().std() > 10, "the input image"
            else:
                assert (tile.amin(-1) < 230).double().mean() > 0.01, f"heatmap {i}, {j} is not blank"


def test_curve_and_schedule_figures_decode_with_their_sizes(demo):
    out, _, _ = demo
    curves, schedule = pixels(out / "curves.png"), pixels(out / "schedule.png")
    assert curves.shape[:2] == (int(4.2 * 2 * 72), int(6.4 * 2 * 72))  # 2 models x 2 fills at 72 dpi
    assert schedule.shape[:2] == (4 * 72, 6 * 72)
    for picture in (curves, schedule):
        assert (picture.amax(-1) - picture.amin(-1) > 80).sum() > 200, "coloured lines or bars are drawn"


def test_summary_json_has_every_method_metric_and_consistent_gains(demo):
    _, _, summary = demo
    assert summary["settings"]["counts"] == [0, 1, 4, 9] and summary["settings"]["regions"] == 256
    assert set(summary["models"]) == {"vgg", "resnet"}
    for model in summary["models"].values():
        assert 0 <= model["accuracy"] <= 1 and model["cached"] is False
        assert list(model["methods"]) == [*DEMO_METHODS, "random"]
        for method, values in model["methods"].items():
            for key in ("rma", "rra"):
                stat = values["ground_truth"][key]
                assert 0 <= stat["mean"] <= 1 and stat["std"] >= 0
            assert set(values["pixel_flipping"]) == {"inpaint", "random"}
            for fill, scores in values["pixel_flipping"].items():
                assert set(scores) == (RANDOM_METRICS if method == "random" else METRICS)
                assert all(math.isfinite(s["mean"]) and math.isfinite(s["std"]) for s in scores.values())
                if method != "random":
                    random_auc = model["methods"]["random"]["pixel_flipping"][fill]["auc_random"]["mean"]
                    morf, lrf = scores["auc_morf"]["mean"], scores["auc_lrf"]["mean"]
                    assert scores["srg"]["mean"] == pytest.approx(lrf - morf, abs=1e-5)
                    assert scores["mrg"]["mean"] == pytest.approx(random_auc - morf, abs=1e-5)


def test_summary_markdown_holds_the_tables(demo):
    out, _, _ = demo
    text = (out / "summary.md").read_text()
    for needle in ("## vgg", "## resnet", "Pixel flipping, inpaint fill", "Pixel flipping, random fill",
                   "random order", *DEMO_METHODS):
        assert needle in text


def test_second_run_loads_the_cache_and_repeats_the_numbers(demo, tmp_path):
    _, _, first = demo
    code, _, stderr = run_cli(["demo", "--out", str(tmp_path), "--images", "3", "--steps", "3", "--show", "2",
                               "--models", "vgg", "--fills", "random", *TINY, "--no-progress"])
    assert code == 0, stderr
    second = json.loads((tmp_path / "summary.json").read_text())
    assert second["models"]["vgg"]["cached"] is True
    for method in [*DEMO_METHODS, "random"]:
        assert (second["models"]["vgg"]["methods"][method]["pixel_flipping"]["random"]
                == first["models"]["vgg"]["methods"][method]["pixel_flipping"]["random"])
        assert (second["models"]["vgg"]["methods"][method]["ground_truth"]
                == first["models"]["vgg"]["methods"][method]["ground_truth"])


def test_demo_draws_its_charts_without_matplotlib(demo, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    options = DemoOptions(out=tmp_path, images=2, models=("vgg",), methods=("gradient",), fills=("random",),
                          steps=2, show=1, train=ds.TrainConfig(epochs=1, train_size=200), progress=False)
    run_demo(options, log=lambda text: None)
    assert pixels(tmp_path / "curves.png").shape == (420, 640, 3)  # one Pillow chart
    assert pixels(tmp_path / "schedule.png").shape == (420, 640, 3)


@pytest.mark.parametrize("args, message", [
    (["--models", "vgg", "alexnet"], "unknown model 'alexnet'; valid: vgg, resnet"),
    (["--methods", "lime"], "unknown method 'lime'; valid: epsilon_gamma_box,"),
    (["--fills", "zeros"], "unknown fill 'zeros'; valid: random, inpaint, road"),
    (["--schedule", "cubic"], "unknown schedule 'cubic'; valid: linear, quadratic, log"),
    (["--steps", "40"], "steps must be between 1 and ceil(sqrt(regions)) = 16"),
    (["--patch-size", "0"], "expected a positive integer, got 0"),
    (["--device", "tpu9"], "device 'tpu9'"),
])
def test_demo_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["demo", "--out", str(out), *args])
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("lrpx: error: ") and message in stderr
    assert not out.exists(), "nothing is written for bad input"


def test_demo_output_folder_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    code, _, stderr = run_cli(["demo", "--out", str(target), "--models", "vgg"])
    assert code == 2 and "exists and is not a folder" in stderr and target.read_text() == "keep me"


def test_lrp_beats_random_order_and_gradient_on_built_in_data(cache):
    """Acceptance: on the shapes task, LRP removes evidence faster than a random order (MoRF AUC,
    inpainting fill, which keeps the images natural) and puts more of its positive relevance on the
    object than the plain gradient (relevance mass accuracy). Fixed seeds throughout."""
    model, info = ds.load_model("vgg", ds.TrainConfig(epochs=4, train_size=3000), progress=False)
    assert info["accuracy"] > 0.6
    data = ds.shapes_split("test", 16)
    x, target = ds.normalize(data.images), data.labels
    low, high = ds.zbox_bounds()
    relevance = {m: attributor(model, m, low=low, high=high)(x, target)
                 for m in ("epsilon_gamma_box", "epsilon_plus_flat", "gradient")}
    rma = {m: relevance_mass_accuracy(r, data.masks).mean().item() for m, r in relevance.items()}
    flip = {m: pixel_flipping(model, x, r, target, patch_size=8, schedule="quadratic", order=("morf", "random"),
                              fill="inpaint", normalizer=(ds.MEAN, ds.STD), pixel_range=(0.0, 1.0),
                              generator=torch.Generator().manual_seed(0), batch_size=128)
            for m, r in relevance.items()}
    random_auc = flip["gradient"].auc("random").mean().item()
    for method in ("epsilon_gamma_box", "epsilon_plus_flat"):
        assert flip[method].auc("morf").mean().item() < random_auc - 0.2, method
        assert rma[method] > rma["gradient"] + 0.1, (method, rma)
