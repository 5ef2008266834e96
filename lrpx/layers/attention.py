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
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..core import lrp_apply, stabilize
from ..ops import ElementwiseOps, LinearOps, MatmulOps, SoftmaxOps
from ..rules.attention import Taylor, Uniform
from ..rules.base import Rule, compiling
from ..rules.elementwise import Pass
from .base import Twin
from .merge import _OwnLayer

__all__ = ["lrp_softmax", "lrp_matmul", "LRPSoftmax", "LRPMultiheadAttention", "ScaledDotProductAttention",
           "ATTENTION_TWINS"]

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


def _biased(scores: Tensor, bias: Tensor, epsilon: float) -> Tensor:
    r"""``scores + bias`` whose backward gives the scores the share
    :math:`R_s = s\,R / \mathrm{stab}(s + b, \epsilon)` of the sum's relevance (the ``Norm`` rule;
    the bias keeps the rest), and all of it where the bias is 0 (a mask's open positions)."""
    return _Biased.apply(scores, bias, epsilon)[0]


class _Biased(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(scores: Tensor, bias: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        total = scores + bias
        stabilized = total + epsilon * torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        return total, torch.where(bias == 0, 1.0, scores / stabilized)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, relevance: Tensor, _share: Tensor | None):
        (share,) = ctx.saved_tensors
        return relevance * share, None, None


def recomputes(*inputs: Tensor) -> bool:
    """Whether :class:`ScaledDotProductAttention` keeps only its inputs for backward and computes
    its scores and weights again there (eager mode with autograd on; not under ``torch.compile``
    nor inside ``torch.func`` transforms, which do not take the saved-tensor hooks it uses)."""
    return torch.is_grad_enabled() and not compiling() and any(t.requires_grad for t in inputs) and \
        not torch._C._functorch.is_functorch_wrapped_tensor(inputs[0]) and \
        torch._C._functorch.maybe_current_level() is None


class ScaledDotProductAttention(_OwnLayer):
    r"""``F.scaled_dot_product_attention`` in forward code (timm's and Hugging Face's fused
    attention) with the AttnLRP rules of its math
    :math:`O = \mathrm{softmax}(s\, q k^\top + M)\, v`: the two matrix products with this
    layer's rule (:class:`lrpx.rules.Uniform`, see :func:`lrp_matmul`), the softmax with
    :class:`lrpx.rules.Taylor` (:func:`lrp_softmax`); the scale :math:`s` (``scale``, by
    default :math:`1/\sqrt{d}`) and the zeros and ``-inf`` of a mask :math:`M` pass relevance
    unchanged; other values of a float mask are a bias on the scores, which keeps its share of
    their relevance (the ``Norm`` rule with the layer rule's epsilon), as a bias does. A query
    that may attend to no key (a fully masked row, such as a left-padding position under a
    causal mask) passes no relevance.

    Takes the arguments of ``F.scaled_dot_product_attention``: a bool ``attn_mask`` marks the
    positions that take part (``True``), a float one is added to the scores; ``is_causal``
    masks the upper triangle; ``enable_gqa`` repeats the key/value heads to the query heads.
    Dropout (``dropout_p > 0``) raises ``RuntimeError``: relevance is defined in eval mode.

    Cost: with autograd on (eager mode) and the :class:`~lrpx.rules.Uniform` rule, the forward
    is torch's own ``F.scaled_dot_product_attention`` (its fused kernels, its output), only
    the inputs are kept, and backward computes the scores, weights and relevance again block
    by block of queries, so that no ``heads x L x S`` tensor of the whole sequence exists at
    once. With another rule, the operations are written out (under ``torch.compile`` and
    inside ``torch.func`` transforms: kept for backward; otherwise recomputed there with
    ``torch.utils.checkpoint``).
    """

    lrp_kind = "bilinear"

    def __init__(self, rule: Rule | None = None) -> None:
        super().__init__(Uniform(DEFAULT_EPSILON) if rule is None else rule)

    @classmethod
    def from_module(cls, module: "ScaledDotProductAttention", rule: Rule) -> "ScaledDotProductAttention":
        return cls(rule)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> Tensor:
        if dropout_p:
            raise RuntimeError(f"scaled_dot_product_attention with dropout_p={dropout_p}: relevance is defined "
                               "in eval mode (call .eval() on the model)")
        if not recomputes(query, key, value):
            return self._attend(query, key, value, attn_mask, is_causal, scale, enable_gqa)
        if type(self.rule) is Uniform:
            return _Attention.apply(query, key, value, attn_mask, is_causal, scale, enable_gqa, self.rule.epsilon)
        # its operations are its own, not those of a module's forward that takes rules at run time:
        # the recomputation in backward runs without that mode too
        with torch._C.DisableTorchFunction():
            return checkpoint(self._attend, query, key, value, attn_mask, is_causal, scale, enable_gqa,
                              use_reentrant=False, preserve_rng_state=False)

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool,
                scale: float | None, enable_gqa: bool) -> Tensor:
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
        factor = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        query = lrp_apply(ElementwiseOps(partial(torch.mul, other=factor)), _PASS, query)
        scores = lrp_matmul(query, key.transpose(-2, -1), rule=self.rule)
        length, source = query.shape[-2], key.shape[-2]
        if is_causal:
            allowed = torch.ones(length, source, dtype=torch.bool, device=query.device).tril_()
            scores = scores.masked_fill(~allowed, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:  # a bias on the scores (relative positions, ALiBi) takes its share
                blocked = attn_mask == float("-inf")
                bias = attn_mask.masked_fill(blocked, 0.0)
                scores = _biased(scores, bias, getattr(self.rule, "epsilon", DEFAULT_EPSILON))
                scores = scores.masked_fill(blocked, float("-inf"))
        return lrp_matmul(lrp_softmax(scores, -1), value, rule=self.rule)


#: the elements of one block of scores in :class:`_Attention`'s backward (per temporary): on the
#: CPU 1 MiB of float32, on accelerators 64 MiB
_BLOCK_CPU, _BLOCK_DEVICE = 1 << 18, 1 << 24


class _Attention(torch.autograd.Function):
    """Forward: ``F.scaled_dot_product_attention``. Backward: the AttnLRP relevance of q, k and v
    (the rules of :meth:`ScaledDotProductAttention._attend` with :class:`Uniform`), block by
    block of queries, from the inputs alone."""

    generate_vmap_rule = True

    @staticmethod
    def forward(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool,
                scale: float | None, enable_gqa: bool, epsilon: float) -> Tensor:
        gqa = {"enable_gqa": True} if enable_gqa else {}
        with torch._C.DisableTorchFunction():  # torch's kernel, not a run-time rule
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                                  scale=scale, **gqa)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        query, key, value, attn_mask, is_causal, scale, _, epsilon = inputs
        ctx.save_for_backward(query, key, value, attn_mask)
        ctx.is_causal, ctx.scale, ctx.epsilon = is_causal, scale, epsilon

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        query, key, value, attn_mask = ctx.saved_tensors
        r_q, r_k, r_v = attention_relevance(query, key, value, relevance, attn_mask, ctx.is_causal, ctx.scale,
                                            ctx.epsilon)
        return r_q, r_k, r_v, None, None, None, None, None


