"""Attention with the AttnLRP rules keeps only its inputs for backward and computes the scores
again there, block by block of queries: the relevance is that of the plain composition of the
rules (written out below with lrpx's single-operation functions), with less saved."""
from __future__ import annotations

import math
from functools import partial

import pytest
import torch

import lrpx.layers.sdpa as attention
from lrpx.layers.attention import lrp_matmul, lrp_softmax
from lrpx.layers.sdpa import ScaledDotProductAttention
from lrpx.core import lrp_apply
from lrpx.ops import ElementwiseOps
from lrpx.rules import Pass, Uniform


def _inputs(heads: int = 4, groups: int = 2, length: int = 6, dim: int = 8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, groups, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, groups, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _composed(q, k, v, causal: bool, rule, mask=None):
    """The same rules written out by hand: scale (identity on relevance), q k^T, mask, softmax, @ v;
    a bool ``mask`` marks the keys each query may attend to."""
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
    scaled = lrp_apply(ElementwiseOps(partial(torch.mul, other=1 / math.sqrt(q.shape[-1]))), Pass(), q)
    scores = lrp_matmul(scaled, k.transpose(-2, -1), rule=rule)
    if causal:
        allowed = torch.ones(scores.shape[-2:], dtype=torch.bool).tril_()
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return lrp_matmul(lrp_softmax(scores, -1), v, rule=rule)


def _relevance(out, inputs):
    return torch.autograd.grad(out, inputs, grad_outputs=out.detach())


def _close(got, want):
    """Equal to float64 rounding (the blocks sum in another order than the whole)."""
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block", [None, 16])
def test_recomputed_relevance_equals_composition(causal, block, monkeypatch):
    if block:  # blocks of 16 query rows: 40 queries in 3 blocks, the last one short
        monkeypatch.setattr(attention, "_BLOCK_CPU", 1)
    rule = Uniform(1e-6)
    q, k, v = _inputs(length=40 if block else 6)
    out = ScaledDotProductAttention(rule)(q, k, v, is_causal=causal, enable_gqa=True)
    expected = _composed(q, k, v, causal, rule)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True), rtol=0, atol=0)  # torch's own forward
    _close(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v)))


def test_another_rule_is_written_out_and_recomputed():
    rule = Uniform(1e-2)

    class Halves(Uniform):  # the same rule under another class: not the built-in blockwise form
        pass

    q, k, v = _inputs()
    out = ScaledDotProductAttention(Halves(1e-2))(q, k, v, is_causal=True, enable_gqa=True)
    assert type(out.grad_fn).__name__ != "_AttentionBackward"
    expected = _composed(q, k, v, True, rule)
    for got, want in zip(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v))):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("block", [None, 16])
def test_masks_and_fully_masked_rows(block, monkeypatch):
    """A bool mask with queries that may attend to nothing (left padding under a causal mask):
    those rows pass no relevance and nothing is NaN; the others equal the composition."""
    if block:
        monkeypatch.setattr(attention, "_BLOCK_CPU", 1)
    rule = Uniform(1e-6)
    length = 40 if block else 6
    q, k, v = _inputs(length=length)
    real = torch.arange(length) >= 2  # the first two positions are padding
    mask = torch.ones(length, length, dtype=torch.bool).tril_() & real[None, :]
    out = ScaledDotProductAttention(rule)(q, k, v, attn_mask=mask, enable_gqa=True)
    got = _relevance(out, (q, k, v))
    assert all(torch.isfinite(t).all() for t in got)
    assert got[0][:, :, :2].abs().max() == 0  # padded queries
    assert got[1][:, :, :2].abs().max() == 0 and got[2][:, :, :2].abs().max() == 0  # padded keys
    # the other queries do not see the padded ones: the composition without them (no NaN rows)
    r_out = out.detach()[:, :, 2:]
    expected = _composed(q[:, :, 2:], k, v, False, rule, mask[2:])
    want = torch.autograd.grad(expected, (q, k, v), grad_outputs=r_out)
    torch.testing.assert_close(got[0][:, :, 2:], want[0][:, :, 2:], rtol=1e-10, atol=1e-13)
    _close(got[1:], want[1:])


def test_a_float_mask_is_a_bias_that_keeps_its_share():
    """A float mask with -inf and other values: composition with the bias rule (``_biased``)."""
    rule = Uniform(1e-6)
    q, k, v = _inputs(heads=2, groups=2)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(6, 6, generator=g, dtype=torch.float64)
    bias[torch.ones(6, 6, dtype=torch.bool).triu(1)] = float("-inf")
    bias[:, 0] = 0.0
    out = ScaledDotProductAttention(rule)(q, k, v, attn_mask=bias)
    layer = ScaledDotProductAttention(rule)
    expected = layer._attend(q, k, v, bias, False, None, False)
    _close(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_relevance_follows_float32(dtype):
    """The backward computes in float32: from the same (rounded) inputs and output relevance, the
    half-precision relevance is the float32 one rounded."""
    q, k, v = _inputs(length=24)
    half = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    single = [t.detach().float().requires_grad_() for t in half]
    out = ScaledDotProductAttention()(*half, is_causal=True, enable_gqa=True)
    got = torch.autograd.grad(out, half, grad_outputs=out.detach())
    want = torch.autograd.grad(ScaledDotProductAttention()(*single, is_causal=True, enable_gqa=True), single,
                               grad_outputs=out.detach().float())
    for h, s in zip(got, want):
        assert h.dtype == dtype
        torch.testing.assert_close(h, s.to(dtype), rtol=0, atol=0)


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
        q, k, v, is_causal=True, enable_gqa=True), rtol=0, atol=0)  # torch's kernel itself


def test_called_twice_in_one_graph():
    rule = Uniform(1e-6)
    layer = ScaledDotProductAttention(rule)
    q, k, v = _inputs(heads=2, groups=2)
    out = layer(layer(q, k, v), k, v)
    expected = _composed(_composed(q, k, v, False, rule), k, v, False, rule)
    _close(_relevance(out, (q, k, v)), _relevance(expected, (q, k, v)))


def test_rows_of_a_batched_backward_equal_one_by_one(monkeypatch):
    """Many output relevances at once (``is_grads_batched``, as ``lrpx.concepts`` runs them),
    in blocks of 16 queries."""
    monkeypatch.setattr(attention, "_BLOCK_CPU", 1)
    q, k, v = _inputs(length=40)
    out = ScaledDotProductAttention()(q, k, v, is_causal=True, enable_gqa=True)
    g = torch.Generator().manual_seed(5)
    rows = torch.randn((3,) + out.shape, generator=g, dtype=torch.float64)
    batched = torch.autograd.grad(out, (q, k, v), grad_outputs=rows, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        one = torch.autograd.grad(out, (q, k, v), grad_outputs=rows[i], retain_graph=True)
        for b, o in zip(batched, one):
            torch.testing.assert_close(b[i], o, rtol=1e-12, atol=1e-15)
