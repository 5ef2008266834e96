"""AttnLRP twins of attention against torch's forward and a float64 numpy oracle.

The oracle below is written from the equations of Achtibat et al. 2024 (AttnLRP) with
explicit loops over batch and head, in numpy, and never calls lrpx:

* softmax ``s = softmax(x)``:      ``R_x = x * (R - s * sum(R))``, 0 where ``x = -inf``;
* product ``O = A @ B``:           ``S = R / stab(2 O)``, ``R_A = A * (S @ B.T)``, ``R_B = B * (A.T @ S)``;
* linear ``z = W x + b`` (epsilon): ``R_x = x * (W.T @ (R / stab(z)))``;
* ``q / sqrt(d)`` and the additive mask: identity.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import lrpx
from lrpx.layers import ScaledDotProductAttention, default_twins
from lrpx.layers.attention import ATTENTION_TWINS, LRPMultiheadAttention, LRPSoftmax, lrp_matmul, lrp_softmax
from lrpx.rules import Epsilon, Taylor

DT = torch.float64
EPS = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ numpy oracle


def stab(z: np.ndarray, e: float) -> np.ndarray:
    return z + e * np.where(z >= 0, 1.0, -1.0)


def softmax_rows(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    p = np.exp(x - m)
    return p / p.sum(-1, keepdims=True)


def softmax_relevance(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Prop. 3.1 on the last axis; -inf inputs get 0."""
    s = softmax_rows(x)
    out = np.where(np.isneginf(x), 0.0, x) * (r - s * r.sum(-1, keepdims=True))
    return np.where(np.isneginf(x), 0.0, out)


def matmul_relevance(a: np.ndarray, b: np.ndarray, r: np.ndarray, e: float) -> tuple[np.ndarray, np.ndarray]:
    """Prop. 3.3 for one 2D product ``a @ b``."""
    s = r / stab(2 * (a @ b), e)
    return a * (s @ b.T), b * (a.T @ s)


def linear_relevance(x: np.ndarray, w: np.ndarray, b: np.ndarray, r: np.ndarray, e: float) -> np.ndarray:
    """LRP-epsilon of ``x @ w.T + b`` for rows ``x``, element by element."""
    z = x @ w.T + b
    s = r / stab(z, e)
    out = np.zeros_like(x)
    for j in range(x.shape[-1]):
        out[..., j] = x[..., j] * (s * w[:, j]).sum(-1)
    return out


def attention_oracle(xq, xk, xv, p: dict, heads: int, mask, r_y, e: float):
    """Forward and relevance of multi-head attention, batch first ``(N, L, E)``, by hand.

    ``p`` holds numpy ``wq, wk, wv, bq, bk, bv, wo, bo``; ``mask`` is additive ``(N, H, L, S)``.
    Returns ``y, R_xq, R_xk, R_xv``.
    """
    q, k, v = xq @ p["wq"].T + p["bq"], xk @ p["wk"].T + p["bk"], xv @ p["wv"].T + p["bv"]
    n_batch, length, embed = q.shape
    d = embed // heads
    c = 1.0 / math.sqrt(d)
    o = np.zeros_like(q)
    saved = {}
    for n in range(n_batch):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            qs, kh, vh = q[n, :, sl] * c, k[n, :, sl], v[n, :, sl]
            scores = qs @ kh.T
            x = scores + mask[n, h]
            w = softmax_rows(x)
            o[n, :, sl] = w @ vh
            saved[n, h] = qs, kh, vh, x, w
    y = o @ p["wo"].T + p["bo"]
    r_o = linear_relevance(o, p["wo"], p["bo"], r_y, e)
    r_q, r_k, r_v = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for (n, h), (qs, kh, vh, x, w) in saved.items():
        sl = slice(h * d, (h + 1) * d)
        r_w, r_v[n, :, sl] = matmul_relevance(w, vh, r_o[n, :, sl], e)
        r_x = softmax_relevance(x, r_w)  # the mask is a constant: r_scores = r_x
        r_qs, r_kt = matmul_relevance(qs, kh.T, r_x, e)
        r_q[n, :, sl], r_k[n, :, sl] = r_qs, r_kt.T  # q / sqrt(d): identity
    return (y, linear_relevance(xq, p["wq"], p["bq"], r_q, e), linear_relevance(xk, p["wk"], p["bk"], r_k, e),
            linear_relevance(xv, p["wv"], p["bv"], r_v, e))


