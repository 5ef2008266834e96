"""Insertion, deletion, faithfulness correlation, sparseness and randomization against
independent computations: closed forms on a linear model, numpy / scipy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

import lrpx
from lrpx.eval import (deletion, faithfulness_correlation, insertion, pixel_flipping, randomization, sparseness,
                       spearman, ssim)


class LinearLogit(nn.Module):
    """Two classes: logits ``(w . x, 0)``, so the target-0 probability is ``sigmoid(w . x)``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        score = (x * self.weight).flatten(1).sum(1)
        return torch.stack([score, torch.zeros_like(score)], 1)


@pytest.fixture
def linear():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1, 2, 4, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    return LinearLogit(w).eval(), x, x * w  # relevance = w * x: each pixel's exact contribution


def _sigmoid(v):
    return 1 / (1 + np.exp(-v))


def _contributions(model, x):
    return (x * model.weight).sum(1).flatten(1).numpy()  # (B, pixels): channel-summed contributions


def test_deletion_curve_is_the_closed_form(linear):
    model, x, relevance = linear
    result = deletion(model, x, relevance, target=0, fill=0.0)
    c = _contributions(model, x)
    order = np.argsort(-c, axis=1, kind="stable")
    removed = np.concatenate([np.zeros((3, 1)), np.cumsum(np.take_along_axis(c, order, 1), 1)], 1)
    counts = result.counts.numpy()
    expected = _sigmoid(c.sum(1, keepdims=True) - removed[:, counts])
    np.testing.assert_allclose(result.curve().numpy(), expected, rtol=1e-12)
    assert result.mode == "delete" and result.score == "softmax" and result.orders == ("morf",)
    same = pixel_flipping(model, x, relevance, 0, order="morf", fill=0.0, score="softmax")
    torch.testing.assert_close(result.curves, same.curves, rtol=0, atol=0)


def test_insertion_curve_is_the_closed_form(linear):
    model, x, relevance = linear
    result = insertion(model, x, relevance, target=0, fill=0.0, steps=5)
    c = _contributions(model, x)
    order = np.argsort(-c, axis=1, kind="stable")
    inserted = np.concatenate([np.zeros((3, 1)), np.cumsum(np.take_along_axis(c, order, 1), 1)], 1)
    expected = _sigmoid(inserted[:, result.counts.numpy()])
    np.testing.assert_allclose(result.curve().numpy(), expected, rtol=1e-12)
    assert result.mode == "insert" and result.counts.tolist() == [0, 4, 8, 12, 16, 20]
    # the most relevant first: the curve rises; the area is larger than for the reverse order
    reverse = insertion(model, x, -relevance, target=0, fill=0.0, steps=5)
    assert bool((result.auc() > reverse.auc()).all())


def test_insertion_fixes_the_target_on_the_clean_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=True)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.full((1, 1, 2, 2), 2.0, dtype=torch.float64)  # clean: class 0 (8 > 1); all-zero fill: class 1
    result = insertion(model, x, torch.ones_like(x), fill=0.0, steps=2)
    assert result.target.tolist() == [0]
    torch.testing.assert_close(result.curve()[0, 0], torch.softmax(torch.tensor([0.0, 1.0]), 0)[0].double())


