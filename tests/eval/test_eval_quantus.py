"""lrpx.eval against Quantus where both implement the same definition, and lrpx as Quantus's
``explain_func`` (runs where the ``bench`` extra installs Quantus)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lrpx
from lrpx.eval import relevance_mass_accuracy, relevance_rank_accuracy, sparseness

quantus = pytest.importorskip("quantus")


@pytest.fixture
def batch():
    g = np.random.default_rng(0)
    x = g.random((4, 3, 8, 8)).astype(np.float32)
    a = g.normal(size=(4, 1, 8, 8)).astype(np.float32)
    s = (g.random((4, 1, 8, 8)) > 0.7).astype(np.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
    return model, x, np.array([0, 1, 2, 0]), a, s


def _quantus(metric, model, x, y, a, s=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=a, s_batch=s, device="cpu"))


def test_sparseness_and_localisation_equal_quantus(batch):
    model, x, y, a, s = batch
    expected = _quantus(quantus.Sparseness(abs=True, normalise=False, disable_warnings=True), model, x, y, a)
    np.testing.assert_allclose(sparseness(torch.tensor(a)).numpy(), expected, rtol=1e-5)
    expected = _quantus(quantus.RelevanceRankAccuracy(abs=False, normalise=False, disable_warnings=True),
                        model, x, y, a, s)
    np.testing.assert_allclose(relevance_rank_accuracy(torch.tensor(a), torch.tensor(s)).numpy(), expected)
    # mass accuracy: Quantus sums signed relevance, lrpx the positive relevance (Arras et al. 2022);
    # the two agree on non-negative maps
    expected = _quantus(quantus.RelevanceMassAccuracy(abs=True, normalise=False, disable_warnings=True),
                        model, x, y, a, s)
    np.testing.assert_allclose(relevance_mass_accuracy(torch.tensor(np.abs(a)), torch.tensor(s)).numpy(), expected,
                               rtol=1e-5)


def test_lrpx_as_the_explain_func_of_quantus(batch):
    model, x, y, _, _ = batch
    explain = lrpx.methods.quantus_explain_func("epsilon_plus", channel_sum=True)
    a = explain(model, x, y)
    direct = lrpx.explain(lrpx.convert(model, lrpx.composites.epsilon_plus()), torch.tensor(x), torch.tensor(y))
    np.testing.assert_allclose(a, direct.relevance.sum(1, keepdim=True).numpy(), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = quantus.Sparseness(disable_warnings=True)(model=model, x_batch=x, y_batch=y, a_batch=None,
                                                          explain_func=explain, device="cpu")
    assert len(scores) == 4 and all(0 <= v <= 1 for v in scores)
