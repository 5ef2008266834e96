r"""AttnLRP twins of attention: ``nn.MultiheadAttention`` and ``nn.Softmax``.

The rules are those of Achtibat et al., "AttnLRP: Attention-Aware Layer-wise Relevance
Propagation for Transformers", ICML 2024:

* softmax, :math:`s = \mathrm{softmax}(x)` along ``dim`` (deep Taylor at :math:`x`, bias
  absorbed, Prop. 3.1): :math:`R_x = x \odot (R - s \sum_{dim} R)`; masked inputs
  (:math:`x = -\infty`) get relevance 0;
* a product of two activations :math:`O = AB` (the epsilon rule on each factor and a uniform
  split, Prop. 3.3): :math:`S = R / \mathrm{stab}(2O, \epsilon)`,
  :math:`R_A = A \odot (S B^\top)`, :math:`R_B = B \odot (A^\top S)`;
* the q/k/v input projections and the output projection: the twin's (weighted-layer) rule;
* the constant scaling :math:`q / \sqrt{d}` and an additive attention mask: identity.

``nn.MultiheadAttention`` holds its output projection as a child
``torch.nn.modules.linear.NonDynamicallyQuantizableLinear`` that its own forward uses by
weight; the twin does the same, so the registry should map that class to ``None`` (kept as
it is) and ``convert`` does not report it as unsupported::

    twins = {nn.MultiheadAttention: LRPMultiheadAttention,
             torch.nn.modules.linear.NonDynamicallyQuantizableLinear: None}
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import ElementwiseOps, LinearOps, MatmulOps, SoftmaxOps
from ..rules.attention import Taylor, Uniform
from ..rules.base import Rule
from ..rules.elementwise import Pass
from .base import Twin

__all__ = ["lrp_softmax", "lrp_matmul", "LRPSoftmax", "LRPMultiheadAttention", "ATTENTION_TWINS"]

_LINEAR = LinearOps()
_MATMUL = MatmulOps()
_PASS = Pass()
_TAYLOR = Taylor()
#: the stabilizer of the matmul rule by default
DEFAULT_EPSILON = 1e-6


def lrp_softmax(input: Tensor, dim: int = -1, rule: Rule = _TAYLOR) -> Tensor:
    r"""``torch.softmax(input, dim)`` whose backward applies ``rule`` (by default the AttnLRP
    softmax rule :class:`lrpx.rules.Taylor`).

    .. math:: R_x = x \odot \Big(R - s \sum_{dim} R\Big), \qquad s = \mathrm{softmax}(x)

    (Achtibat et al. 2024, Prop. 3.1: deep Taylor decomposition at :math:`x` with the bias
    absorbed, so :math:`\sum R_x = \sum x R - \sum x s \sum R` per slice; relevance is not
    conserved.) The rule has no denominator and hence no stabilizer. Inputs equal to
    :math:`-\infty` (masked positions) get relevance 0.
    """
    return lrp_apply(SoftmaxOps(dim), rule, input)


def lrp_matmul(a: Tensor, b: Tensor, epsilon: float = DEFAULT_EPSILON, rule: Rule | None = None) -> Tensor:
    r"""``torch.matmul(a, b)`` of two activations whose backward applies ``rule`` (by default
    the AttnLRP matmul rule, :class:`lrpx.rules.Uniform` with ``epsilon``).

    .. math:: S = \frac{R}{\mathrm{stab}(2\,AB, \epsilon)}, \qquad
        R_A = A \odot (S B^\top), \qquad R_B = B \odot (A^\top S)

    (Achtibat et al. 2024, Prop. 3.3: the epsilon rule on each factor, relevance split
    uniformly between the two), batched over (broadcast) leading dimensions;
    :math:`\sum R_A + \sum R_B = \sum R` up to the stabilizer.

    Parameters
    ----------
    a, b
        Operands with at least two dimensions each.
    epsilon
        The stabilizer of :math:`\mathrm{stab}(z, \epsilon) = z + \epsilon\,\mathrm{sign}_0(z)`.
    """
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"lrp_matmul needs operands with >= 2 dimensions, got {a.dim()} and {b.dim()}")
    return lrp_apply(_MATMUL, Uniform(epsilon) if rule is None else rule, (a, b))


class LRPSoftmax(Twin, nn.Softmax):
    """``nn.Softmax`` whose backward applies its rule: the AttnLRP softmax rule
    (:class:`lrpx.rules.Taylor`, see :func:`lrp_softmax`)."""

    lrp_kind = "softmax"

    def forward(self, input: Tensor) -> Tensor:
        dim = self.dim if self.dim is not None else F._get_softmax_dim("softmax", input.dim(), 5)
        return lrp_softmax(input, dim, self.rule)

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        return True


def _check_supported(module: nn.MultiheadAttention) -> None:
    name = type(module).__name__
    if module.bias_k is not None or module.bias_v is not None:
        raise NotImplementedError(f"{name}: add_bias_kv=True (bias_k/bias_v) is not supported by the LRP twin")
    if module.add_zero_attn:
        raise NotImplementedError(f"{name}: add_zero_attn=True is not supported by the LRP twin")


def _to_batch_first(tensors: tuple[Tensor, ...], batched: bool, batch_first: bool) -> tuple[Tensor, ...]:
    """Each tensor as ``(N, L, E)``; the same tensor passed twice stays one tensor."""
    done: dict[int, Tensor] = {}
    for t in tensors:
        if id(t) not in done:
            done[id(t)] = t.unsqueeze(0) if not batched else t if batch_first else t.transpose(0, 1)
    return tuple(done[id(t)] for t in tensors)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask (True: not allowed) as ``0 / -inf``; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask


def _scaled(q: Tensor) -> Tensor:
    """``q / sqrt(head_dim)``, relevance passed through unchanged (a constant factor)."""
    scale = math.sqrt(1.0 / float(q.shape[-1]))
    return lrp_apply(ElementwiseOps(partial(torch.mul, other=scale)), _PASS, q)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, matmul: Rule) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention of ``(N, H, L, D)`` heads; returns output and weights."""
    scores = lrp_matmul(_scaled(q), k.transpose(-2, -1), rule=matmul)
    if mask is not None:
        scores = scores + mask  # a constant: relevance passes to the scores unchanged
    weights = lrp_softmax(scores, -1)
    return lrp_matmul(weights, v, rule=matmul), weights


