"""A Linear layer applied to many rows (tokens) with relevance on a few of them: the rule runs on
those rows only (a language model's head explains one of T x vocabulary logits). The relevance
must equal the rule's formula row by row (the explicit oracle), be exactly zero on the other
rows, and cost no output-sized temporary."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lrpx
from lrpx.core import _live_rows
from lrpx.ops import LinearOps

import oracles


def _head(seed: int = 0, relu: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 40, dtype=torch.float64)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def _relevance(model: nn.Module, x: torch.Tensor, rows: list[tuple[int, int]], rule) -> tuple[torch.Tensor, torch.Tensor]:
    lrp = lrpx.convert(model, lrpx.Composite(default=rule))
    x = x.clone().requires_grad_()
    out = lrp(x)
    r_out = torch.zeros_like(out)
    for b, t in rows:
        r_out[b, t] = out[b, t]
    return torch.autograd.grad(out, x, r_out)[0], r_out


@pytest.mark.parametrize("rule, oracle", [
    (lrpx.rules.Epsilon(1e-3), lambda d, x, r: oracles.epsilon(d, x, r, 1e-3)),
    (lrpx.rules.Gamma(0.5), lambda d, x, r: oracles.gamma(d, x, r, 0.5)),
    (lrpx.rules.AlphaBeta(2, 1), lambda d, x, r: oracles.alpha_beta(d, x, r, 2.0, 1.0)),
])
def test_relevance_on_a_few_rows_follows_the_rule_row_by_row(rule, oracle):
    model = _head()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    rows = [(0, 8), (1, 3)]
    relevance, r_out = _relevance(model, x, rows, rule)
    expected = torch.zeros_like(x)
    dense = oracles.dense_linear(model[0])
    for b, t in rows:
        expected[b, t] = oracle(dense, x[b, t][None], r_out[b, t][None])[0]
    torch.testing.assert_close(relevance, expected, rtol=1e-12, atol=1e-14)
    live = relevance.abs().sum(-1) != 0
    assert live.nonzero().tolist() == [[0, 8], [1, 3]]


def test_a_fused_relu_masks_the_selected_rows():
    model = _head(1, relu=True)
    x = torch.randn(1, 7, 6, dtype=torch.float64)
    relevance, r_out = _relevance(model, x, [(0, 2)], lrpx.rules.Epsilon(1e-6))
    z = model[0](x)[0, 2]
    alive = z > 0
    # the relevance at dead units (z <= 0) is 0 after the ReLU: only live units pass theirs
    expected = oracles.epsilon(oracles.dense_linear(model[0]), x[0, 2][None], torch.where(alive, r_out[0, 2], 0)[None])[0]
    torch.testing.assert_close(relevance[0, 2], expected, rtol=1e-12, atol=1e-14)
    assert relevance[0, [0, 1, 3, 4, 5, 6]].abs().max() == 0


def test_which_rows_are_live():
    ops, rule = LinearOps(), lrpx.rules.Epsilon()
    r = torch.zeros(3, 5, 4)
    r[1, 2, 0] = 1.0
    r[2, 4, 3] = -2.0
    assert _live_rows(ops, rule, r).tolist() == [7, 14]
    assert _live_rows(ops, rule, torch.ones(3, 5, 4)) is None           # every row: the plain path
    assert _live_rows(ops, lrpx.rules.Epsilon(relative=True), r) is None  # RMS over all of z
    assert _live_rows(ops, lrpx.rules.ZBox(-1.0, 1.0), r) is None         # bounds may be per element
    r[:, :, 0] = float("nan")                                           # NaN rows are live
    assert _live_rows(ops, rule, r) is None
    many = torch.zeros(100, 4)
    many[[3, 50, 99], 1] = 1.0
    assert _live_rows(ops, rule, many).tolist() == [3, 50, 99]
    many[:60, 2] = -1.0                                                 # 62 of 100: dense
    assert _live_rows(ops, rule, many) is None


def test_relative_epsilon_keeps_the_whole_sample():
    """``Epsilon(relative=True)`` stabilises by the RMS of the whole output of a sample: rows
    without relevance still count in it."""
    model = _head(2)
    x = torch.randn(1, 5, 6, dtype=torch.float64)
    relevance, r_out = _relevance(model, x, [(0, 1)], lrpx.rules.Epsilon(0.5, relative=True))
    z = model[0](x)[0]
    e = 0.5 * z.pow(2).mean().sqrt().item()
    expected = oracles.epsilon(oracles.dense_linear(model[0]), x[0, 1][None], r_out[0, 1][None], e)[0]
    torch.testing.assert_close(relevance[0, 1], expected, rtol=1e-12, atol=1e-14)


class _Seen(lrpx.rules.Epsilon):
    """Epsilon that records the shapes it is asked for (a list shared by reference)."""

    def __init__(self, seen: list) -> None:
        super().__init__(1e-6)
        object.__setattr__(self, "_seen", seen)

    def _fields(self):
        return {"epsilon": self.epsilon}

    def relevance(self, layer, relevance, input, weight, bias, output):
        self._seen.append((tuple(relevance.shape), tuple(input.shape), tuple(output.shape)))
        return super().relevance(layer, relevance, input, weight, bias, output)


def test_the_rule_sees_only_the_live_rows():
    seen: list = []
    model = _head(3)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    relevance, _ = _relevance(model, x, [(1, 4)], _Seen(seen))
    assert seen == [((1, 40), (1, 6), (1, 40))]
    assert relevance.shape == x.shape
    seen.clear()
    _relevance(model, x, [(b, t) for b in range(2) for t in range(9)], _Seen(seen))
    assert seen == [((2, 9, 40), (2, 9, 6), (2, 9, 40))]


# ------------------------------------------------------------------ property: rows or all

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _dense(rule):
    """The same rule, made to run on all rows (``row_local`` off)."""
    cls = type(f"Dense{type(rule).__name__}", (type(rule),), {"row_local": False})
    return cls(**rule._fields())


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), tokens=st.integers(2, 40), d_in=st.integers(1, 6), d_out=st.integers(1, 9),
       live=st.sets(st.integers(0, 119), max_size=6), relu=st.booleans(),
       rule=st.sampled_from([lrpx.rules.Epsilon(1e-3), lrpx.rules.Gamma(0.25), lrpx.rules.AlphaBeta(2, 1),
                             lrpx.rules.ZPlus()]),
       seed=st.integers(0, 2 ** 16))
def test_the_rows_that_carry_relevance_give_what_all_rows_give(batch, tokens, d_in, d_out, live, relu, rule, seed):
    """Any Linear, any few rows with relevance, with or without a fused ReLU: the rule on those
    rows alone equals the rule on all rows."""
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, d_out, dtype=torch.float64)] + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(*layers).eval()
    x = torch.randn(batch, tokens, d_in, dtype=torch.float64)
    rows = sorted(r for r in live if r < batch * tokens)
    r_out = torch.zeros(batch * tokens, d_out, dtype=torch.float64)
    r_out[rows] = torch.randn(len(rows), d_out, dtype=torch.float64)
    results = []
    for r in (rule, _dense(rule)):
        lrp = lrpx.convert(model, lrpx.Composite(default=r))
        xin = x.clone().requires_grad_()
        out = lrp(xin)
        results.append(torch.autograd.grad(out, xin, r_out.view_as(out))[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-14)
