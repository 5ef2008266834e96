"""Rules for weighted layers (Linear, Conv, BatchNorm as a per-channel affine layer).

Every formula is written with the layer's forward ``f(x; W, b)`` and its input
vector-Jacobian product ``g(s; W)``; ``docs/rules.md`` gives the notation. No autograd graph
is built here and no weight gradient is computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import (Layer, Rule, batched, divide, divide_after_relu, is_nonnegative, negative, nonnegative_number,
                   positive, relu_mask_)

__all__ = ["Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare"]


def _split(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.clamp(min=0), x.clamp(max=0)


def _twice(x: Tensor) -> torch.Size:
    return torch.Size((2 * x.shape[0],) + tuple(x.shape[1:]))


def _bias_like(layer: Layer, bias: Tensor, z: Tensor) -> Tensor:
    """The bias shaped to broadcast against an output ``z`` of the layer."""
    shape = [1] * z.dim()
    shape[layer.channel_axis if layer.channel_axis >= 0 else z.dim() + layer.channel_axis] = -1
    return bias.view(shape)


class Epsilon(Rule):
    r"""LRP-:math:`\epsilon` (Bach et al. 2015).

    .. math:: R_j = x_j \sum_k \frac{w_{jk}}{z_k + \epsilon\,\mathrm{sign}_0(z_k)} R_k,
        \qquad z = Wx + b

    Reuses the saved forward output, so it costs one input vector-Jacobian product.

    Parameters
    ----------
    epsilon
        The stabilizer. ``Epsilon(0)`` is LRP-0 (a zero denominator then divides by zero).
    relative
        If true, the stabilizer of each sample is ``epsilon * RMS(z)`` of that sample (the
        middle-layer choice of the LRP tutorial, Montavon et al. 2019).
    """

    def __init__(self, epsilon: float = 1e-6, *, relative: bool = False) -> None:
        self.epsilon = nonnegative_number("epsilon", epsilon)
        self.relative = bool(relative)

    def _fields(self) -> dict[str, object]:
        fields = super()._fields()
        if not self.relative:
            del fields["relative"]
        return fields

    @property
    def fusable(self) -> bool:  # type: ignore[override]
        return not self.relative  # the relative stabilizer reads the RMS of all of z

    @property
    def row_local(self) -> bool:  # type: ignore[override]
        return not self.relative

    def _stabilizer(self, z: Tensor) -> float | Tensor:
        if not self.relative:
            return self.epsilon
        rms = z.detach().flatten(1).pow(2).mean(1).sqrt()
        return self.epsilon * rms.view((-1,) + (1,) * (z.dim() - 1))

    def relevance(self, layer, relevance, input, weight, bias, output):
        s = divide(relevance, output, self._stabilizer(output))
        return layer.vjp(s, weight, input).mul_(input)

    def relevance_after_relu(self, layer, relevance, input, weight, bias, output):
        s = divide_after_relu(relevance, output, self.epsilon)
        return layer.vjp(s, weight, input).mul_(input)


class AlphaBeta(Rule):
    r"""LRP-:math:`\alpha\beta` (Bach et al. 2015), for signed inputs.

    .. math:: R_j = \alpha\,[x^+_j g(s^+; W^+) + x^-_j g(s^+; W^-)]
                 - \beta\,[x^+_j g(s^-; W^-) + x^-_j g(s^-; W^+)]

    with :math:`s^+ = R / \mathrm{stab}(z^+)`, :math:`z^+ = W^+x^+ + b^+ + W^-x^-` and
    :math:`s^- = R / \mathrm{stab}(z^-)`, :math:`z^- = W^-x^+ + b^- + W^+x^-`. Requires
    :math:`\alpha - \beta = 1`, both :math:`\ge 0`. ``AlphaBeta(1, 0)`` is z+.

    For :math:`x \ge 0` (:math:`x^- = 0`) each branch is one forward and one VJP:
    :math:`R = x\,[\alpha\, g(s^+; W^+) - \beta\, g(s^-; W^-)]`.
    """

    saves = ("input", "weight", "bias")  # its denominators are forwards of their own
    fusable = True
    row_local = True

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, epsilon: float = 1e-6) -> None:
        alpha, beta = nonnegative_number("alpha", alpha), nonnegative_number("beta", beta)
        if abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(
                f"AlphaBeta needs alpha - beta == 1 to conserve relevance, got alpha={alpha}, "
                f"beta={beta}; e.g. AlphaBeta(2, 1) or AlphaBeta(1, 0)"
            )
        self.alpha, self.beta = alpha, beta
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        if is_nonnegative(input, layer):
            return self._nonnegative(layer, relevance, input, weight, bias)
        return self._signed(layer, relevance, input, weight, bias)

    def _nonnegative(self, layer, relevance, x, weight, bias):
        """``x [alpha g(s+; W+) - beta g(s-; W-)]``. Both branches are computed directly (``W- x``
        as ``z - b - W+ x`` would cancel, and an empty branch would then amplify rounding noise
        by ``R / epsilon``)."""
        out = self._positive_input_branch(layer, relevance, x, positive(weight), positive(bias), self.alpha)
        if self.beta == 0:
            return out.mul_(x)
        negative_branch = self._positive_input_branch(layer, relevance, x, negative(weight), negative(bias), self.beta)
        return out.sub_(negative_branch).mul_(x)

    def _positive_input_branch(self, layer, relevance, x, w, b, factor):
        """``g(factor * R / stab(w x + b); w)``, one output-sized temporary at a time."""
        z_branch = layer.forward(x, w, b)
        s = divide(relevance, z_branch, self.epsilon, scale=factor)
        del z_branch
        return layer.vjp(s, w, x)

    def _signed(self, layer, relevance, x, weight, bias):
        x_pos, x_neg = _split(x)
        w_pos, w_neg = positive(weight), negative(weight)
        # alpha [x+ g(s+; W+) + x- g(s+; W-)], z+ = W+ x+ + W- x- + b+
        out = self._signed_branch(layer, relevance, x_pos, x_neg, w_pos, w_neg, positive(bias), self.alpha)
        if self.beta == 0:
            return out
        # - beta [x+ g(s-; W-) + x- g(s-; W+)], z- = W- x+ + W+ x- + b-
        return out.sub_(self._signed_branch(layer, relevance, x_pos, x_neg, w_neg, w_pos, negative(bias), self.beta))

    def _signed_branch(self, layer, relevance, x_pos, x_neg, w1, w2, b, factor):
        """``factor [x+ g(s; w1) + x- g(s; w2)]`` with ``s = R / stab(w1 x+ + w2 x- + b)``."""
        z_branch = layer.forward(x_pos, w1, b).add_(layer.forward(x_neg, w2, None))
        s = divide(relevance, z_branch, self.epsilon, scale=factor)
        del z_branch
        return layer.vjp(s, w1, x_pos).mul_(x_pos).add_(layer.vjp(s, w2, x_neg).mul_(x_neg))


class ZPlus(AlphaBeta):
    r"""LRP-z+ (Montavon et al. 2017): only positive contributions, bias on the first term.

    .. math:: R_j = x^+_j g(s; W^+) + x^-_j g(s; W^-), \qquad
        s = R / \mathrm{stab}(W^+x^+ + b^+ + W^-x^-)

    Equal to ``AlphaBeta(1, 0)``; for ``x >= 0`` one extra forward ``W^+ x + b^+``.
    """

    def __init__(self, epsilon: float = 1e-6) -> None:
        super().__init__(1.0, 0.0, epsilon)

    def _fields(self) -> dict[str, object]:
        return {"epsilon": self.epsilon}


class Gamma(Rule):
    r"""Generalized LRP-:math:`\gamma` (Montavon et al. 2019; signed inputs, Andéol et al. 2021).

    With :math:`P = W + \gamma W^+` and :math:`N = W + \gamma W^-`,

    .. math::
        z_p = P x^+ + N x^- + b + \gamma b^+, \quad z_n = N x^+ + P x^- + b + \gamma b^-,\\
        s_p = [z > 0]\, R / \mathrm{stab}(z_p), \quad s_n = [z < 0]\, R / \mathrm{stab}(z_n),\\
        R_j = x^+_j\,[g(s_p; P) + g(s_n; N)] + x^-_j\,[g(s_p; N) + g(s_n; P)].

    How it is computed, with one extra forward :math:`v = W^+ x^+ + W^- x^- + b^+`:

    * :math:`z_p = z + \gamma v` and :math:`z_n = z + \gamma (z - v)` (as :math:`b - b^- = b^+`);
      only the one matching the sign of :math:`z` is used, so one denominator
      :math:`z_\gamma = z + \gamma\,(\mathrm{sign}(z)\, v + \min(z, 0))` serves both and
      :math:`s_\Delta = s_p - s_n = \mathrm{sign}(z)\, R / \mathrm{stab}(z_\gamma)`;
    * with :math:`g^+ = g(s_\Delta; W^+)`, :math:`s_p + (1 + \gamma) s_n =
      s_\Delta ((1 + \gamma/2)\,\mathrm{sign}(z) - \gamma/2)` and
      :math:`(1 + \gamma) s_p + s_n = s_\Delta ((1 + \gamma/2)\,\mathrm{sign}(z) + \gamma/2)`:

    .. math::
        x \ge 0:\quad R = x\,[g(s_p + (1 + \gamma) s_n; W) + \gamma g^+],\\
        \text{signed}:\quad R = x^+ g(s_p + (1 + \gamma) s_n; W) + x^- g((1 + \gamma) s_p + s_n; W)
            + \gamma\,|x|\, g^+.

    After a fused ReLU on :math:`x \ge 0`, :math:`s_n = 0` and the classic form remains:
    :math:`R = x\, g(s_p; P)`, one forward and one VJP with :math:`P`.
    """

    fusable = True
    row_local = True

    def __init__(self, gamma: float = 0.25, epsilon: float = 1e-6) -> None:
        self.gamma = nonnegative_number("gamma", gamma)
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        if is_nonnegative(input, layer):
            return self._nonnegative(layer, relevance, input, weight, bias, output)
        return self._signed(layer, relevance, input, weight, bias, output)

    def relevance_after_relu(self, layer, relevance, input, weight, bias, output):
        if not is_nonnegative(input, layer):
            # relu(z) has sign 0 where z <= 0, and the rule scales every term by sign(z)
            return self._signed(layer, relevance, input, weight, bias, output)
        # x >= 0 and only units with z > 0 pass relevance: s_n = 0 and R = x g(s_p; P) with
        # z_p >= z > 0 there (the clamp only undoes rounding)
        g = self.gamma
        p = torch.add(weight, positive(weight), alpha=g)
        z_p = layer.forward(input, p, None if bias is None else torch.add(bias, positive(bias), alpha=g))
        s_p = (z_p.clamp(min=0) if batched(z_p) else z_p.clamp_(min=0)).add_(self.epsilon)
        s_p = relu_mask_(relevance / s_p if batched(relevance, s_p) else torch.div(relevance, s_p, out=s_p), output)
        return layer.vjp(s_p, p, input).mul_(input)

    def _nonnegative(self, layer, relevance, x, weight, bias, z):
        g, w_pos = self.gamma, positive(weight)
        s_delta, sign = self._quotient(relevance, z, layer.forward(x, w_pos, positive(bias)))
        g_plus = layer.vjp(s_delta, w_pos, x)
        s_mix = _mix(s_delta, sign, -g / 2, 1 + g / 2)  # s_p + (1 + g) s_n
        del s_delta, sign
        return layer.vjp(s_mix, weight, x).add_(g_plus, alpha=g).mul_(x)

    def _signed(self, layer, relevance, x, weight, bias, z):
        g, w_pos = self.gamma, positive(weight)
        v = layer.forward(x.abs(), w_pos, positive(bias)).add_(layer.forward(x.clamp(max=0), weight, None))
        s_delta, sign = self._quotient(relevance, z, v)
        del v
        g_plus = layer.vjp(s_delta, w_pos, x)
        # [s_p + (1 + g) s_n; (1 + g) s_p + s_n], both halves through one VJP
        if batched(s_delta, sign):
            s_mixes = torch.cat([_mix(s_delta, sign, -g / 2, 1 + g / 2), _mix(s_delta, sign, g / 2, 1 + g / 2)])
        else:
            s_mixes = torch.cat([torch.mul(s_delta, -g / 2), torch.mul(s_delta, g / 2)])
            s_mixes.view((2,) + s_delta.shape).addcmul_(sign, s_delta, value=1 + g / 2)  # each half, broadcast
        del s_delta, sign
        g_pos_input, g_neg_input = layer.vjp(s_mixes, weight, _twice(x)).chunk(2)
        return x.clamp(min=0) * g_pos_input + x.clamp(max=0) * g_neg_input + g * x.abs() * g_plus

    def _quotient(self, relevance: Tensor, z: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(s_delta, sign(z))``: ``s_delta = s_p - s_n = sign(z) R / stab(z_gamma)``; frees ``v``."""
        sign = torch.sign(z)
        if batched(z, v):  # the samples of a torch.func transform: out of place
            z_gamma = torch.add(z, torch.addcmul(z.clamp(max=0), sign, v), alpha=self.gamma)
        else:
            z_gamma = z.clamp(max=0).addcmul_(sign, v)
            z_gamma = torch.add(z, z_gamma, alpha=self.gamma, out=z_gamma)
        del v
        s_delta = divide(relevance, z_gamma, self.epsilon).mul_(sign)
        if self.epsilon == 0:  # 0/0 where z_gamma = z = 0 (every dead unit after a fused ReLU)
            s_delta.masked_fill_(sign == 0, 0.0)
        return s_delta, sign