def numpy_params(m: nn.MultiheadAttention) -> dict:
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight.detach().numpy().reshape(3, e, e)
    else:
        wq, wk, wv = (w.detach().numpy() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
    zero = np.zeros(e)
    bq, bk, bv = (zero,) * 3 if m.in_proj_bias is None else m.in_proj_bias.detach().numpy().reshape(3, e)
    bo = zero if m.out_proj.bias is None else m.out_proj.bias.detach().numpy()
    return dict(wq=wq, wk=wk, wv=wv, bq=bq, bk=bk, bv=bv, wo=m.out_proj.weight.detach().numpy(), bo=bo)


# ------------------------------------------------------------------ helpers


def make_mha(embed=8, heads=2, seed=0, dtype=DT, **kwargs) -> nn.MultiheadAttention:
    """An eval-mode MHA with random (non-zero) weights and biases."""
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(embed, heads, dtype=dtype, **kwargs).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def rand(*shape, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT).to(dtype)


def assert_close(actual, expected, rtol):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def relevance(module, inputs, grad, **kwargs):
    """Input relevance of each distinct input tensor for output relevance ``grad``."""
    leaves = {id(t): t.detach().clone().requires_grad_() for t in inputs}
    out, _ = module(*(leaves[id(t)] for t in inputs), **kwargs)
    distinct = list(leaves.values())
    return out.detach(), torch.autograd.grad(out, distinct, grad_outputs=grad)


# ------------------------------------------------------------------ forward equality


def _inputs(cross: bool, batch_first: bool, kdim: int = 8, vdim: int = 8, n=2, length=4, source=5):
    def lay(t):
        return t if batch_first else t.transpose(0, 1).contiguous()

    x = lay(rand(n, length, 8, seed=1))
    if not cross:
        return x, x, x, length
    return x, lay(rand(n, source, kdim, seed=2)), lay(rand(n, source, vdim, seed=3)), source


FORWARD_CASES = [
    dict(batch_first=True), dict(batch_first=False), dict(batch_first=True, cross=True),
    dict(batch_first=False, cross=True, kdim=3, vdim=5), dict(batch_first=True, cross=True, kdim=6),
    dict(batch_first=True, bias=False), dict(batch_first=False, cross=True, bias=False, kdim=3, vdim=5),
]
MASKS = ["none", "bool", "float", "padding", "bool+padding", "float3d+floatpadding"]


def _masks(kind: str, n: int, heads: int, length: int, source: int) -> dict:
    g = torch.Generator().manual_seed(7)
    allowed = torch.rand(length, source, generator=g) > 0.4
    allowed[:, 0] = True  # no fully masked row
    out = {}
    if kind.startswith("bool"):
        out["attn_mask"] = ~allowed
    if kind.startswith("float"):
        out["attn_mask"] = torch.randn(length, source, generator=g, dtype=DT)
    if kind.startswith("float3d"):
        out["attn_mask"] = torch.randn(n * heads, length, source, generator=g, dtype=DT)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -1] = True
    if "padding" in kind:
        out["key_padding_mask"] = padding.to(DT).masked_fill(padding, -1e4) if "floatpadding" in kind else padding
    return out


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("mask", MASKS)
def test_forward_equals_torch(case, mask):
    case = dict(case)
    cross, kdim, vdim = case.pop("cross", False), case.get("kdim", 8), case.get("vdim", 8)
    m = make_mha(**case)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    q, k, v, source = _inputs(cross, case["batch_first"], kdim, vdim)
    masks = _masks(mask, 2, 2, 4, source)
    with torch.no_grad():
        for need, avg in ((True, True), (True, False), (False, True)):
            kw = dict(need_weights=need, average_attn_weights=avg, **masks)
            (y, w), (yt, wt) = m(q, k, v, **kw), twin(q, k, v, **kw)
            torch.testing.assert_close(yt, y, rtol=1e-12, atol=1e-12)
            if need:
                torch.testing.assert_close(wt, w, rtol=1e-12, atol=1e-14)
            else:
                assert wt is None and w is None


