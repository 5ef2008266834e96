"""``lrpx evaluate --data`` and ``lrpx report``: a generated image folder, 1 and 2 processes
(torchrun, gloo), a run killed and resumed, refusals, failures, and the report of partial
results."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from lrpx import datasets as ds
from lrpx.cli import main

from test_cli_explain import run_cli

pytest.importorskip("pyarrow")
pytestmark = pytest.mark.usefixtures("one_thread")
IMAGES = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A class-folder tree of shapes images with their masks, one broken file, and weights."""
    root = tmp_path_factory.mktemp("shapes")
    shapes = ds.make_shapes(IMAGES, seed=3)
    for i in range(IMAGES):
        name = ds.CLASSES[int(shapes.labels[i])]
        for folder, array in (("data", shapes.images[i].permute(1, 2, 0) * 255), ("masks", shapes.masks[i, 0] * 255)):
            (root / folder / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array.round().byte().numpy()).save(root / folder / name / f"{i:03d}.png")
    (root / "data" / "circle" / "zz-broken.png").write_text("not an image")
    torch.manual_seed(0)
    torch.save(ds.ShapesVGG().state_dict(), root / "vgg.pt")
    return root


def command(data: Path, out: Path, *more) -> list[str]:
    return ["evaluate", "--data", data / "data", "--model", "shapes_vgg", "--weights", data / "vgg.pt",
            "--composite", "epsilon_plus", "gradient", "--metrics", "pixel_flipping", "faithfulness_correlation",
            "localisation", "--masks", data / "masks", "--patch-size", 16, "--images-per-batch", 3,
            "--out", out, "--no-progress", *more]


def rows(out: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "results").glob("part-*.parquet"))])
    found = {}
    for r in table.to_pylist():
        key = (r["image"], r["method"], r["metric"], r["fill"], r["order"], r["layer"])
        assert key not in found, f"duplicate row {key}"
        found[key] = (r["value"], r["curve"], r["target"], r["label"])
    return found


