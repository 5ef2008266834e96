"""Slow, explicit float64 reference implementations of the LRP rules.

Nothing here imports ``lrpx``. Every layer is turned into an explicit dense
matrix, ``z = A x + b`` for one sample (``x`` flattened), and every rule of
``docs/rules.md`` is written on the contribution matrix ``C[k, j]`` (what input
``j`` contributes to output ``k``):

    R_in[j] = sum_k C[k, j] * R[k] / stab(den[k], e)

Conv matrices are built with explicit Python loops over output position,
kernel offset and channel (no convolution routine is used), padding matrices
likewise.  For ``padding_mode != 'zeros'`` the layer is ``conv(pad(x))`` and
the padded input is the layer input: the rule runs on ``P x`` with the conv
matrix of the unpadded convolution, and the relevance of the padded input is
summed back onto the real pixels with ``P^T``.  For ``'zeros'`` padding the
padded positions are not inputs at all.

Pooling (for the ``Norm`` rule) is linear, so its matrix is read off by
pushing the identity basis through the torch pooling module.

Every builder can be checked with :func:`dense_forward` against the torch
module's own forward, which is how the tests guard the oracle itself.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

DTYPE = torch.float64


# ---------------------------------------------------------------- primitives


def stab(z: Tensor, e: float) -> Tensor:
    """``z + e * sign0(z)`` with ``sign0(z) = +1`` for ``z >= 0`` and ``-1`` else."""
    sign0 = torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
    return z + e * sign0


def spread(contrib: Tensor, den: Tensor, relevance: Tensor, e: float) -> Tensor:
    """``R_in[j] = sum_k contrib[k, j] * relevance[k] / stab(den[k], e)`` (one sample)."""
    share = relevance / stab(den, e)
    out = torch.zeros(contrib.shape[1], dtype=DTYPE)
    for k in range(contrib.shape[0]):  # explicit sum over outputs
        out += contrib[k] * share[k]
    return out


def pos(t: Tensor) -> Tensor:
    return t.clamp(min=0)


def neg(t: Tensor) -> Tensor:
    return t.clamp(max=0)


# ---------------------------------------------------------------- dense layers


@dataclass
class Dense:
    """One layer as ``z = weight @ (pad @ x) + bias`` for a single flattened sample.

    ``mask`` is the 0/1 connectivity of ``weight`` (1 where an input lies in the
    receptive field of an output, whatever the weight's value): the ``Flat`` rule.
    """

    pad: Tensor  # (n_layer_in, n_in), 0/1; identity unless padding_mode != 'zeros'
    weight: Tensor  # (n_out, n_layer_in)
    mask: Tensor  # (n_out, n_layer_in)
    bias: Tensor  # (n_out,)
    in_shape: tuple[int, ...]  # per-sample input shape
    out_shape: tuple[int, ...]  # per-sample output shape

    def lift(self, value: Tensor) -> Tensor:
        """Map one sample's input-shaped ``value`` through the padding (flattened)."""
        return self.pad @ value.to(DTYPE).reshape(-1)


def dense_linear(module: nn.Linear) -> Dense:
    weight = module.weight.detach().to(DTYPE).clone()
    n_out, n_in = weight.shape
    bias = (
        torch.zeros(n_out, dtype=DTYPE)
        if module.bias is None
        else module.bias.detach().to(DTYPE).clone()
    )
    return Dense(
        pad=torch.eye(n_in, dtype=DTYPE),
        weight=weight,
        mask=torch.ones(n_out, n_in, dtype=DTYPE),
        bias=bias,
        in_shape=(n_in,),
        out_shape=(n_out,),
    )


def dense_affine(scale: Tensor, shift: Tensor, in_shape: tuple[int, ...]) -> Dense:
    """Per-channel affine map ``y[c, ...] = scale[c] * x[c, ...] + shift[c]``."""
    channels = in_shape[0]
    per_pos = math.prod(in_shape[1:])
    s = scale.detach().to(DTYPE).reshape(channels, 1).expand(channels, per_pos)
    t = shift.detach().to(DTYPE).reshape(channels, 1).expand(channels, per_pos)
    n = channels * per_pos
    return Dense(
        pad=torch.eye(n, dtype=DTYPE),
        weight=torch.diag(s.reshape(-1)),
        mask=torch.eye(n, dtype=DTYPE),
        bias=t.reshape(-1).clone(),
        in_shape=tuple(in_shape),
        out_shape=tuple(in_shape),
    )


def dense_batchnorm(module: nn.modules.batchnorm._BatchNorm, in_shape) -> Dense:
    """Eval-mode BatchNorm as the affine layer ``x * scale + shift``."""
    var = module.running_var.detach().to(DTYPE)
    mean = module.running_mean.detach().to(DTYPE)
    inv = 1.0 / torch.sqrt(var + module.eps)
    gamma = (
        module.weight.detach().to(DTYPE) if module.weight is not None else torch.ones_like(var)
    )
    beta = module.bias.detach().to(DTYPE) if module.bias is not None else torch.zeros_like(var)
    scale = gamma * inv
    shift = beta - mean * scale
    return dense_affine(scale, shift, tuple(in_shape))


def _conv_pads(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding of each spatial dimension, as torch defines it."""
    ks, dil = module.kernel_size, module.dilation
    if module.padding == "valid":
        return [(0, 0)] * len(ks)
    if module.padding == "same":
        out = []
        for k, d in zip(ks, dil):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def _source_index(i: int, size: int, mode: str) -> int | None:
    """Which real position feeds position ``i`` (may be outside ``[0, size)``)."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":
        j = -i if i < 0 else 2 * (size - 1) - i
        assert 0 <= j < size, "reflect padding must be smaller than the input"
        return j
    if mode == "replicate":
        return 0 if i < 0 else size - 1
    if mode == "circular":
        return i % size
    raise ValueError(mode)


def padding_matrix(channels: int, spatial, pads, mode: str) -> tuple[Tensor, tuple[int, ...]]:
    """0/1 matrix mapping the flattened input to the flattened padded input."""
    padded = tuple(s + l + r for s, (l, r) in zip(spatial, pads))
    n_in = channels * math.prod(spatial)
    n_pad = channels * math.prod(padded)
    mat = torch.zeros(n_pad, n_in, dtype=DTYPE)
    in_strides = _strides((channels, *spatial))
    pad_strides = _strides((channels, *padded))
    for c in range(channels):
        for q in itertools.product(*(range(p) for p in padded)):
            src = [_source_index(qi - l, s, mode) for qi, (l, _), s in zip(q, pads, spatial)]
            if any(v is None for v in src):
                continue
            row = c * pad_strides[0] + sum(a * b for a, b in zip(q, pad_strides[1:]))
            col = c * in_strides[0] + sum(a * b for a, b in zip(src, in_strides[1:]))
            mat[row, col] += 1.0
    return mat, padded


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= s
    return out[::-1]


def conv_matrices(weight: Tensor, spatial, pads, stride, dilation, groups):
    """Explicit loops: the matrix of a convolution (and its 0/1 connectivity).

    Input positions outside ``[0, size)`` (zero padding) are skipped: they are
    not inputs.  Returns ``(A, mask, out_spatial)``.
    """
    c_out, c_in_g = weight.shape[:2]
    ks = weight.shape[2:]
    c_in = c_in_g * groups
    c_out_g = c_out // groups
    out_sp = tuple(
        (s + l + r - d * (k - 1) - 1) // st + 1
        for s, (l, r), k, st, d in zip(spatial, pads, ks, stride, dilation)
    )
    n_in = c_in * math.prod(spatial)
    n_out = c_out * math.prod(out_sp)
    a = torch.zeros(n_out, n_in, dtype=DTYPE)
    mask = torch.zeros(n_out, n_in, dtype=DTYPE)
    in_strides = _strides((c_in, *spatial))
    out_strides = _strides((c_out, *out_sp))
    w = weight.detach().to(DTYPE)
    for o in range(c_out):
        g = o // c_out_g
        for p in itertools.product(*(range(s) for s in out_sp)):
            row = o * out_strides[0] + sum(a_ * b_ for a_, b_ in zip(p, out_strides[1:]))
            for t in itertools.product(*(range(k) for k in ks)):
                src = [
                    pi * st - l + ti * d
                    for pi, st, (l, _), ti, d in zip(p, stride, pads, t, dilation)
                ]
                if any(not 0 <= v < s for v, s in zip(src, spatial)):
                    continue
                offset = sum(a_ * b_ for a_, b_ in zip(src, in_strides[1:]))
                for ci in range(c_in_g):
                    col = (g * c_in_g + ci) * in_strides[0] + offset
                    a[row, col] += w[(o, ci, *t)]
                    mask[row, col] = 1.0
    return a, mask, out_sp


def dense_conv(module: nn.modules.conv._ConvNd, in_shape) -> Dense:
    """Conv1d/2d/3d on one sample of shape ``in_shape = (C, *spatial)``."""
    channels, spatial = in_shape[0], tuple(in_shape[1:])
    pads = _conv_pads(module)
    mode = module.padding_mode
    if mode == "zeros":
        pad = torch.eye(channels * math.prod(spatial), dtype=DTYPE)
        layer_spatial, conv_pads = spatial, pads
    else:
        pad, layer_spatial = padding_matrix(channels, spatial, pads, mode)
        conv_pads = [(0, 0)] * len(spatial)
    a, mask, out_sp = conv_matrices(
        module.weight, layer_spatial, conv_pads, module.stride, module.dilation, module.groups
    )
    c_out = module.out_channels
    per_pos = math.prod(out_sp)
    if module.bias is None:
        bias = torch.zeros(c_out * per_pos, dtype=DTYPE)
    else:
        bias = module.bias.detach().to(DTYPE).repeat_interleave(per_pos)
    return Dense(pad, a, mask, bias, (channels, *spatial), (c_out, *out_sp))


def dense(module: nn.Module, in_shape) -> Dense:
    if isinstance(module, nn.Linear):
        return dense_linear(module)
    if isinstance(module, nn.modules.conv._ConvNd):
        return dense_conv(module, in_shape)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return dense_batchnorm(module, in_shape)
    raise TypeError(type(module))


def dense_forward(layer: Dense, x: Tensor) -> Tensor:
    """``z = A P x + b`` for a batch, reshaped like the layer's output."""
    flat = x.to(DTYPE).reshape(x.shape[0], -1)
    z = (layer.weight @ (layer.pad @ flat.T)).T + layer.bias
    return z.reshape(x.shape[0], *layer.out_shape)


def pooling_matrix(module: nn.Module, in_shape) -> Tensor:
    """Matrix ``M`` with ``pool(x) = M x`` (one flattened sample), by the identity basis."""
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=DTYPE).reshape(n, *in_shape)
    with torch.no_grad():
        out = module(basis)
    return out.reshape(n, -1).T.contiguous()


# ---------------------------------------------------------------- rules (matrix form)


def _per_sample(layer: Dense, x: Tensor, relevance: Tensor, rule_fn) -> Tensor:
    """Apply ``rule_fn(xl, r, n) -> R_layer_in`` per sample; sum back through the padding."""
    batch = x.shape[0]
    xs = x.to(DTYPE).reshape(batch, -1)
    rs = relevance.to(DTYPE).reshape(batch, -1)
    out = []
    for n in range(batch):
        r_layer_in = rule_fn(layer.pad @ xs[n], rs[n], n)
        out.append(layer.pad.T @ r_layer_in)
    return torch.stack(out).reshape(x.shape)


def epsilon(layer: Dense, x: Tensor, relevance: Tensor, e: float = 1e-6) -> Tensor:
    """LRP-epsilon: ``C = a_j w_jk``, ``den = z_k``."""
    a = layer.weight

    def rule(xl, r, _):
        contrib = a * xl[None, :]
        return spread(contrib, contrib.sum(1) + layer.bias, r, e)

    return _per_sample(layer, x, relevance, rule)


def zplus(layer: Dense, x: Tensor, relevance: Tensor, e: float = 1e-6) -> Tensor:
    """z+: the positive contributions ``x+ w+`` and ``x- w-``; ``b+`` in the denominator."""
    ap, an = pos(layer.weight), neg(layer.weight)

    def rule(xl, r, _):
        contrib = ap * pos(xl)[None, :] + an * neg(xl)[None, :]
        return spread(contrib, contrib.sum(1) + pos(layer.bias), r, e)

    return _per_sample(layer, x, relevance, rule)


def alpha_beta(
    layer: Dense, x: Tensor, relevance: Tensor, alpha: float, beta: float, e: float = 1e-6
) -> Tensor:
    """``alpha * (positive part) - beta * (negative part)``, each normalised on its own."""
    ap, an = pos(layer.weight), neg(layer.weight)

    def rule(xl, r, _):
        xp, xn = pos(xl)[None, :], neg(xl)[None, :]
        c_pos = ap * xp + an * xn
        c_neg = an * xp + ap * xn
        r_pos = spread(c_pos, c_pos.sum(1) + pos(layer.bias), r, e)
        r_neg = spread(c_neg, c_neg.sum(1) + neg(layer.bias), r, e)
        return alpha * r_pos - beta * r_neg

    return _per_sample(layer, x, relevance, rule)


def gamma(layer: Dense, x: Tensor, relevance: Tensor, g: float, e: float = 1e-6) -> Tensor:
    """Generalised gamma (signed inputs), branch chosen by the sign of the plain output."""
    a, b = layer.weight, layer.bias
    p_w = a + g * pos(a)
    n_w = a + g * neg(a)

    def rule(xl, r, _):
        xp, xn = pos(xl)[None, :], neg(xl)[None, :]
        z = (a * xl[None, :]).sum(1) + b
        c_pos = p_w * xp + n_w * xn
        c_neg = n_w * xp + p_w * xn
        z_pos = c_pos.sum(1) + (b + g * pos(b))
        z_neg = c_neg.sum(1) + (b + g * neg(b))
        r_pos = torch.where(z > 0, r, torch.zeros_like(r))
        r_neg = torch.where(z < 0, r, torch.zeros_like(r))
        return spread(c_pos, z_pos, r_pos, e) + spread(c_neg, z_neg, r_neg, e)

    return _per_sample(layer, x, relevance, rule)


def zbox(layer: Dense, x: Tensor, relevance: Tensor, low, high, e: float = 1e-6) -> Tensor:
    """zB: ``C = x w - low w+ - high w-``; the biases cancel (``b - b+ - b- = 0``)."""
    a, b = layer.weight, layer.bias
    ap, an = pos(a), neg(a)

    low_full = torch.as_tensor(low, dtype=DTYPE).expand(x.shape)
    high_full = torch.as_tensor(high, dtype=DTYPE).expand(x.shape)

    def rule(xl, r, n):
        lo, hi = layer.lift(low_full[n]), layer.lift(high_full[n])
        contrib = a * xl[None, :] - ap * lo[None, :] - an * hi[None, :]
        den = contrib.sum(1) + (b - pos(b) - neg(b))
        return spread(contrib, den, r, e)

    return _per_sample(layer, x, relevance, rule)


def flat(layer: Dense, x: Tensor, relevance: Tensor, e: float = 1e-6) -> Tensor:
    """Every (real) input in the receptive field counts 1; no bias."""

    def rule(xl, r, _):
        return spread(layer.mask, layer.mask.sum(1), r, e)

    return _per_sample(layer, x, relevance, rule)


def wsquare(layer: Dense, x: Tensor, relevance: Tensor, e: float = 1e-6) -> Tensor:
    """w^2: ``C = w_jk^2``, ``den = sum_j w_jk^2 + b_k^2``."""
    sq = layer.weight**2

    def rule(xl, r, _):
        return spread(sq, sq.sum(1) + layer.bias**2, r, e)

    return _per_sample(layer, x, relevance, rule)


def norm(matrix: Tensor, x: Tensor, relevance: Tensor, e: float = 1e-6) -> Tensor:
    """Norm (z-rule with the pooling's own weights): ``C = M_kj x_j``, ``den = (M x)_k``."""
    batch = x.shape[0]
    xs = x.to(DTYPE).reshape(batch, -1)
    rs = relevance.to(DTYPE).reshape(batch, -1)
    out = []
    for n in range(batch):
        contrib = matrix * xs[n][None, :]
        out.append(spread(contrib, contrib.sum(1), rs[n], e))
    return torch.stack(out).reshape(x.shape)


# ---------------------------------------------------------------- whole networks


def explain_sequential(model: nn.Sequential, x: Tensor, relevance_out: Tensor, rules) -> Tensor:
    """Layer-by-layer oracle LRP through a flat ``nn.Sequential``.

    ``rules[i]`` is a callable ``(dense_layer, x, R) -> R_in`` for each weighted
    layer ``i`` (index into ``model``).  ReLU passes relevance, MaxPool routes it
    to its winner (its plain gradient), AvgPool/AdaptiveAvgPool use :func:`norm`
    with ``norm_epsilon``, Flatten reshapes.
    """
    norm_epsilon = rules.get("norm_epsilon", 1e-6)
    inputs = []
    h = x.to(DTYPE)
    with torch.no_grad():
        for layer in model:
            inputs.append(h)
            h = layer(h)
    r = relevance_out.to(DTYPE)
    for i in reversed(range(len(model))):
        layer, h = model[i], inputs[i]
        if isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            r = rules[i](dense(layer, tuple(h.shape[1:])), h, r)
        elif isinstance(layer, (nn.ReLU, nn.Identity, nn.Dropout)):
            pass
        elif isinstance(layer, nn.Flatten):
            r = r.reshape(h.shape)
        elif isinstance(layer, (nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)):
            r = norm(pooling_matrix(layer, tuple(h.shape[1:])), h, r, norm_epsilon)
        elif isinstance(layer, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)):
            hh = h.detach().requires_grad_()
            (r,) = torch.autograd.grad(layer(hh), hh, grad_outputs=r)
        else:
            raise TypeError(type(layer))
    return r
