"""Attention written out with the AttnLRP rules keeps only its inputs for backward and computes
the scores again there: the relevance is that of the plain composition, with less saved."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from lrpx.layers.attention import ScaledDotProductAttention, lrp_matmul, lrp_softmax
from lrpx.core import lrp_apply
from lrpx.ops import ElementwiseOps
from lrpx.rules import Pass, Uniform


def _inputs(heads: int = 4, groups: int = 2, length: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, groups, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, groups, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _composed(q, k, v, causal: bool, rule):
    """The same rules written out by hand: scale (identity on relevance), q k^T, mask, softmax, @ v."""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
    scaled = lrp_apply(ElementwiseOps(partial(torch.mul, other=1 / math.sqrt(q.shape[-1]))), Pass(), q)
    scores = lrp_matmul(scaled, k.transpose(-2, -1), rule=rule)
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool).tril_()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return lrp_matmul(lrp_softmax(scores, -1), v, rule=rule)


def _relevance(out, inputs):
    return torch.autograd.grad(out, inputs, grad_outputs=out.detach())


@pytest.mark.parametrize("causal", [False, True])
def test_recomputed_relevance_equals_composition(causal):
    rule = Uniform(1e-6)
    q, k, v = _inputs()
    out = ScaledDotProductAttention(rule)(q, k, v, is_causal=causal, enable_gqa=True)
    expected = _composed(q, k, v, causal, rule)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True))
    for got, want in zip(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_only_inputs_are_saved():
    q, k, v = _inputs(length=64)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ScaledDotProductAttention()(q, k, v, is_causal=True, enable_gqa=True)
    square = [t for t in saved if t.shape[-2:] == (64, 64)]
    assert square == []  # no scores or weights (64 x 64 per head) kept for backward
    assert {t.data_ptr() for t in saved} <= {q.data_ptr(), k.data_ptr(), v.data_ptr()}


def test_no_recomputation_without_grad():
    q, k, v = (t.detach() for t in _inputs())
    with torch.no_grad():
        out = ScaledDotProductAttention()(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))


def test_called_twice_in_one_graph():
    rule = Uniform(1e-6)
    layer = ScaledDotProductAttention(rule)
    q, k, v = _inputs(heads=2, groups=2)
    out = layer(layer(q, k, v), k, v)
    expected = _composed(_composed(q, k, v, False, rule), k, v, False, rule)
    for got, want in zip(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