def subprocess_cli(args, *, torchrun: int = 0, **kwargs) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun)] if torchrun else \
        [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "-m", "lrpx", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    code, stdout, stderr = run_cli(command(data, out))
    assert code == 0, stderr
    return out, stdout


def test_one_process_writes_rows_failures_summary(reference, data):
    out, stdout = reference
    found = rows(out)
    images = {key[0] for key in found}
    assert len(images) == IMAGES and all(name.count("/") == 1 for name in images)  # class/file.png
    metrics = {key[2] for key in found}
    assert {"auc", "aopc", "srg", "mrg", "lrg", "faithfulness_correlation", "relevance_mass_accuracy",
            "relevance_rank_accuracy"} <= metrics
    curve = found[(sorted(images)[0], "gradient", "auc", "random", "morf", "")][1]
    assert len(curve) == 1 + 4  # 16 regions of 16x16 pixels, quadratic schedule: 4 steps
    labels = {key[0]: value[3] for key, value in found.items()}
    assert all(ds.CLASSES[labels[name]] == name.split("/")[0] for name in images)  # labels from the folders
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "index,image,reason" and len(failures) == 2 and "circle/zz-broken.png" in failures[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == IMAGES and summary["failures"] == 1
    score = next(s for s in summary["scores"] if s["metric"] == "auc" and s["order"] == "morf"
                 and s["method"] == "gradient")
    assert score["better"] == "lower" and score["n"] == IMAGES and score["ci_low"] <= score["mean"] <= score["ci_high"]
    assert {c["method_a"] for c in summary["comparisons"]} == {"epsilon_plus"}
    assert (out / "curves.png").is_file() and (out / "bars.png").is_file()
    assert "images evaluated, 1 failed" in stdout


def test_two_processes_give_the_rows_of_one(reference, data, tmp_path):
    out = tmp_path / "two"
    run = subprocess_cli(command(data, out), torchrun=2)
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-2000:]
    assert {p.name.split("-")[1] for p in (out / "results").glob("part-*.parquet")} == {"0000", "0001"}
    one, two = rows(reference[0]), rows(out)
    assert one.keys() == two.keys()
    # float32 forwards of other batch compositions: equal to rounding (a wrong image or seed differs by far more)
    for key in one:
        assert two[key][0] == pytest.approx(one[key][0], rel=1e-5, abs=1e-6), key
    assert json.loads((out / "summary.json").read_text())["images"] == IMAGES


def test_a_killed_run_resumes_to_the_same_rows(reference, data, tmp_path):
    out = tmp_path / "killed"
    run = subprocess_cli(command(data, out, "--images-per-batch", 1))
    deadline = time.monotonic() + 300
    while len(list((out / "results").glob("part-*.parquet"))) < 4:
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    partial = rows(out)
    assert 0 < len({k[0] for k in partial}) < IMAGES
    code, stdout, stderr = run_cli(["report", out])  # a report of what is there
    assert code == 0, stderr
    assert json.loads((out / "summary.json").read_text())["images"] == len({k[0] for k in partial})
    code, _, stderr = run_cli(command(data, out, "--images-per-batch", 1))  # the same command again
    assert code == 0, stderr
    resumed, one = rows(out), rows(reference[0])  # rows() fails on a duplicate
    assert resumed.keys() == one.keys()
    for key in one:
        assert resumed[key][0] == pytest.approx(one[key][0], rel=1e-5, abs=1e-6), key
    assert len((out / "failures.csv").read_text().splitlines()) == 2


def test_other_settings_are_refused_and_overwrite_starts_over(reference, data, tmp_path):
    out = tmp_path / "run"
    code, _, _ = run_cli(command(data, out, "--limit", 4))
    assert code == 0
    before = sorted(p.name for p in (out / "results").iterdir())
    code, _, stderr = run_cli(command(data, out, "--limit", 4, "--seed", 1))
    assert code == 2 and stderr.count("\n") == 1
    assert "holds a run with other settings (differing: seed)" in stderr and "--overwrite" in stderr
    assert sorted(p.name for p in (out / "results").iterdir()) == before  # nothing written
    code, _, stderr = run_cli(command(data, out, "--limit", 4, "--seed", 1, "--overwrite"))
    assert code == 0, stderr
    assert json.loads((out / "run.json").read_text())["settings"]["seed"] == 1


@pytest.mark.parametrize("change, message", [
    ({"--data": "missing"}, "data source .*missing does not exist"),
    ({"--data": "empty"}, "holds no images"),
    ({"--data": "bad.csv"}, r"bad.csv, line 3: the label 'cat' is not an integer"),
    ({"--metrics": "accuracy"}, "unknown metric 'accuracy'; valid: pixel_flipping"),
    ({"--target": "2"}, "--target does not go with --data"),
    ({"--data": "labels.csv"}, r"label 7 of .* is outside the model's 5 classes"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, change, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.csv").write_text(f"path,label\n{data}/data/ring/000.png,1\n{data}/data/ring/000.png,cat\n")
    first = next((data / "data").rglob("*.png"))
    (tmp_path / "labels.csv").write_text(f"{first},7\n")
    args = [str(a) for a in command(data, tmp_path / "out")]
    for flag, value in change.items():
        value = str(tmp_path / value) if flag == "--data" else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, _, stderr = run_cli(args)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert __import__("re").search(message, stderr), stderr
    assert not (tmp_path / "out").exists()


def test_a_flat_folder_and_a_csv_list(data, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((data / "data").rglob("00[0-3].png")):
        (flat / path.name).write_bytes(path.read_bytes())
    (tmp_path / "list.csv").write_text("# three images\n" + "".join(f"flat/{p.name}\n" for p in sorted(flat.iterdir())[:3]))
    for source, count in ((flat, 4), (tmp_path / "list.csv", 3)):
        out = tmp_path / f"out-{source.name}"
        code, _, stderr = run_cli(["evaluate", "--data", source, "--model", "shapes_vgg", "--weights", data / "vgg.pt",
                                   "--composite", "gradient", "--metrics", "sparseness", "--out", out, "--no-progress"])
        assert code == 0, stderr
        found = rows(out)
        assert len(found) == count and all(v[3] == -1 for v in found.values())  # no labels: the top class
