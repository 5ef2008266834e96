"""The data-set engine from Python: a dataset of tensors, custom methods, statistics."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from lrpx.eval.dataset import MetricSettings, bootstrap_ci, evaluate_dataset, image_records, paired_comparison

pytest.importorskip("pyarrow")


def test_paired_comparison_by_hand():
    a, b = [3.0, 5.0, 2.0, 8.0, 1.0], [1.0, 5.0, 4.0, 4.0, 0.0]
    # differences 2, 0, -2, 4, 1; without the zero: |d| = 2, 2, 4, 1 ranked 2.5, 2.5, 4, 1
    # W+ = 2.5 + 4 + 1 = 7.5, W- = 2.5: r = (7.5 - 2.5) / 10 = 0.5
    result = paired_comparison(a, b)
    assert result["n"] == 5 and result["mean_difference"] == pytest.approx(1.0)
    assert result["rank_biserial"] == pytest.approx(0.5)
    assert result["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert paired_comparison([1.0, 2.0], [1.0, 2.0])["rank_biserial"] == 0.0
    assert math.isnan(paired_comparison([1.0], [0.0])["p_value"])
    assert paired_comparison([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])["rank_biserial"] == 1.0


def test_bootstrap_interval():
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)
    assert bootstrap_ci([5.0]) == (5.0, 5.0, 5.0)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    values = np.random.default_rng(1).normal(10.0, 2.0, size=400)
    mean, low, high = bootstrap_ci(values)
    assert mean == pytest.approx(values.mean())
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)  # the normal approximation
    assert low < mean < high and (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert bootstrap_ci(values) == (mean, low, high)  # seeded


class Pairs(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(6, 3, 16, 16, generator=g)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_evaluate_a_dataset_of_tensors_with_custom_methods(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model.eval()

    def saliency(m):
        def explain(x, target):
            x = x.clone().requires_grad_()
            (grad,) = torch.autograd.grad(m(x).gather(1, target[:, None]).sum(), x)
            return grad.abs()
        return explain

    methods = {"saliency": saliency, "ones": lambda m: (lambda x, t: torch.ones_like(x))}
    out = evaluate_dataset(model, Pairs(), methods, ["sparseness", "deletion"], out=tmp_path / "run",
                           settings=MetricSettings(patch_size=4), batch_size=4, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["failures"] == 0
    sparse = {s["method"]: s["mean"] for s in summary["scores"] if s["metric"] == "sparseness"}
    assert sparse["ones"] == pytest.approx(0.0, abs=1e-12) and sparse["saliency"] > 0
    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "results").glob("*.parquet"))[0]).to_pylist()
    assert {r["image"] for r in table} <= {str(i) for i in range(6)}
    assert all(r["label"] == int(r["image"]) % 2 == r["target"] for r in table)  # labels are the targets


def test_image_records_of_a_class_folder_tree(tmp_path):
    from PIL import Image

    for name in ("b", "a"):
        (tmp_path / name / "sub").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name / "2.png")
        Image.new("RGB", (4, 4)).save(tmp_path / name / "sub" / "1.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    root, records, classes = image_records(tmp_path)
    assert classes == ["a", "b"] and root == tmp_path
    assert [(r.index, r.path, r.label) for r in records] == [(0, "a/2.png", 0), (1, "a/sub/1.JPG", 0),
                                                            (2, "b/2.png", 1), (3, "b/sub/1.JPG", 1)]
    assert [r.path for r in image_records(tmp_path, limit=3)[1]] == ["a/2.png", "a/sub/1.JPG", "b/2.png"]