def test_faithfulness_correlation_of_exact_contributions_is_one(linear):
    model, x, relevance = linear
    g = torch.Generator().manual_seed(0)
    corr, sums, drops = faithfulness_correlation(model, x, relevance, 0, subsets=20, subset_size=5, fill=0.0,
                                                 generator=g, return_terms=True, batch_size=7)
    torch.testing.assert_close(sums, drops, rtol=1e-12, atol=1e-12)  # the drop of a linear logit is its sum
    torch.testing.assert_close(corr, torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    anti = faithfulness_correlation(model, x, -relevance, 0, subsets=20, subset_size=5, fill=0.0,
                                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(anti, -torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_faithfulness_correlation_is_pearson_of_its_terms(linear):
    model, x, _ = linear
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    corr, sums, drops = faithfulness_correlation(model, x, noise, 0, subsets=30, subset_size=0.25, fill=0.0,
                                                 generator=torch.Generator().manual_seed(1), return_terms=True)
    for b in range(3):
        assert corr[b].item() == pytest.approx(stats.pearsonr(sums[b].numpy(), drops[b].numpy())[0], abs=1e-12)
    # each subset holds 5 of the 20 pixels: a subset's relevance sum is the sum of 5 pixel sums
    pixel_sums = noise.sum(1).flatten(1)
    assert bool((sums.abs() <= pixel_sums.abs().sum(1, keepdim=True) + 1e-12).all())


def test_per_sample_generators_make_a_sample_independent_of_its_batch(linear):
    model, x, relevance = linear

    def seeds(*indices):
        return [torch.Generator().manual_seed(100 + i) for i in indices]

    alone = faithfulness_correlation(model, x[1:2], relevance[1:2], 0, subsets=10, subset_size=4, fill="random",
                                     generator=seeds(1), return_terms=True)
    batch = faithfulness_correlation(model, x, relevance, 0, subsets=10, subset_size=4, fill="random",
                                     generator=seeds(0, 1, 2), return_terms=True)
    for one, many in zip(alone, batch):
        torch.testing.assert_close(one[0], many[1], rtol=0, atol=0)
    random_alone = pixel_flipping(model, x[2:], relevance[2:], 0, order="random", fill="random", steps=4,
                                  generator=seeds(2))
    random_batch = pixel_flipping(model, x, relevance, 0, order="random", fill="random", steps=4,
                                  generator=seeds(0, 1, 2))
    torch.testing.assert_close(random_alone.curves[:, 0], random_batch.curves[:, 2], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"one per sample \(3\), got 2"):
        pixel_flipping(model, x, relevance, 0, order="random", generator=seeds(0, 1))


def _gini_reference(values: np.ndarray) -> float:
    a = np.sort(np.abs(values.ravel()))
    n = a.size
    if a.sum() == 0:
        return 0.0
    return float(sum((2 * (i + 1) - n - 1) * a[i] for i in range(n)) / (n * a.sum()))


def test_sparseness_is_the_gini_index():
    assert sparseness(torch.ones(1, 3, 4, 4)).item() == pytest.approx(0.0, abs=1e-15)
    one_pixel = torch.zeros(1, 1, 4, 4)
    one_pixel[0, 0, 1, 2] = -3.0
    assert sparseness(one_pixel).item() == pytest.approx(1 - 1 / 16)  # the largest value for n = 16
    assert sparseness(torch.zeros(2, 3, 4, 4)).tolist() == [0.0, 0.0]
    r = torch.randn(3, 3, 5, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = [_gini_reference(r[b].sum(0).numpy()) for b in range(3)]
    np.testing.assert_allclose(sparseness(r).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(sparseness(r, channels="none").numpy(),
                               [_gini_reference(r[b].numpy()) for b in range(3)], rtol=1e-12)
    # hand-computed: |a| sorted = 0, 1, 1, 2: (-3*0 - 1*1 + 1*1 + 3*2) / (4 * 4) = 6 / 16
    assert sparseness(torch.tensor([[[0.0, -1.0], [2.0, 1.0]]])).item() == pytest.approx(6 / 16)


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (3, 40), generator=g).double()  # many ties
    b = a + torch.randn(3, 40, generator=g, dtype=torch.float64)
    got = spearman(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(stats.spearmanr(a[i].numpy(), b[i].numpy())[0], abs=1e-12)


def _ssim_reference(a: np.ndarray, b: np.ndarray, side: int = 11, sigma: float = 1.5) -> float:
    """SSIM with an explicit loop over every position where the Gaussian window fits."""
    taps = np.arange(side) - (side - 1) / 2
    g = np.exp(-taps**2 / (2 * sigma**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(a.shape[0] - side + 1):
        for j in range(a.shape[1] - side + 1):
            pa, pb = a[i:i + side, j:j + side], b[i:i + side, j:j + side]
            ma, mb = (window * pa).sum(), (window * pb).sum()
            va, vb = (window * pa * pa).sum() - ma**2, (window * pb * pb).sum() - mb**2
            cov = (window * pa * pb).sum() - ma * mb
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_an_explicit_window_loop():
    g = torch.Generator().manual_seed(6)
    a = torch.rand(2, 16, 14, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(2, 16, 14, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(a, b)
    for i in range(2):
        assert got[i].item() == pytest.approx(_ssim_reference(a[i].numpy(), b[i].numpy()), abs=1e-12)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    small = ssim(a[:, :7, :7], b[:, :7, :7])  # the window shrinks to 7
    assert small[0].item() == pytest.approx(_ssim_reference(a[0, :7, :7].numpy(), b[0, :7, :7].numpy(), side=7))


def test_randomization_cascades_from_the_top_and_changes_lrp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 4)).double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def explain(m, inputs, target):
        seen.append([float(p.detach().sum()) for p in m.parameters()])
        return lrpx.explain(lrpx.convert(m, lrpx.composites.epsilon_plus()), inputs, target).relevance

    result = randomization(model, x, explain, generator=torch.Generator().manual_seed(1))
    assert result.layers == ("6", "2", "0")
    assert result.spearman.shape == result.ssim.shape == (3, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed
    trained = seen[0]
    # cascading: step 1 changes only the Linear layer, step 2 also the second conv, step 3 all
    assert seen[1][:4] == trained[:4] and seen[1][4:] != trained[4:]
    assert seen[2][:2] == trained[:2] and seen[2][2:4] != trained[2:4]
    assert seen[3][:2] != trained[:2]
    # a fully random model explains differently from the trained one
    assert float(result.spearman[-1].mean()) < 0.9
    same = randomization(model, x, lambda m, i, t: torch.ones_like(i), layers=["6"])
    torch.testing.assert_close(same.ssim, torch.ones(1, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="no module named 'head'"):
        randomization(model, x, explain, layers=["head"])