class LRPMultiheadAttention(Twin, nn.MultiheadAttention):
    r"""``nn.MultiheadAttention`` (eval) whose backward is AttnLRP (Achtibat et al. 2024).

    The forward is the math of ``F.multi_head_attention_forward`` written out: projections
    :math:`q = W_q x_q + b_q` (likewise k, v), per head
    :math:`O_h = \mathrm{softmax}(q_h k_h^\top / \sqrt{d} + M)\, v_h`, and
    :math:`y = W_o [O_1 \dots O_H] + b_o`. In backward the projections take the twin's rule
    (e.g. ``Epsilon``), the two products :func:`lrp_matmul` and the softmax
    :func:`lrp_softmax`, both with the rule's ``epsilon`` (1e-6 if it has none); the scaling
    by :math:`1/\sqrt{d}` and the mask :math:`M` pass relevance unchanged.

    Supports batch_first, unbatched input, self- and cross-attention, separate q/k/v
    weights (``kdim``/``vdim``), with or without biases, bool or float ``attn_mask`` (2D or
    3D) and ``key_padding_mask``, ``need_weights`` (the returned weights are the plain
    softmax) and ``is_causal``. ``add_bias_kv`` and ``add_zero_attn`` raise
    ``NotImplementedError``; active dropout (training mode) raises ``RuntimeError``.
    """

    lrp_kind = "weighted"

    @classmethod
    def from_module(cls, module: nn.MultiheadAttention, rule: Rule) -> "LRPMultiheadAttention":
        _check_supported(module)
        return super().from_module(module, rule)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        self._check_call(query, key, value)
        batched = query.dim() == 3
        query, key, value = _to_batch_first((query, key, value), batched, self.batch_first)
        q, k, v = (self._split_heads(t) for t in self._project(query, key, value))
        mask = self._mask(attn_mask, key_padding_mask, is_causal, need_weights, q, k)
        heads, weights = _attend(q, k, v, mask, Uniform(self.rule.epsilon))
        output = self._linear(heads.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        weights = weights.mean(1) if average_attn_weights else weights
        return output, weights if batched else weights.squeeze(0)

    def _check_call(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        _check_supported(self)
        if self.training and self.dropout > 0:
            raise RuntimeError(f"{type(self).__name__} explains eval mode only (dropout={self.dropout} is "
                               "active in training mode); call .eval() on the model")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError("query, key and value must all be 3D (batched) or all 2D (unbatched), got "
                             f"{query.dim()}D, {key.dim()}D and {value.dim()}D")

    def _linear(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return lrp_apply(_LINEAR, self.rule, input, weight, bias)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, ...]:
        """``q, k, v`` as ``(N, L, E)``; one projection per distinct input tensor, as torch."""
        e, b = self.embed_dim, self.in_proj_bias
        if not self._qkv_same_embed_dim:
            biases = (None,) * 3 if b is None else b.chunk(3)
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
            return tuple(map(self._linear, (query, key, value), weights, biases))

        def project(input: Tensor, start: int, stop: int) -> Tensor:
            return self._linear(input, self.in_proj_weight[start:stop], None if b is None else b[start:stop])

        if query is key and key is value:
            return project(query, 0, 3 * e).chunk(3, -1)
        if key is value:
            return (project(query, 0, e), *project(key, e, 3 * e).chunk(2, -1))
        return project(query, 0, e), project(key, e, 2 * e), project(value, 2 * e, 3 * e)

    def _split_heads(self, t: Tensor) -> Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
              need_weights: bool, q: Tensor, k: Tensor) -> Tensor | None:
        """The additive mask, broadcastable to the ``(N, H, L, S)`` scores, or None."""
        (n, h, length, _), source = q.shape, k.shape[2]
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:  # torch then ignores attn_mask
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril_().logical_not_()
        mask = None
        if attn_mask is not None:
            expected = (length, source) if attn_mask.dim() == 2 else (n * h, length, source)
            if tuple(attn_mask.shape) != expected:
                raise RuntimeError(f"attn_mask has shape {tuple(attn_mask.shape)}, expected {expected} "
                                   "(2D, or 3D with batch * num_heads first)")
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:
                mask = mask.view(n, h, length, source)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).view(n, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


#: ``{torch class: twin class}`` of the attention layers
ATTENTION_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: LRPMultiheadAttention,
    nn.Softmax: LRPSoftmax,
}
