r"""Scaled dot-product attention (``F.scaled_dot_product_attention`` in forward code: timm's and
Hugging Face's fused attention) with the AttnLRP rules, and the relevance of its inputs computed
block by block of queries.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ..core import lrp_apply, stabilize
from ..ops import ElementwiseOps
from ..rules.attention import Uniform
from ..rules.base import Rule, compiling
from .attention import _PASS, DEFAULT_EPSILON, lrp_matmul, lrp_softmax
from .merge import _OwnLayer

__all__ = ["ScaledDotProductAttention", "attention_relevance", "recomputes"]


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

    Without autograd (``torch.no_grad``, inputs that do not require grad) it is torch's own
    ``F.scaled_dot_product_attention``. Cost: with autograd on (eager mode) and the
    :class:`~lrpx.rules.Uniform` rule, the forward is that kernel too (its output), only the
    inputs are kept, and backward computes the scores, weights and relevance again block by
    block of queries, so that no ``heads x L x S`` tensor of the whole sequence exists at once.
    With another rule, the operations are written out (under ``torch.compile`` and
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
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))):
            # no relevance to come: torch's own kernel, the original's output exactly
            return _Attention.forward(query, key, value, attn_mask, is_causal, scale, enable_gqa, 0.0)
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
        blocked, bias = _block_mask(attn_mask, is_causal, start, stop, length, source, q.device, work)
        # the keys up to the last one a query of the block may see (causal: up to the block)
        span = _key_span(blocked, source) if attn_mask is not None else min(stop, source) if is_causal else source
        if span < source:
            blocked = blocked[..., :span]
            bias = bias[..., :span] if bias is not None and bias.shape[-1] == source else bias
        # the whole relevance: no view op, which the rows of a batched backward pass do not take
        r_b = r if stop - start == length else r.narrow(-2, start, stop - start)
        r_q_b, g_k_b, g_v_b = _block_relevance(q[..., start:stop, :], k[..., :span, :], v[..., :span, :], r_b,
                                               blocked, bias, attn_mask is not None, epsilon)
        r_q.append(r_q_b)
        g_k, g_v = _accumulate(g_k, g_k_b, source), _accumulate(g_v, g_v_b, source)
    r_k, r_v = k * g_k, v * g_v
    if repeats > 1:
        r_k, r_v = (t.reshape(t.shape[:-3] + (t.shape[-3] // repeats, repeats) + t.shape[-2:]).sum(-3)
                    for t in (r_k, r_v))
    return torch.cat(r_q, -2).to(dtype), r_k.to(dtype), r_v.to(dtype)


def _block_mask(attn_mask: Tensor | None, is_causal: bool, start: int, stop: int, length: int, source: int,
                device: torch.device, work: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """For the queries ``start:stop``: where they may not attend (``None``: everywhere) and the
    bias a float mask adds to their scores (``None``: no bias)."""
    blocked, bias = None, None
    if is_causal:
        blocked = torch.arange(start, stop, device=device)[:, None] < torch.arange(source, device=device)
    if attn_mask is None:
        return blocked, bias
    mask = attn_mask[..., start:stop, :] if attn_mask.dim() >= 2 and attn_mask.shape[-2] == length else attn_mask
    if mask.dtype == torch.bool:
        mask = ~mask
    else:
        bias = mask.masked_fill(mask == float("-inf"), 0.0).to(work)
        mask = mask == float("-inf")
    return (mask if blocked is None else blocked | mask), bias


def _key_span(blocked: Tensor, source: int) -> int:
    """How many of the ``source`` keys a block with a mask needs: up to the last one a query may
    see (read from the mask, which makes the host wait for the device)."""
    seen = (~blocked).expand(blocked.shape[:-1] + (source,)).reshape(-1, source).any(0).nonzero()
    return int(seen.max()) + 1 if seen.numel() else 1


def _block_relevance(q: Tensor, k: Tensor, v: Tensor, relevance: Tensor, blocked: Tensor | None,
                     bias: Tensor | None, may_be_dead: bool, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """The relevance of a block of (scaled) queries ``q`` and what the block adds to the key and
    value factors (:func:`attention_relevance`'s formulas); ``may_be_dead``: some query of the
    block may see no key (then its weights are 0, not NaN)."""
    z = q @ k.transpose(-2, -1)
    x, share = z, None
    if bias is not None:  # a bias on the scores keeps its share
        x = z + bias
        share = torch.where(bias == 0, 1.0, z / stabilize(x, epsilon))
    a = torch.softmax(x if blocked is None else x.masked_fill(blocked, float("-inf")), -1)
    if may_be_dead:
        dead = blocked.all(-1, keepdim=True)
        if dead.any():
            a.masked_fill_(dead, 0.0)
    s = relevance / stabilize(a @ v, epsilon / 2, 0.5)  # stab(2O)
    r_a = (s @ v.transpose(-2, -1)).mul_(a)
    g_v = a.transpose(-2, -1) @ s
    r_x = torch.addcmul(r_a, a, r_a.sum(-1, keepdim=True), value=-1).mul_(x)
    del r_a, a, s
    if blocked is not None:
        r_x.masked_fill_(blocked, 0.0)
    if share is not None:
        r_x.mul_(share)
    t = r_x.div_(stabilize(z, epsilon / 2, 0.5))  # stab(2Z)
    return (t @ k).mul_(q), t.transpose(-2, -1) @ q, g_v


def _accumulate(total: Tensor | None, part: Tensor, size: int) -> Tensor:
    """``total + part``, where ``part`` covers the first rows (keys) of ``size``."""
    rows = part.shape[-2]
    if total is None:
        return part if rows == size else F.pad(part, (0, 0, 0, size - rows))
    if rows == size:
        return total.add_(part)
    total.narrow(-2, 0, rows).add_(part)
    return total
