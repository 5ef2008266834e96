"""``lrpx concepts --data`` and ``lrpx concepts explain``: the atlas tables against each image
explained on its own, 1 and 2 processes (torchrun, gloo), a killed run resumed, refusals, and
the figure of one image's concepts."""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_dataset import subprocess_cli
from test_cli_explain import run_cli

import lrpx
from lrpx import datasets as ds

pytest.importorskip("pyarrow")
pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES, TOP, LAYER, CHANNELS = 12, 3, "0.10", 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A class-folder tree of shapes images and the weights of a shapes VGG."""
    root = tmp_path_factory.mktemp("shapes")
    shapes = ds.make_shapes(IMAGES, seed=5)
    for i in range(IMAGES):
        folder = root / "data" / ds.CLASSES[int(shapes.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((shapes.images[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(folder / f"{i:03d}.png")
    (root / "data" / "ring" / "zz-broken.png").write_text("not an image")
    torch.manual_seed(0)
    torch.save(ds.ShapesVGG().state_dict(), root / "vgg.pt")
    return root


def command(data: Path, out: Path, *more) -> list:
    return ["concepts", "--data", data / "data", "--model", "shapes_vgg", "--weights", data / "vgg.pt",
            "--layer", LAYER, "--top", TOP, "--images-per-batch", 5, "--out", out, "--no-progress", *more]


def maxima(out: Path) -> dict:
    import pyarrow.parquet as pq

    found = {}
    for r in pq.read_table(out / "maxima.parquet").to_pylist():
        key = (r["channel"], r["kind"], r["rank"])
        assert key not in found, f"duplicate row {key}"
        found[key] = r
    return found


def classes(out: Path) -> dict:
    import pyarrow.parquet as pq

    return {(r["class"], r["channel"]): r for r in pq.read_table(out / "class_concepts.parquet").to_pylist()}


def same_tables(a: Path, b: Path) -> None:
    one, two = maxima(a), maxima(b)
    assert one.keys() == two.keys()
    for key, row in one.items():
        other = two[key]
        assert (row["image"], row["prediction"]) == (other["image"], other["prediction"]), key
        assert (row["top"], row["left"], row["bottom"], row["right"]) == \
            (other["top"], other["left"], other["bottom"], other["right"]), key
        assert other["value"] == pytest.approx(row["value"], rel=1e-4, abs=1e-9), key
    first, second = classes(a), classes(b)
    assert first.keys() == second.keys()
    for key in first:
        assert second[key]["mean_relevance"] == pytest.approx(first[key]["mean_relevance"], rel=1e-4, abs=1e-9)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    code, stdout, stderr = run_cli(command(data, out))
    assert code == 0, stderr
    return out, stdout


def own_pass(data: Path):
    """Each image alone: its pixels read here, its prediction, the relevance of each channel
    (explain(record=...)), the largest activation (the plain model cut at the layer)."""
    model = ds.ShapesVGG()
    model.load_state_dict(torch.load(data / "vgg.pt"))
    model.eval()
    lrp = lrpx.convert(model, lrpx.composites.epsilon_plus())
    found = {}
    for path in sorted((data / "data").rglob("*.png")):
        if path.name == "zz-broken.png":
            continue
        pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
        x = ds.normalize(pixels[None])
        e = lrpx.explain(lrp, x, record=[LAYER])
        relevance = lrpx.concepts.channel_relevance(e.recorded[LAYER])[0]
        with torch.no_grad():
            activation = model[0][:11](x)[0].flatten(1).amax(1)
        found[path.relative_to(data / "data").as_posix()] = (x, int(e.target), relevance, activation)
    return lrp, found


@pytest.mark.filterwarnings("ignore:.*receive no relevance")
def test_the_maxima_are_those_of_each_image_explained_alone(reference, data):
    out, stdout = reference
    table = maxima(out)
    assert len(table) == CHANNELS * 2 * TOP and f"{IMAGES} images scanned, 1 failed" in stdout
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "index,image,reason" and len(failures) == 2 and "ring/zz-broken.png" in failures[1]
    lrp, own = own_pass(data)
    names = sorted(own)
    for kind, column in (("relevance", 2), ("activation", 3)):
        for channel in range(CHANNELS):
            values = np.array([float(own[n][column][channel]) for n in names])
            expected = [names[i] for i in sorted(range(len(names)), key=lambda i: (-values[i], i))[:TOP]]
            rows = [table[(channel, kind, rank)] for rank in range(1, TOP + 1)]
            assert [r["image"] for r in rows] == expected, (kind, channel)
            for r in rows:
                assert r["value"] == pytest.approx(float(own[r["image"]][column][channel]), rel=1e-4, abs=1e-9)
                assert r["prediction"] == own[r["image"]][1]
                assert ds.CLASSES[r["label"]] == r["image"].split("/")[0] and r["class_name"] == ds.CLASSES[r["prediction"]]
    # the crop of the best reference of some channels: the conditional heatmap of a full backward pass from the
    # prediction, the central 80% of its |mass| along each axis (at least one 4-pixel feature cell wide)
    checked = 0
    for channel in range(0, CHANNELS, 5):
        row = table[(channel, "relevance", 1)]
        x, target = own[row["image"]][:2]
        heat = lrpx.concepts.attribute(lrp, x, target, conditions=[{LAYER: [channel]}]).relevance[0, 0].sum(0)
        if float(heat.abs().sum()) == 0:
            continue
        box = []
        for marginal in (heat.abs().double().sum(1), heat.abs().double().sum(0)):
            share = (marginal.cumsum(0) / marginal.sum()).numpy()
            low, high = int(np.argmax(share > 0.1 + 1e-12)), int(np.argmax(share >= 0.9 - 1e-12))
            box.append((low, high + 1))
        (top, bottom), (left, right) = box
        assert (row["top"], row["left"], row["bottom"], row["right"]) == (top, left, bottom, right), channel
        assert row["heatmap_sum"] == pytest.approx(float(heat.double().sum()), rel=1e-4, abs=1e-9)
        checked += 1
    assert checked >= 3
    mean = classes(out)
    for (cls, channel), r in list(mean.items())[::7]:
        mine = [own[n][2][channel] for n in names if own[n][1] == cls]
        assert r["images"] == len(mine) and r["mean_relevance"] == pytest.approx(float(np.mean(mine)), rel=1e-4, abs=1e-9)
    assert len(list((out / "atlas").glob("channel-*.png"))) == CHANNELS


def test_two_processes_give_the_tables_of_one(reference, data, tmp_path):
    out = tmp_path / "two"
    run = subprocess_cli(command(data, out), torchrun=2)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-2000:]
    assert {p.name.split("-")[1] for p in (out / "results").glob("part-*.parquet")} == {"0000", "0001"}
    assert {p.name.split("-")[1] for p in (out / "references" / "results").glob("part-*.parquet")} == {"0000", "0001"}
    same_tables(reference[0], out)


def test_a_killed_run_resumes_to_the_same_tables(reference, data, tmp_path):
    out = tmp_path / "killed"
    run = subprocess_cli(command(data, out, "--images-per-batch", 1))
    deadline = time.monotonic() + 300
    while not list((out / "results").glob("part-*.parquet")):
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (out / "maxima.parquet").exists()
    code, _, stderr = run_cli(command(data, out, "--images-per-batch", 1))
    assert code == 0, stderr
    same_tables(reference[0], out)
    # a run stopped while localising: the parts written are kept, the others made again
    parts = sorted((out / "references" / "results").glob("part-*.parquet"))
    kept = {p.name: p.stat().st_mtime_ns for p in parts[: len(parts) // 2]}
    for part in parts[len(parts) // 2:]:
        part.unlink()
    (out / "maxima.parquet").unlink()
    shutil.rmtree(out / "atlas")
    code, _, stderr = run_cli(command(data, out, "--images-per-batch", 1))
    assert code == 0, stderr
    assert all((out / "references" / "results" / name).stat().st_mtime_ns == t for name, t in kept.items())
    same_tables(reference[0], out)
    import pyarrow.parquet as pq

    indices = [i for p in (out / "results").glob("part-*.parquet") for i in pq.read_table(p)["index"].to_pylist()]
    broken = int((out / "failures.csv").read_text().splitlines()[1].split(",")[0])
    assert sorted(indices) == [i for i in range(IMAGES + 1) if i != broken]  # every image scanned once


def test_other_settings_are_refused(reference, data):
    code, _, stderr = run_cli(command(data, reference[0])[:-1] + ["--top", "2", "--no-progress"])
    assert code == 2 and stderr.count("\n") == 1 and "differing: top" in stderr, stderr


@pytest.mark.parametrize("layer, message", [
    ("0.100", r"no module named '0\.100'; close names: \[.*'0\.10'"),
    ("1.3", r"'1\.3' gives outputs of shape \(1, 5\); a concept atlas needs channel maps \(B, C, \.\.\.\)"),
])
def test_a_bad_layer_is_one_line_and_writes_nothing(data, tmp_path, layer, message):
    args = [str(a) for a in command(data, tmp_path / "out")]
    args[args.index("--layer") + 1] = layer
    code, _, stderr = run_cli(args)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert __import__("re").search(message, stderr), stderr
    assert not (tmp_path / "out").exists()
    image = next((data / "data").rglob("0*.png"))
    code, _, stderr = run_cli(["concepts", "explain", image, "--model", "shapes_vgg", "--weights", data / "vgg.pt",
                               "--layer", layer, "--out", tmp_path / "one"])
    assert code == 2 and __import__("re").search(message, stderr), stderr


def test_explain_writes_the_figure_of_the_top_concepts(reference, data, tmp_path):
    pytest.importorskip("matplotlib")
    _, own = own_pass(data)
    name = sorted(own)[4]
    image = data / "data" / name
    widths = []
    for atlas in ([], ["--atlas", reference[0]]):
        out = tmp_path / f"out{len(atlas)}"
        code, stdout, stderr = run_cli(["concepts", "explain", image, "--model", "shapes_vgg", "--weights",
                                        data / "vgg.pt", "--layer", LAYER, "--top", 4, "--out", out, *atlas])
        assert code == 0, stderr
        with Image.open(out / f"{image.stem}-concepts.png") as figure:
            assert figure.format == "PNG" and figure.height > figure.width / 2
            widths.append(figure.width)
        found = json.loads((out / f"{image.stem}-concepts.json").read_text())
        relevance = own[name][2]
        order = sorted(range(CHANNELS), key=lambda c: -float(relevance[c]))[:4]
        assert [c["channel"] for c in found["concepts"]] == order and found["prediction"] == own[name][1]
        for c in found["concepts"]:
            assert c["share"] == pytest.approx(float(relevance[c["channel"]] / relevance.sum()), rel=1e-4)
        assert "top concepts at 0.10: channel" in stdout
    assert widths[1] > widths[0]  # with --atlas: the reference crops, TOP of them, beside each concept
    code, _, stderr = run_cli(["concepts", "explain", image, "--model", "shapes_vgg", "--weights", data / "vgg.pt",
                               "--layer", "0.6", "--out", tmp_path / "x", "--atlas", reference[0]])
    assert code == 2 and "was made with layer '0.10', not '0.6'" in stderr, stderr