@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_unbatched(batch_first):
    m = make_mha(kdim=3, vdim=5, batch_first=batch_first)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    q, k, v = rand(4, 8, seed=1), rand(5, 3, seed=2), rand(5, 5, seed=3)
    padding = torch.tensor([False, False, True, False, False])
    attn = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(0)) > 0.6  # (heads, L, S) unbatched
    attn[..., 0] = False
    with torch.no_grad():
        for kw in (dict(), dict(key_padding_mask=padding, attn_mask=attn, average_attn_weights=False),
                   dict(need_weights=False, key_padding_mask=padding)):
            (y, w), (yt, wt) = m(q, k, v, **kw), twin(q, k, v, **kw)
            assert yt.shape == (4, 8)
            torch.testing.assert_close(yt, y, rtol=1e-12, atol=1e-12)
            if w is not None:
                torch.testing.assert_close(wt, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("need_weights", [True, False])
def test_forward_is_causal(need_weights):
    m = make_mha(batch_first=True)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    x = rand(2, 5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    with torch.no_grad():
        y, w = m(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        yt, wt = twin(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(yt, y, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="is_causal"):
        twin(x, x, x, is_causal=True)


def test_vit_encoder_block():
    from torchvision.models.vision_transformer import EncoderBlock

    torch.manual_seed(0)
    block = EncoderBlock(num_heads=2, hidden_dim=8, mlp_dim=16, dropout=0.0, attention_dropout=0.0).double().eval()
    lrp_block = copy.deepcopy(block)
    lrp_block.self_attention = LRPMultiheadAttention.from_module(lrp_block.self_attention, Epsilon(EPS))
    r = _same_forward_and_relevance(lrp_block, block, rand(2, 5, 8))
    assert torch.isfinite(r).all()  # the rest of the block (LayerNorm, MLP) is plain gradient


# ------------------------------------------------------------------ the two rules


def test_lrp_softmax_oracle():
    x, r = rand(3, 4, 6, seed=1), rand(3, 4, 6, seed=2)
    for dim in (-1, 1):
        xr = x.clone().requires_grad_()
        out = lrp_softmax(xr, dim)
        torch.testing.assert_close(out, torch.softmax(x, dim), rtol=0, atol=0)
        (got,) = torch.autograd.grad(out, xr, grad_outputs=r)
        xn, rn = np.moveaxis(x.numpy(), dim, -1), np.moveaxis(r.numpy(), dim, -1)
        assert_close(got, np.moveaxis(softmax_relevance(xn, rn), -1, dim), 1e-9)


def test_lrp_softmax_masked_positions_get_zero():
    x, r = rand(2, 5, seed=1), rand(2, 5, seed=2)
    x[0, 1] = x[1, 3] = x[1, 4] = float("-inf")
    xr = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(lrp_softmax(xr, -1), xr, grad_outputs=r)
    assert torch.isfinite(got).all()
    assert got[0, 1] == 0 and got[1, 3] == 0 and got[1, 4] == 0
    assert_close(got, softmax_relevance(x.numpy(), r.numpy()), 1e-9)
    # a fully masked row (softmax NaN) still gives relevance 0 there
    x[0] = float("-inf")
    xr = x.clone().requires_grad_()
    (got,) = torch.autograd.grad(lrp_softmax(xr, -1), xr, grad_outputs=r)
    assert (got[0] == 0).all()


def test_lrp_softmax_absorbed_amount():
    """Not conservative by design: sum R_x = sum(x R) - sum(x s) sum(R) per row."""
    x, r = rand(4, 7, seed=3), rand(4, 7, seed=4)
    xr = x.clone().requires_grad_()
    s = torch.softmax(x, -1)
    (got,) = torch.autograd.grad(lrp_softmax(xr, -1), xr, grad_outputs=r)
    expected = (x * r).sum(-1) - (x * s).sum(-1) * r.sum(-1)
    torch.testing.assert_close(got.sum(-1), expected, rtol=1e-12, atol=1e-12)


def test_lrp_matmul_oracle_and_conservation():
    a, b, r = rand(2, 3, 4, 5, seed=1), rand(2, 3, 5, 6, seed=2), rand(2, 3, 4, 6, seed=3)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = lrp_matmul(ar, br, EPS)
    torch.testing.assert_close(out, a @ b, rtol=0, atol=0)
    ra, rb = torch.autograd.grad(out, (ar, br), grad_outputs=r)
    expected_a, expected_b = np.zeros(a.shape), np.zeros(b.shape)
    for i in range(2):
        for j in range(3):
            expected_a[i, j], expected_b[i, j] = matmul_relevance(a[i, j].numpy(), b[i, j].numpy(),
                                                                  r[i, j].numpy(), EPS)
    assert_close(ra, expected_a, 1e-9)
    assert_close(rb, expected_b, 1e-9)
    total = r.sum()
    assert abs(float(ra.sum() + rb.sum() - total)) <= 1e-8 * float(r.abs().sum())


def test_lrp_matmul_broadcast_batch():
    """A shared right factor: its relevance sums over the broadcast batch."""
    a, b, r = rand(3, 4, 5, seed=1), rand(5, 2, seed=2), rand(3, 4, 2, seed=3)
    ar, br = a.clone().requires_grad_(), b.clone().requires_grad_()
    ra, rb = torch.autograd.grad(lrp_matmul(ar, br, EPS), (ar, br), grad_outputs=r)
    expected_b = sum(matmul_relevance(a[i].numpy(), b.numpy(), r[i].numpy(), EPS)[1] for i in range(3))
    assert ra.shape == a.shape and rb.shape == b.shape
    assert_close(rb, expected_b, 1e-9)
    with pytest.raises(ValueError, match="2 dimensions"):
        lrp_matmul(a, b[0])


def test_lrp_softmax_twin():
    m = nn.Softmax(dim=1)
    twin = LRPSoftmax.from_module(m, Taylor())
    x, r = rand(2, 5, 3, seed=1), rand(2, 5, 3, seed=2)
    xr = x.clone().requires_grad_()
    out = twin(xr)
    torch.testing.assert_close(out, m(x), rtol=0, atol=0)
    (got,) = torch.autograd.grad(out, xr, grad_outputs=r)
    expected = np.moveaxis(softmax_relevance(np.moveaxis(x.numpy(), 1, -1), np.moveaxis(r.numpy(), 1, -1)), -1, 1)
    assert_close(got, expected, 1e-9)
    assert "rule=Taylor()" in repr(twin) and "dim=1" in repr(twin)
    assert twin.lrp_kind == "softmax" and isinstance(twin, nn.Softmax)


# ------------------------------------------------------------------ relevance through attention


RELEVANCE_CASES = {
    "self-batch_first": dict(batch_first=True),
    "self-seq_first-masks": dict(batch_first=False, masks="bool+padding"),
    "cross-kdim-vdim": dict(batch_first=True, cross=True, kdim=3, vdim=5, masks="float"),
    "cross-packed-nobias": dict(batch_first=False, cross=True, bias=False),
}


def _to_batch_first(t, batch_first):
    return t if batch_first else t.transpose(0, 1)


@pytest.mark.parametrize("name", list(RELEVANCE_CASES))
def test_relevance_equals_oracle(name):
    case = dict(RELEVANCE_CASES[name])
    cross, masks_kind = case.pop("cross", False), case.pop("masks", "none")
    bf = case["batch_first"]
    m = make_mha(heads=2, **case)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    q, k, v, source = _inputs(cross, bf, case.get("kdim", 8), case.get("vdim", 8))
    masks = _masks(masks_kind, 2, 2, 4, source)
    r_y = rand(*q.shape, seed=11)
    y, grads = relevance(twin, (q, k, v), r_y, need_weights=False, **masks)

    additive = np.zeros((2, 2, 4, source))
    if "attn_mask" in masks:
        am = masks["attn_mask"]
        additive = additive + np.where(am.numpy(), -np.inf, 0.0) if am.dtype == torch.bool else additive + am.numpy()
    if "key_padding_mask" in masks:
        additive = additive + np.where(masks["key_padding_mask"].numpy(), -np.inf, 0.0)[:, None, None, :]
    npy = [_to_batch_first(t, bf).numpy() for t in (q, k, v)]
    ye, rq, rk, rv = attention_oracle(*npy, numpy_params(m), 2, additive, _to_batch_first(r_y, bf).numpy(), EPS)
    assert_close(_to_batch_first(y, bf), ye, 1e-10)
    if cross:
        for got, expected in zip(grads, (rq, rk, rv)):
            assert_close(_to_batch_first(got, bf), expected, 1e-8)
    else:  # query = key = value: autograd sums the three paths
        (got,) = grads
        assert_close(_to_batch_first(got, bf), rq + rk + rv, 1e-8)


def test_relevance_unbatched_equals_batched():
    m = make_mha(batch_first=True)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    x, r = rand(4, 8, seed=1), rand(4, 8, seed=2)
    _, (single,) = relevance(twin, (x, x, x), r)
    xb = x[None]
    _, (batched,) = relevance(twin, (xb, xb, xb), r[None])
    torch.testing.assert_close(single, batched[0], rtol=1e-12, atol=1e-12)


def test_conservation_with_zero_biases(record_property):
    """Reported, not asserted: the softmax rule absorbs relevance by design."""
    m = make_mha(batch_first=True)
    with torch.no_grad():
        m.in_proj_bias.zero_()
        m.out_proj.bias.zero_()
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    x, r_y = rand(2, 4, 8), rand(2, 4, 8, seed=5)
    _, (r,) = relevance(twin, (x, x, x), r_y)
    record_property("relevance_in_over_out", float(r.sum() / r_y.sum()))
    assert torch.isfinite(r).all()


def test_called_twice_and_stateless():
    m = make_mha(batch_first=True)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    before = dict(twin.__dict__)
    x1, x2, r = rand(1, 3, 8, seed=1), rand(1, 3, 8, seed=2), rand(1, 3, 8, seed=3)
    _, (r1,) = relevance(twin, (x1, x1, x1), r)
    _, (r2,) = relevance(twin, (x2, x2, x2), r)
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    out = twin(a, a, a)[0] + twin(b, b, b)[0]
    ga, gb = torch.autograd.grad(out, (a, b), grad_outputs=r)
    torch.testing.assert_close(ga, r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, r2, rtol=1e-12, atol=1e-12)
    assert twin.__dict__.keys() == before.keys() and twin.rule is before["rule"]
    assert twin._parameters.keys() == m._parameters.keys() and twin._buffers == {}


def test_twin_shares_parameters():
    m = make_mha(kdim=3, vdim=5)
    twin = LRPMultiheadAttention.from_module(m, Epsilon(EPS))
    assert twin.state_dict().keys() == m.state_dict().keys()
    assert all(a is b for a, b in zip(twin.parameters(), m.parameters()))
    assert "rule=Epsilon(epsilon=1e-09)" in repr(twin)
    assert type(twin.out_proj) is NonDynamicallyQuantizableLinear


# ------------------------------------------------------------------ convert


class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.attention(x, x, x, need_weights=False)
        return self.head(y.mean(1))


TWINS = {nn.MultiheadAttention: LRPMultiheadAttention, NonDynamicallyQuantizableLinear: None}


def _tiny_reference(model: TinyAttention, x: torch.Tensor, mean_rule: bool) -> np.ndarray:
    """Input relevance of ``TinyAttention`` for R = its output, by the numpy oracles: epsilon
    (1e-6, the default composite) on the head; the token mean by the Norm rule or, untraced,
    by its gradient; the attention oracle."""
    e, xn = 1e-6, x.numpy()
    params = numpy_params(model.attention)
    zero_mask = np.zeros((xn.shape[0], 2, xn.shape[1], xn.shape[1]))
    y = attention_oracle(xn, xn, xn, params, 2, zero_mask, np.zeros_like(xn), e)[0]
    m = y.mean(1)
    head_w, head_b = model.head.weight.detach().numpy(), model.head.bias.detach().numpy()
    out = m @ head_w.T + head_b
    r_m = linear_relevance(m, head_w, head_b, out, e)
    length = xn.shape[1]
    r_y = y * (r_m / stab(m, e))[:, None, :] / length if mean_rule else np.repeat(r_m[:, None, :] / length, length, 1)
    _, rq, rk, rv = attention_oracle(xn, xn, xn, params, 2, zero_mask, r_y, e)
    return rq + rk + rv


def _same_forward_and_relevance(lrp_model: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Assert ``lrp_model`` computes ``model``'s forward; return the input relevance for R = output."""
    with torch.no_grad():
        torch.testing.assert_close(lrp_model(x), model(x), rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    out = lrp_model(xr)
    (r,) = torch.autograd.grad(out, xr, grad_outputs=out.detach())
    return r


def test_convert_tiny_model():
    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lrp_model = lrpx.convert(model, twins=TWINS, trace=False)
    assert type(model.attention) is nn.MultiheadAttention
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(lrp_model.attention, LRPMultiheadAttention)
    assert lrp_model.attention.rule == Epsilon()
    x = rand(2, 5, 8)
    r = _same_forward_and_relevance(lrp_model, model, x)
    assert_close(r, _tiny_reference(model, x, mean_rule=False), 1e-8)  # untraced: x.mean(1) stays a gradient


def test_convert_tiny_model_traced():
    torch.manual_seed(0)
    model = TinyAttention().double().eval()
    lrp_model = lrpx.convert(model, twins=TWINS)
    x = rand(2, 5, 8)
    r = _same_forward_and_relevance(lrp_model, model, x)
    assert_close(r, _tiny_reference(model, x, mean_rule=True), 1e-8)  # traced: x.mean(1) takes Norm


def test_attention_twins_registry():
    assert ATTENTION_TWINS == {nn.MultiheadAttention: LRPMultiheadAttention, nn.Softmax: LRPSoftmax}
    assert default_twins()[ScaledDotProductAttention] is ScaledDotProductAttention
    assert LRPMultiheadAttention.lrp_kind == "weighted"


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("option", ["add_bias_kv", "add_zero_attn"])
def test_unsupported_options(option):
    m = nn.MultiheadAttention(8, 2, **{option: True}).eval()
    with pytest.raises(NotImplementedError, match=option):
        LRPMultiheadAttention.from_module(m, Epsilon())


def test_training_with_dropout_refused():
    twin = LRPMultiheadAttention.from_module(make_mha(dropout=0.1), Epsilon())
    twin.train()
    x = rand(3, 1, 8)
    with pytest.raises(RuntimeError, match="eval"):
        twin(x, x, x)
    twin.eval()
    twin(x, x, x)


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision(dtype):
    m = make_mha(batch_first=True)
    x, r = rand(2, 4, 8, seed=1), rand(2, 4, 8, seed=2)
    _, (reference,) = relevance(LRPMultiheadAttention.from_module(m, Epsilon(1e-6)), (x, x, x), r)
    low = copy.deepcopy(m).to(dtype)
    xl = x.to(dtype)
    y, (got,) = relevance(LRPMultiheadAttention.from_module(low, Epsilon(1e-6)), (xl, xl, xl), r.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all() and torch.isfinite(y).all()
    with torch.no_grad():
        torch.testing.assert_close(y, low(xl, xl, xl)[0], rtol=0.02 if dtype == torch.bfloat16 else 1e-5, atol=0.05)
    if dtype == torch.float32:
        scale = float(reference.abs().max())
        torch.testing.assert_close(got.double(), reference, rtol=1e-3, atol=1e-3 * scale)


def test_bad_masks_refused():
    twin = LRPMultiheadAttention.from_module(make_mha(batch_first=True), Epsilon())
    x = rand(2, 4, 8)
    with pytest.raises(RuntimeError, match="attn_mask has shape"):
        twin(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool or floating point"):
        twin(x, x, x, attn_mask=torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="all be 3D"):
        twin(x, x[0], x[0])
