"""``lrpx explain`` and ``lrpx evaluate`` on a torchvision model with local weights (never downloaded),
bad input, ``--help`` and ``python -m lrpx``."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image

from lrpx.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only waits
IMAGENET = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]


def run_cli(args: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def decoded(path) -> torch.Tensor:
    with Image.open(path) as img:
        assert img.format == "PNG"
        raw = bytearray(img.convert("RGB").tobytes())
        return torch.frombuffer(raw, dtype=torch.uint8).view(img.height, img.width, 3).int()


def resnet18_state(seed: int = 0, classes: int = 1000, favourite: int | None = None) -> dict:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None, num_classes=classes)
    if favourite is not None:
        with torch.no_grad():
            model.fc.bias[favourite] = 100.0  # this class wins for every image
    return model.state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(200, 300, 3, generator=g) * 255).to(torch.uint8)
    Image.fromarray(noise.numpy()).save(root / "noise.png")
    ramp = torch.linspace(0, 255, 240).view(1, -1, 1).expand(180, 240, 3).to(torch.uint8).contiguous()
    Image.fromarray(ramp.numpy()).save(root / "ramp.jpg")
    (root / "notes.png").write_text("this is not an image")
    torch.save(resnet18_state(), root / "resnet18.pt")
    return root


def test_explain_writes_heatmap_and_overlay_per_image(files, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["explain", files / "noise.png", files / "ramp.jpg", "--model", "resnet18",
                                    "--weights", files / "resnet18.pt", "--composite", "epsilon_gamma_box",
                                    "--out", out])
    assert code == 0, stderr
    for stem in ("noise", "ramp"):
        heat, over = decoded(out / f"{stem}_heatmap.png"), decoded(out / f"{stem}_overlay.png")
        assert heat.shape == over.shape == (224, 224, 3)  # resize 256, centre crop 224
        assert (heat.amin(-1) < 200).double().mean() > 0.01, "the heatmap is not blank"
        assert over.double().std() > 5
    lines = stdout.splitlines()
    assert lines[0].startswith(str(files / "noise.png")) and "explained:" in lines[0]
    assert sum(name in lines[0] for name in IMAGENET) >= 5, "top-5 classes with their ImageNet names"
    assert str(out / "noise_heatmap.png") in stdout


def test_explain_target_and_repeated_file_names(files, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "noise.png").write_bytes((files / "noise.png").read_bytes())
    code, stdout, _ = run_cli(["explain", files / "noise.png", other / "noise.png", "--model", "resnet18",
                               "--weights", files / "resnet18.pt", "--composite", "gradient", "--target", 7,
                               "--out", tmp_path / "o"])
    assert code == 0
    assert stdout.count("explained: 7 cock") == 2
    assert (tmp_path / "o" / "noise_heatmap.png").is_file() and (tmp_path / "o" / "noise-1_heatmap.png").is_file()


def test_explain_fine_tuned_head_numbers_its_classes(files, tmp_path):
    torch.save({"state_dict": resnet18_state(classes=10, favourite=3)}, tmp_path / "ten.pt")
    code, stdout, stderr = run_cli(["explain", files / "ramp.jpg", "--model", "resnet18", "--weights",
                                    tmp_path / "ten.pt", "--composite", "epsilon_plus", "--out", tmp_path / "o"])
    assert code == 0, stderr
    assert "explained: 3 class 3" in stdout


def test_default_weights_come_from_torchvisions_download_path(files, tmp_path, monkeypatch):
    """A file where torchvision downloads DEFAULT to is used as is, so no network is needed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(resnet18_state(favourite=42), checkpoints / url.rsplit("/", 1)[-1])
    code, stdout, stderr = run_cli(["explain", files / "ramp.jpg", "--model", "resnet18", "--composite",
                                    "epsilon_plus_flat", "--out", tmp_path / "o"])
    assert code == 0, stderr
    assert f"explained: 42 {IMAGENET[42]}" in stdout