def attention_relevance(query: Tensor, key: Tensor, value: Tensor, relevance: Tensor, attn_mask: Tensor | None = None,
                        is_causal: bool = False, scale: float | None = None,
                        epsilon: float = DEFAULT_EPSILON) -> tuple[Tensor, Tensor, Tensor]:
    r"""The AttnLRP relevance of ``query``, ``key`` and ``value`` of scaled dot-product attention
    whose output has ``relevance`` (the arguments of ``F.scaled_dot_product_attention``; key and
    value heads fewer than the query heads are repeated to them, as ``enable_gqa`` does).

    For each block of query rows, with :math:`q_s = s\,q`, scores :math:`Z = q_s k^\top`, the
    softmax input :math:`X = Z + b` (:math:`-\infty` where masked), weights
    :math:`A = \mathrm{softmax}(X)` and output :math:`O = A v`:

    .. math::
        S = R / \mathrm{stab}(2O), \quad R_A = A \odot (S v^\top), \quad R_v \mathrel{+}= v \odot (A^\top S),\\
        R_X = X \odot (R_A - A \textstyle\sum_k R_A) \ (0 \text{ where masked}), \quad
        R_Z = R_X \odot Z / \mathrm{stab}(X) \ (R_X \text{ where } b = 0),\\
        T = R_Z / \mathrm{stab}(2Z), \quad R_q = q_s \odot (T k), \quad R_k \mathrel{+}= k \odot (T^\top q_s).

    Rows whose keys are all masked get weights 0 (no relevance). Half-precision inputs are
    computed in float32; the relevance has the inputs' dtype.
    """
    dtype = query.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, r = (t.to(work) for t in (query, key, value, relevance))
    repeats = q.shape[-3] // k.shape[-3] if q.dim() >= 3 and k.dim() >= 3 else 1
    if repeats > 1:
        k, v = k.repeat_interleave(repeats, -3), v.repeat_interleave(repeats, -3)
    q = q * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    length, source = q.shape[-2], k.shape[-2]
    budget = _BLOCK_CPU if q.device.type == "cpu" else _BLOCK_DEVICE
    rows = max(16, budget // max(q.shape[:-2].numel() * source, 1))
    r_q, g_k, g_v = [], None, None
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        blocked, bias = None, None
        if is_causal:
            blocked = torch.arange(start, stop, device=q.device)[:, None] < torch.arange(source, device=q.device)
        if attn_mask is not None:
            mask = attn_mask[..., start:stop, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == length else attn_mask
            if mask.dtype == torch.bool:
                blocked = ~mask if blocked is None else blocked | ~mask
            else:
                minus = mask == float("-inf")
                bias = mask.masked_fill(minus, 0.0).to(work)
                blocked = minus if blocked is None else blocked | minus
        span = source  # the keys up to the last one a query of the block may see (causal: up to the block)
        if blocked is not None:
            seen = (~blocked).expand(blocked.shape[:-1] + (source,)).reshape(-1, source).any(0).nonzero()
            span = int(seen.max()) + 1 if seen.numel() else 1
            blocked = blocked[..., :span]
            bias = bias[..., :span] if bias is not None and bias.shape[-1] == source else bias
        q_b = q[..., start:stop, :]
        k_b, v_b = (k, v) if span == source else (k[..., :span, :], v[..., :span, :])
        z = q_b @ k_b.transpose(-2, -1)
        x, share = z, None
        if bias is not None:  # a bias on the scores keeps its share
            x = z + bias
            share = torch.where(bias == 0, 1.0, z / stabilize(x, epsilon))
        a = torch.softmax(x if blocked is None else x.masked_fill(blocked, float("-inf")), -1)
        if attn_mask is not None:  # (a causal mask alone leaves every query a key)
            dead = blocked.all(-1, keepdim=True)
            if dead.any():  # queries with no key: weights 0, not NaN
                a.masked_fill_(dead, 0.0)
        # whole: no view op, which the rows of a batched backward pass do not take
        r_b = r if stop - start == length else r.narrow(-2, start, stop - start)
        s = r_b / stabilize(a @ v_b, epsilon / 2, 0.5)  # stab(2O)
        r_a = (s @ v_b.transpose(-2, -1)).mul_(a)
        g_v = _accumulate(g_v, a.transpose(-2, -1) @ s, source)
        r_x = torch.addcmul(r_a, a, r_a.sum(-1, keepdim=True), value=-1).mul_(x)
        del r_a, a, s
        if blocked is not None:
            r_x.masked_fill_(blocked, 0.0)
        if share is not None:
            r_x.mul_(share)
        t = r_x.div_(stabilize(z, epsilon / 2, 0.5))  # stab(2Z)
        r_q.append((t @ k_b).mul_(q_b))
        g_k = _accumulate(g_k, t.transpose(-2, -1) @ q_b, source)
    r_k, r_v = k * g_k, v * g_v
    if repeats > 1:
        r_k, r_v = (t.reshape(t.shape[:-3] + (t.shape[-3] // repeats, repeats) + t.shape[-2:]).sum(-3)
                    for t in (r_k, r_v))
    return torch.cat(r_q, -2).to(dtype), r_k.to(dtype), r_v.to(dtype)


def _accumulate(total: Tensor | None, part: Tensor, size: int) -> Tensor:
    """``total + part``, where ``part`` covers the first rows (keys) of ``size``."""
    rows = part.shape[-2]
    if total is None:
        return part if rows == size else F.pad(part, (0, 0, 0, size - rows))
    if rows == size:
        return total.add_(part)
    total.narrow(-2, 0, rows).add_(part)
    return total


#: ``{torch class: twin class}`` of the attention layers
ATTENTION_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.MultiheadAttention: LRPMultiheadAttention,
    nn.Softmax: LRPSoftmax,
    ScaledDotProductAttention: ScaledDotProductAttention,
}