def _mix(s: Tensor, sign: Tensor, offset: float, slope: float) -> Tensor:
    """``s * (offset + slope * sign)``, in the buffer of the first product (a new tensor for
    the rows of a batched backward pass, where in-place ``addcmul_`` has no batched kernel)."""
    if batched(s, sign):
        return torch.addcmul(s * offset, sign, s, value=slope)
    return torch.mul(s, offset).addcmul_(sign, s, value=slope)


class ZBox(Rule):
    r"""LRP-:math:`z^\mathcal{B}` for a first layer on bounded input (Montavon et al. 2017).

    .. math::
        z_B = (Wx + b) - (W^+ l + b^+) - (W^- h + b^-), \quad s = R / \mathrm{stab}(z_B),\\
        R_j = x_j g(s; W) - l_j g(s; W^+) - h_j g(s; W^-)

    Parameters
    ----------
    low, high
        Bounds of the input, floats or tensors broadcastable to it (per channel, e.g. shape
        ``(1, C, 1, 1)`` for a normalised image). ``low <= high`` everywhere.
    """

    fusable = True

    def __init__(self, low: float | Tensor, high: float | Tensor, epsilon: float = 1e-6) -> None:
        low_t, high_t = torch.as_tensor(low), torch.as_tensor(high)
        if not (torch.isfinite(low_t).all() and torch.isfinite(high_t).all()):
            raise ValueError("ZBox bounds must be finite")
        try:
            bad = bool((low_t > high_t).any())
        except RuntimeError as err:
            raise ValueError(f"ZBox low {tuple(low_t.shape)} and high {tuple(high_t.shape)} do not broadcast") from err
        if bad:
            raise ValueError("ZBox needs low <= high everywhere; got some low > high (swapped bounds?)")
        self.low = low if isinstance(low, Tensor) else float(low)
        self.high = high if isinstance(high, Tensor) else float(high)
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def padded(self, pad: list[int], mode: str) -> "ZBox":
        """This rule for the padded input of a layer that pads before it applies (a Conv with
        padding_mode reflect/replicate/circular): per-element bounds are padded alike."""
        def grow(b):
            if not isinstance(b, Tensor) or all(n == 1 for n in b.shape[2:]):
                return b
            return F.pad(b, pad, mode=mode if mode != "zeros" else "constant")
        return ZBox(grow(self.low), grow(self.high), self.epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        return self._relevance(layer, relevance, input, weight, bias, output, after_relu=False)

    def relevance_after_relu(self, layer, relevance, input, weight, bias, output):
        return self._relevance(layer, relevance, input, weight, bias, output, after_relu=True)

    def _relevance(self, layer, relevance, input, weight, bias, output, after_relu):
        x = input
        low, high = _bound(self.low, x), _bound(self.high, x)
        wp = positive(weight)
        # the biases cancel: b - b+ - b- = 0; the bound terms are one sample (unless per sample)
        offset = layer.forward(low, wp, None).add_(layer.forward(high, weight - wp, None))
        if bias is not None:
            offset.add_(_bias_like(layer, bias, offset))
        z_b = output - offset
        s = divide(relevance, z_b, self.epsilon)
        del z_b
        if after_relu:  # output = relu(z): dead units pass nothing
            s = relu_mask_(s, output)
        # x g(s; W) - l g(s; W+) - h g(s; W-) with g(s; W-) = g(s; W) - g(s; W+)
        return (x - high) * layer.vjp(s, weight, x) + (high - low) * layer.vjp(s, wp, x)


def _bound(value: float | Tensor, x: Tensor) -> Tensor:
    """A bound as a tensor shaped like one sample of ``x`` (or like ``x`` if per sample)."""
    if isinstance(value, Tensor):  # a bound kept on the host travels to a GPU without a synchronisation
        t = value.to(device=x.device, dtype=x.dtype, non_blocking=x.device.type == "cuda")
    else:
        t = torch.full((), value, dtype=x.dtype, device=x.device)
    if t.dim() > x.dim():
        raise ValueError(f"ZBox bound of shape {tuple(t.shape)} does not broadcast to input {tuple(x.shape)}")
    batch = x.shape[0] if t.dim() == x.dim() and t.shape[0] == x.shape[0] else 1
    try:
        return torch.broadcast_to(t, (batch,) + tuple(x.shape[1:]))
    except RuntimeError as err:
        raise ValueError(f"ZBox bound of shape {tuple(t.shape)} does not broadcast to input {tuple(x.shape)}") from err


class Flat(Rule):
    r"""Flat rule (Lapuschkin et al. 2019): every input of a receptive field counts the same.

    .. math:: z_k = \sum_j [j \in k], \qquad R_j = g(R / \mathrm{stab}(z); \mathbf{1})

    where ``z`` is a forward of ones with unit weights and no bias (zero padding counts 0).
    """

    fusable = True

    saves = ("input", "weight")

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        ones_w = torch.ones_like(weight)
        z = layer.forward(torch.ones_like(input[:1]), ones_w, None)
        return layer.vjp(divide(relevance, z, self.epsilon), ones_w, input)


class WSquare(Rule):
    r"""LRP-:math:`w^2` (Montavon et al. 2017): relevance in proportion to squared weights.

    .. math:: z = f(\mathbf{1}; W^2, b^2), \qquad R_j = g(R / \mathrm{stab}(z); W^2)
    """

    fusable = True

    saves = ("input", "weight", "bias")

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = nonnegative_number("epsilon", epsilon)

    def relevance(self, layer, relevance, input, weight, bias, output):
        w2 = weight * weight
        z = layer.forward(torch.ones_like(input[:1]), w2, None if bias is None else bias * bias)
        return layer.vjp(divide(relevance, z, self.epsilon), w2, input)