def test_default_weights_offline_is_a_clear_error(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    code, stdout, stderr = run_cli(["explain", files / "ramp.jpg", "--model", "resnet18", "--composite",
                                    "epsilon_plus", "--out", tmp_path / "o"])
    assert code == 2 and stderr.count("\n") == 1
    assert "could not get the DEFAULT weights of 'resnet18'" in stderr and "--weights PATH" in stderr
    assert not (tmp_path / "o").exists()


def test_evaluate_writes_curves_scores_and_plots(files, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli(["evaluate", files / "noise.png", files / "ramp.jpg", "--model", "resnet18",
                                    "--weights", files / "resnet18.pt", "--composite", "epsilon_plus_flat",
                                    "gradient", "--patch-size", 56, "--steps", 3, "--out", out])
    assert code == 0, stderr
    report = json.loads((out / "evaluation.json").read_text())
    assert report["settings"]["counts"] == [0, 1, 4, 9] and report["settings"]["regions"] == 16
    assert set(report["methods"]) == {"epsilon_plus_flat", "gradient"}
    for fills in report["methods"].values():
        values = fills["random"]
        assert {"auc_morf", "auc_lrf", "auc_random", "aopc_morf", "srg", "mrg", "lrg"} <= set(values["summary"])
        assert all(len(v) == 2 for v in values["per_image"].values())
        assert len(values["mean_curve"]["morf"]) == 4
        mean_srg = sum(values["per_image"]["auc_lrf"]) / 2 - sum(values["per_image"]["auc_morf"]) / 2
        assert values["summary"]["srg"]["mean"] == pytest.approx(mean_srg)
    for name in ("curves.png", "schedule.png"):
        picture = decoded(out / name)
        assert (picture.amax(-1) - picture.amin(-1) > 80).sum() > 100, name
    assert "| epsilon_plus_flat | random |" in stdout and str(out / "evaluation.json") in stdout


def _bad(files, tmp_path, name):
    weights = files / "resnet18.pt"
    image = files / "ramp.jpg"
    cases = {
        "missing image": (["explain", tmp_path / "nope.png", "--model", "resnet18", "--weights", weights,
                           "--composite", "epsilon_plus"], "image not found:"),
        "unreadable image": (["explain", files / "notes.png", "--model", "resnet18", "--weights", weights,
                              "--composite", "epsilon_plus"], "cannot read image"),
        "unknown model": (["explain", image, "--model", "resnet19", "--weights", weights, "--composite",
                           "epsilon_plus"], "unknown model 'resnet19'; valid: alexnet,"),
        "unknown composite": (["explain", image, "--model", "resnet18", "--weights", weights, "--composite",
                               "lrp_magic"], "unknown composite 'lrp_magic'; valid: epsilon_gamma_box,"),
        "unknown fill": (["evaluate", image, "--model", "resnet18", "--weights", weights, "--composite",
                          "epsilon_plus", "--fill", "black"], "unknown fill 'black'; valid: random, inpaint,"),
        "unknown order": (["evaluate", image, "--model", "resnet18", "--weights", weights, "--composite",
                           "epsilon_plus", "--order", "best"], "unknown order 'best'; valid: morf, lrf, random"),
        "weights of another model": (["explain", image, "--model", "resnet34", "--weights", weights,
                                      "--composite", "epsilon_plus"], "does not match model 'resnet34'"),
        "weights not a state dict": (["explain", image, "--model", "resnet18", "--weights", files / "notes.png",
                                      "--composite", "epsilon_plus"], "cannot read weights file"),
        "weights missing": (["explain", image, "--model", "resnet18", "--weights", tmp_path / "w.pt",
                             "--composite", "epsilon_plus"], "weights file not found"),
        "target out of range": (["explain", image, "--model", "resnet18", "--weights", weights, "--composite",
                                 "epsilon_plus", "--target", 1000], "--target 1000 is out of range"),
        "output is a file": (["explain", image, "--model", "resnet18", "--weights", weights, "--composite",
                              "epsilon_plus", "--out", files / "notes.png"], "exists and is not a folder"),
        "missing composite": (["explain", image, "--model", "resnet18"], "required: --composite"),
        "patch too large": (["evaluate", image, "--model", "resnet18", "--weights", weights, "--composite",
                             "gradient", "--patch-size", 300], "patch_size must be"),
        "bad percentile": (["explain", image, "--model", "resnet18", "--weights", weights, "--composite",
                            "gradient", "--percentile", 0], "--percentile must be in (0, 100]"),
        "bad device": (["explain", image, "--model", "resnet18", "--weights", weights, "--composite",
                        "gradient", "--device", "cuda:7"], "device 'cuda:7'"),
    }
    return cases[name]


@pytest.mark.parametrize("case", [
    "missing image", "unreadable image", "unknown model", "unknown composite", "unknown fill", "unknown order",
    "weights of another model", "weights not a state dict", "weights missing", "target out of range",
    "output is a file", "missing composite", "patch too large", "bad percentile", "bad device"])
def test_bad_input_is_one_line_exit_code_2_and_writes_nothing(files, tmp_path, case):
    args, message = _bad(files, tmp_path, case)
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "out"]
    code, stdout, stderr = run_cli(args)
    assert code == 2, stderr
    assert stderr.startswith("lrpx: error: ") and stderr.count("\n") == 1 and message in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not (tmp_path / "out").exists()


def test_model_lrp_cannot_convert_is_a_clear_error(files, tmp_path, monkeypatch):
    import lrpx.methods
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    def refuse(*args, **kwargs):  # a model with a layer lrpx has no rule for
        raise lrpx.UnsupportedModuleError([("features.1.0.attn", ShiftedWindowAttention)])

    monkeypatch.setattr(lrpx.methods, "attributor", refuse)
    torch.save(torchvision.models.swin_t(weights=None).state_dict(), tmp_path / "swin.pt")
    code, _, stderr = run_cli(["explain", files / "ramp.jpg", "--model", "swin_t", "--weights",
                               tmp_path / "swin.pt", "--composite", "epsilon_plus", "--out", tmp_path / "out"])
    assert code == 2 and stderr.count("\n") == 1
    assert "cannot be converted for LRP" in stderr and "ShiftedWindowAttention" in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [[], ["demo"], ["explain"], ["evaluate"]])
def test_help_for_every_command(command):
    code, stdout, _ = run_cli([*command, "--help"])
    assert code == 0 and stdout.startswith(f"usage: lrpx {' '.join(command)}".rstrip())
    for option in {"demo": ["--images", "--steps", "--out"], "explain": ["--model", "--weights", "--composite"],
                   "evaluate": ["--fill", "--order", "--patch-size"]}.get(command[0] if command else "", []):
        assert option in stdout


def test_no_command_is_a_usage_error():
    code, _, stderr = run_cli([])
    assert code == 2 and "choose a command" in stderr


def test_python_dash_m_lrpx_in_a_fresh_process(files, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "lrpx", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "lrpx 0.1.0"
    bad = subprocess.run([sys.executable, "-m", "lrpx", "explain", str(tmp_path / "missing.png"), "--model",
                          "resnet18", "--weights", str(files / "resnet18.pt"), "--composite", "epsilon_plus"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == f"lrpx: error: image not found: {tmp_path / 'missing.png'}\n"
