"""One Llama decoder block of a converted model against AttnLRP written out in numpy.

The block: ``h = x + o(attention(rms1(x)))``, ``y = h + down(silu(gate(n)) * up(n))`` with
``n = rms2(h)``; rotary embeddings on q and k, grouped-query attention (4 query heads, 2 key /
value heads), causal softmax attention. The oracle applies, from the formulas:

* residual sums, ``a + b`` (also ``q cos + rotate_half(q) sin``): ``R_a = a R / stab(a + b)``;
* linear layers without bias, epsilon rule: ``R_x = x * ((R / stab(z)) @ W)``;
* RMSNorm ``w * x / rms(x)``: ``1/rms`` and ``w`` constant factors, ``R_x = R``;
* products with cos / sin (constants) and the scaling of q: ``R`` passes to the activation;
* ``rotate_half`` (a signed permutation): relevance moves with the values;
* ``silu(g) * u``: half to each factor, then ``silu`` passes;
* ``q k^T`` and ``A v``: ``S = R / stab(2 O)``, ``R_A = A * (S B^T)``, ``R_B = B * (A^T S)``;
* softmax: ``R_x = x * (R - s * sum(R))``, 0 at masked (``-inf``) scores;
* GQA: a key / value head used by two query heads gets the sum of their relevance.

transformers computes RMSNorm in float32 inside a float64 model; the oracle takes the same
float32 forward values (with torch), and the relevance passes the norm unchanged: all of it
passes the scaling, in float64 (lrpx does not let the float32 round trip round it).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lrpx

transformers = pytest.importorskip("transformers")

E = 1e-6  # the stabilizer of every rule in the default composite


def stab(z):
    return z + E * np.where(z >= 0, 1.0, -1.0)


def linear_rule(x, W, R):
    z = x @ W.T
    return x * ((R / stab(z)) @ W)


def sum_rule(a, b, R):
    s = R / stab(a + b)
    return a * s, b * s


def matmul_rule(A, B, R):
    S = R / stab(2 * (A @ B))
    return A * (S @ np.swapaxes(B, -1, -2)), B * (np.swapaxes(A, -1, -2) @ S)


def rms_forward(x, w, eps):
    """transformers' RMSNorm: the normalisation in float32, the weight in float64."""
    t = torch.from_numpy(x).float()
    n = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return w * n.double().numpy()


def rms_rule(R):
    return R  # passes: 1/rms and w are constant factors


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate((-x[..., half:], x[..., :half]), -1)


def rotate_half_back(R):
    """Relevance of ``x`` given that of ``rotate_half(x) = [-x2, x1]``: it moves with the values."""
    half = R.shape[-1] // 2
    return np.concatenate((R[..., half:], R[..., :half]), -1)


def rotary_rule(q, cos, sin, R):
    """``q cos + rotate_half(q) sin``: the sum rule, then the constant factors pass."""
    r_c, r_s = sum_rule(q * cos, rotate_half(q) * sin, R)
    return r_c + rotate_half_back(r_s)


def block_oracle(x, p, cos, sin, R, heads, kv_heads, eps):
    """Relevance of the block's input ``x`` (T, D) for output relevance ``R`` (T, D)."""
    T, D = x.shape
    hd = D // heads
    group = heads // kv_heads
    # forward
    n1 = rms_forward(x, p["rms1"], eps)
    q = (n1 @ p["q"].T).reshape(T, heads, hd).transpose(1, 0, 2)
    k = (n1 @ p["k"].T).reshape(T, kv_heads, hd).transpose(1, 0, 2)
    v = (n1 @ p["v"].T).reshape(T, kv_heads, hd).transpose(1, 0, 2)
    qr, kr = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    kr_, v_ = np.repeat(kr, group, 0), np.repeat(v, group, 0)
    qs = qr * hd ** -0.5
    scores = qs @ np.swapaxes(kr_, -1, -2)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    A = np.exp(scores - scores.max(-1, keepdims=True))
    A = A / A.sum(-1, keepdims=True)
    heads_out = A @ v_
    o_in = heads_out.transpose(1, 0, 2).reshape(T, D)
    a = o_in @ p["o"].T
    h = x + a
    n2 = rms_forward(h, p["rms2"], eps)
    g, u = n2 @ p["gate"].T, n2 @ p["up"].T
    silu = g / (1 + np.exp(-g))
    m_in = silu * u
    m = m_in @ p["down"].T
    # backward: second residual, MLP
    R_h, R_m = sum_rule(h, m, R)
    R_min = linear_rule(m_in, p["down"], R_m)
    R_n2 = linear_rule(n2, p["gate"], R_min / 2) + linear_rule(n2, p["up"], R_min / 2)
    R_h = R_h + rms_rule(R_n2)
    # first residual, attention
    R_x, R_a = sum_rule(x, a, R_h)
    R_oin = linear_rule(o_in, p["o"], R_a)
    R_heads = R_oin.reshape(T, heads, hd).transpose(1, 0, 2)
    R_A, R_v = matmul_rule(A, v_, R_heads)
    finite = np.where(np.isinf(scores), 0.0, scores)  # masked scores get no relevance
    R_scores = finite * (R_A - A * R_A.sum(-1, keepdims=True))
    R_qs, R_kT = matmul_rule(qs, np.swapaxes(kr_, -1, -2), R_scores)
    R_k = np.swapaxes(R_kT, -1, -2).reshape(kv_heads, group, T, hd).sum(1)
    R_v = R_v.reshape(kv_heads, group, T, hd).sum(1)
    R_q = rotary_rule(q, cos, sin, R_qs)
    R_k = rotary_rule(k, cos, sin, R_k)
    R_n1 = sum(linear_rule(n1, p[name], r.transpose(1, 0, 2).reshape(T, -1))
               for name, r in (("q", R_q), ("k", R_k), ("v", R_v)))
    return R_x + rms_rule(R_n1)


def test_llama_block_matches_numpy_oracle():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    with torch.no_grad():  # norm weights away from 1
        for layer_norm in (model.model.layers[0].input_layernorm, model.model.layers[0].post_attention_layernorm):
            layer_norm.weight.add_(0.3 * torch.randn(32, dtype=torch.float64))
    lrp = lrpx.convert(model)
    block = lrp.model.layers[0]
    T = 6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, T, 32, generator=g, dtype=torch.float64, requires_grad=True)
    R = torch.randn(1, T, 32, generator=g, dtype=torch.float64)
    positions = torch.arange(T)[None]
    cos, sin = lrp.model.rotary_emb(x, positions)
    y = block(x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    (relevance,) = torch.autograd.grad(y, x, R)

    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    p = {"rms1": layer.input_layernorm.weight, "rms2": layer.post_attention_layernorm.weight,
         "q": attn.q_proj.weight, "k": attn.k_proj.weight, "v": attn.v_proj.weight, "o": attn.o_proj.weight,
         "gate": mlp.gate_proj.weight, "up": mlp.up_proj.weight, "down": mlp.down_proj.weight}
    p = {k: v.detach().numpy() for k, v in p.items()}
    expected = block_oracle(x.detach()[0].numpy(), p, cos[0].numpy(), sin[0].numpy(), R[0].numpy(), 4, 2,
                            config.rms_norm_eps)
    with torch.no_grad():  # sdpa written out: the same up to rounding
        reference = model.model.layers[0](x, position_ids=positions, position_embeddings=(cos, sin))
    torch.testing.assert_close(y.detach(), reference, rtol=1e-12, atol=1e-12)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(relevance[0].numpy(), expected, rtol=0, atol=1e-13 * scale)  # measured 7e-15
    assert np.abs(expected).sum() > 0
