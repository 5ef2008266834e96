"""Rules for forward code that ``torch.fx`` cannot trace: the operations themselves, at run time.

A module whose forward branches on the data or on sizes (torchvision's shifted-window
attention pads only when the window does not fit) has no graph to rewrite. ``convert`` gives
such a module an :class:`OpRules` mode: while its forward runs, each functional operation on
values that carry relevance (tensors that require grad) is replaced by the same operation with
its LRP rule, by the kind of operation. Values computed in that forward from parameters and
constants alone (a relative position bias gathered from its table, a clamped logit scale) carry
no relevance of the input, although they require grad: they are constants to the rules.

* ``F.linear`` and ``F.conv*d`` with a weight not computed from the input (a parameter, or
  computed from parameters alone, as one expert's slice of a mixture of experts),
  ``torch.addmm(b, x, w)`` (``x @ w + b``), ``F.layer_norm``: the weighted and normalisation
  rules; ``F.normalize``: relevance passes (the norm is read as a constant, as the
  normalisation rule reads it);
* ``a @ b`` / ``torch.matmul`` / ``torch.bmm`` / ``torch.einsum`` of two such values,
  ``F.scaled_dot_product_attention``: the bilinear rule (and the softmax rule inside
  attention); ``a @ w`` with a factor computed from parameters: the weighted rule;
* ``softmax``: the softmax rule; ``a + b`` and ``a - b``: the sum rule (a number or a constant
  tensor takes its share like a bias); ``mean``/``sum`` over dimensions and ``index_add`` (also
  in place, as a mixture of experts gathers its experts' outputs): the sum rule;
* ``x += y`` (``add_``, and likewise ``-=``, ``*=``, ``/=`` and in-place activations) out of
  place with its rule: the result is what ``x`` is bound to, and no output a rule saved is
  changed (a bare ``x.add_(y)`` whose result is dropped would not change ``x``);
* ``rsqrt``, ``sqrt``, ``norm``, ``var``, ... of such a value, and the divisor of ``a / b``: a
  statistic, computed from the detached value (:mod:`lrpx.statistics`), so that a product with
  it passes relevance (and a quotient whose numerator carries none, ``1 / x``, is a constant);
* ``a * b``: the product rule, all relevance to the one operand that carries relevance (a
  parameter is a constant factor), half to each of two (a gate is not told apart from a signal here, unlike in traced code);
  ``a / c`` and ``-a``: relevance passes; element-wise activations: the element-wise rule;
* ``torch.baddbmm(bias, a, b)``: the product's rule, its scaling, and the sum rule with the bias.

Indexing, reshapes, rolls, padding, concatenation and max pooling keep their gradient, which
moves relevance. Any other operation on values from the input keeps its gradient too, and is
reported with an :class:`UnruledOperationWarning` that names the module and the operation when
relevance reaches it in backward (not if its result only feeds a statistic held constant).
The mode is a ``torch.overrides.TorchFunctionMode``: per thread, active only inside that
module's forward, and inactive inside twins (their own operations are theirs).
Operations on tensors that do not require grad run unchanged, so a forward under
``torch.no_grad`` computes exactly what the original does.
"""
from __future__ import annotations

import operator
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .core import lrp_apply
from .layers.sdpa import ScaledDotProductAttention
from .ops import (ConvOps, ElementwiseOps, IndexAddOps, LayerNormOps, LinearOps, MatmulOps, MeanOps, ProductOps,
                  SoftmaxOps, SumOps, WeightMatmulOps, einsum_operands)
from .precision import relevance_to
from .routing import ROUTING_FUNCTIONS, ROUTING_METHODS
from .rules.base import Rule
from .rules.elementwise import Pass
from .statistics import held_root

__all__ = ["OpRules", "UnruledOperationWarning"]


class UnruledOperationWarning(UserWarning):
    """An operation on values from the input, in forward code that takes its rules at run time,
    that lrpx has no rule for: its plain gradient passes as relevance."""


class _Reported(torch.autograd.Function):
    """The identity; its backward warns (:class:`UnruledOperationWarning`) when relevance
    reaches it."""

    @staticmethod
    def forward(ctx, value: Tensor, message: str) -> Tensor:
        ctx.message = message
        return value.view_as(value)

    @staticmethod
    def backward(ctx, relevance: Tensor):
        warnings.warn(ctx.message, UnruledOperationWarning, stacklevel=2)
        return relevance, None


_PASS = Pass()
_T = torch.Tensor
# augmented assignments (``x += y`` calls ``x.add_(y)`` and rebinds ``x`` to its result) are
# computed out of place, so that an output a rule saved is never changed
_ADDS = {torch.add, _T.add, _T.__add__, _T.__radd__, operator.add, _T.__iadd__, _T.add_}
_SUBS = {torch.sub, _T.sub, _T.__sub__, operator.sub, _T.__isub__, _T.sub_}
_RSUBS = {_T.__rsub__}
_MULS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, operator.mul, _T.__imul__, _T.mul_}
_DIVS = {torch.div, _T.div, _T.__truediv__, operator.truediv, _T.__itruediv__, _T.div_, torch.divide, _T.divide,
         torch.true_divide, _T.true_divide}
_RDIVS = {_T.__rtruediv__, getattr(_T, "__rdiv__", _T.__rtruediv__)}  # number / tensor
_MATMULS = {torch.matmul, _T.matmul, _T.__matmul__, torch.bmm, _T.bmm}
_BADDBMMS = {torch.baddbmm, _T.baddbmm}
_SOFTMAX = {F.softmax, torch.softmax, _T.softmax}
_REDUCE = {torch.mean: False, _T.mean: False, torch.sum: True, _T.sum: True}
_NEG = {torch.neg, _T.neg, _T.__neg__}
#: methods and attribute reads that move, select or inspect values (their gradient routes)
_MOVES = ROUTING_METHODS | {"__getitem__", "__setitem__", "__get__", "__len__", "__iter__", "__bool__", "__eq__",
                            "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__format__", "__repr__", "expand",
                            "expand_as", "contiguous", "numel", "is_floating_point", "is_contiguous", "dim",
                            "dropout", "pad", "max_pool2d", "cat", "stack", "masked_fill", "where", "detach",
                            "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like",
                            "empty_like", "full_like", "eq", "ne", "lt", "le", "gt", "ge", "index_select", "gather",
                            "take_along_dim", "register_hook", "argmax", "argmin", "argsort", "topk", "max", "amax"}
_CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_INDEX_ADDS = {torch.index_add, _T.index_add, _T.index_add_}
#: operations known to mix activations with weights in ways no rule covers (grouped matrix products)
_NO_RULE = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None}
_ACTIVATIONS = {F.relu, torch.relu, _T.relu, F.gelu, F.silu, torch.sigmoid, _T.sigmoid, F.sigmoid, torch.tanh,
                _T.tanh, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.elu, F.relu6, F.hardtanh}


class OpRules(TorchFunctionMode):
    """The mode that gives operations their rules; ``rules`` maps each kind of layer
    (``lrpx.rules.KINDS``) to its rule (a composite's fallbacks)."""

    def __init__(self, rules: dict[str, Rule], where: str = "") -> None:
        super().__init__()
        self.rules, self.where = rules, where
        #: values computed from parameters and constants alone in this forward, by id (kept
        #: alive while the mode is): they carry no relevance of the input, even if they require
        #: grad (a relative position bias from a table, a clamped logit scale)
        self._constants: dict[int, Tensor] = {}

    def _carries(self, value) -> bool:
        return isinstance(value, Tensor) and value.requires_grad and not isinstance(value, nn.Parameter) \
            and id(value) not in self._constants

    def _any_carries(self, value) -> bool:
        """Whether a tensor in ``value`` (nested tuples, lists and dicts of arguments) carries
        relevance; a plain recursion, several times cheaper per call than a pytree flattening."""
        if isinstance(value, Tensor):
            return self._carries(value)
        if isinstance(value, (tuple, list)):
            return any(self._any_carries(v) for v in value)
        if isinstance(value, dict):
            return any(self._any_carries(v) for v in value.values())
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if not (self._any_carries(args) or kwargs and self._any_carries(kwargs)):
            out = func(*args, **kwargs)
            for t in (out,) if isinstance(out, Tensor) else torch.utils._pytree.tree_leaves(out):
                if isinstance(t, Tensor) and t.requires_grad:
                    self._constants[id(t)] = t
            return out
        done = self._with_rule(func, args, kwargs)
        if done is not NotImplemented:
            return done
        out = func(*args, **kwargs)
        if func in ROUTING_FUNCTIONS or getattr(func, "__name__", "") in _MOVES:
            return out
        # reported when relevance reaches it: a value that only feeds a statistic (x ** 2 under a
        # root, held constant) passes none
        message = (f"{self.where or 'a module'} applies {getattr(func, '__name__', func)} to values computed from "
                   "the input at run time: lrpx has no rule for it, so its plain gradient passes as relevance")
        return torch.utils._pytree.tree_map_only(
            Tensor, lambda t: _Reported.apply(t, message) if t.requires_grad else t, out)

    def _with_rule(self, func, args, kwargs):
        rules = self.rules
        if func is F.linear:
            bound = _bind(("input", "weight", "bias"), args, kwargs)
            x, weight, bias = bound.get("input"), bound.get("weight"), bound.get("bias")
            if isinstance(x, Tensor) and isinstance(weight, Tensor) and not self._carries(weight):
                return lrp_apply(LinearOps(), rules["weighted"], x, weight, bias)
            if isinstance(x, Tensor) and _from_parameters(weight) and (bias is None or _from_parameters(bias)):
                # a weight the forward selects from its parameters (one expert's slice): a constant
                return lrp_apply(LinearOps(), rules["weighted"], x, weight.detach(),
                                 None if bias is None else bias.detach())
            return NotImplemented
        if func in _CONVS:
            return self._conv(_CONVS[func], args, kwargs)
        if func is F.normalize:
            bound = _bind(("input", "p", "dim", "eps", "out"), args, kwargs)
            if not self._carries(bound.get("input")) or bound.pop("out", None) is not None:
                return NotImplemented
            normalize = partial(F.normalize, **{k: v for k, v in bound.items() if k != "input"})
            return lrp_apply(ElementwiseOps(normalize), _PASS, bound["input"])
        if func in _NO_RULE:
            raise NotImplementedError(
                f"{getattr(func, '__name__', func)} applied to values that carry relevance has no LRP rule; for a "
                "transformers mixture of experts, set model.config._experts_implementation = 'eager' (a loop over "
                "experts with linear layers) before converting")
        if func in _INDEX_ADDS and len(args) == 4 and not kwargs and isinstance(args[3], Tensor):
            return self._index_add(func, *args)
        if func is torch.addmm and len(args) == 3 and not kwargs and self._carries(args[1]) and not self._carries(args[2]):
            return lrp_apply(LinearOps(), rules["weighted"], args[1], args[2].t(), args[0])  # x @ w + b
        if func in _BADDBMMS:
            return self._baddbmm(func, args, kwargs)
        if func is F.layer_norm:
            bound = _bind(("input", "normalized_shape", "weight", "bias", "eps"), args, kwargs)
            if "normalized_shape" not in bound:
                return NotImplemented
            return lrp_apply(LayerNormOps(tuple(bound["normalized_shape"]), bound.get("eps", 1e-5)),
                             rules["normalization"], bound["input"], bound.get("weight"), bound.get("bias"))
        if func is F.scaled_dot_product_attention:
            return ScaledDotProductAttention(rules["bilinear"])(*args, **kwargs)
        statistic = held_root(func, args, kwargs)  # rsqrt(mean(x ** 2) + eps) and the like: constants
        if statistic is not NotImplemented:
            return statistic
        if func in _ACTIVATIONS and "inplace" in kwargs:  # (nn.ReLU passes inplace=False by name)
            kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}  # never in place on a saved output
        if kwargs and func not in _SOFTMAX and func not in _REDUCE:
            return NotImplemented
        if func in _MATMULS and len(args) == 2 and all(isinstance(a, Tensor) for a in args) and \
                min(a.dim() for a in args) >= 2:
            carried = [self._carries(a) for a in args]
            if all(carried):
                return lrp_apply(MatmulOps(), rules["bilinear"], tuple(args))
            weight_first = not carried[0]  # a factor computed from parameters: a linear map
            x, w = (args[1], args[0]) if weight_first else args
            return lrp_apply(WeightMatmulOps(weight_first), rules["weighted"], x, w.detach(), None)
        if func is torch.einsum and einsum_operands(args) is not None:
            operands = einsum_operands(args)
            if len(operands) == 2 and all(self._carries(a) for a in operands):
                return lrp_apply(MatmulOps(args[0]), rules["bilinear"], operands)
            return NotImplemented
        if func in _SOFTMAX:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            at = 3 if func is F.softmax else 2  # F.softmax(input, dim, _stacklevel, dtype)
            dtype = kwargs.get("dtype", args[at] if len(args) > at else None)
            if dim is None or set(kwargs) - {"dim", "dtype", "_stacklevel"}:
                return NotImplemented
            return lrp_apply(SoftmaxOps(dim, dtype), rules["softmax"], args[0])
        if func in _REDUCE and isinstance(args[0], Tensor) and set(kwargs) <= {"dim", "keepdim"}:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
            dims = None if dim is None else (dim,) if isinstance(dim, int) else tuple(dim)
            return lrp_apply(MeanOps(dims, keepdim, total=_REDUCE[func]), rules["sum"], args[0])
        if len(args) == 2 and (func in _ADDS or func in _SUBS or func in _RSUBS):
            a, b = args if func not in _RSUBS else (args[1], args[0])
            if func in _SUBS or func in _RSUBS:
                b = -b if not isinstance(b, Tensor) else lrp_apply(ElementwiseOps(torch.neg), _PASS, b)
            return self._sum(a, b)
        if len(args) == 2 and func in _MULS | _DIVS:
            return self._product(args[0], args[1], func in _DIVS)
        if len(args) == 2 and func in _RDIVS:  # number / tensor: the tensor is a divisor
            return self._product(args[1], args[0], True)
        if len(args) == 1 and func in _NEG:
            return lrp_apply(ElementwiseOps(torch.neg), _PASS, args[0])
        if func in _ACTIVATIONS and len(args) >= 1 and isinstance(args[0], Tensor):
            rest = args[1:2] if func is F.leaky_relu or func is F.elu else ()  # slope / alpha, not inplace
            return lrp_apply(ElementwiseOps(partial(_call, func, rest)), rules["elementwise"], args[0])
        return NotImplemented

    def _sum(self, a, b):
        tensor = a if isinstance(a, Tensor) else b
        if not all(isinstance(t, (Tensor, int, float)) for t in (a, b)):
            return NotImplemented
        a, b = (t if isinstance(t, Tensor) else torch.tensor(t, dtype=tensor.dtype, device=tensor.device)
                for t in (a, b))
        if a.dtype != b.dtype:  # float32 scores + a float64 mask: computed in the wider type, as torch does
            dtype = torch.result_type(a, b)
            a, b = a.to(dtype), b.to(dtype)
        return lrp_apply(SumOps(), self.rules["sum"], (a, b))

    def _index_add(self, func, base: Tensor, dim: int, index: Tensor, source: Tensor):
        """``base.index_add(dim, index, source)`` with the sum rule; ``index_add_`` changes
        ``base`` in place (its result is often dropped), by a copy of the sum computed from a
        copy of ``base`` (no tensor a rule saved is changed)."""
        out = lrp_apply(IndexAddOps(dim, index), self.rules["sum"], (base.clone(), source))
        if func is _T.index_add_:
            return base.copy_(out)
        return out

    def _product(self, a, b, divide: bool):
        if divide and self._carries(b):  # the divisor is a statistic, held constant (lrpx.statistics)
            b = b.detach()
            if not self._carries(a):  # a number or a constant over it: a constant, computed out of place
                out = torch.div(a.detach() if isinstance(a, nn.Parameter) else a, b) if isinstance(a, Tensor) \
                    else a / b
                if out.requires_grad:
                    self._constants[id(out)] = out
                return out
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            tensor, number = (a, b) if isinstance(a, Tensor) else (b, a)
            if not isinstance(number, (int, float)):
                return NotImplemented
            op = operator.truediv if divide else operator.mul
            function = (lambda t: op(t, number)) if tensor is a else (lambda t: op(number, t))
            return lrp_apply(ElementwiseOps(function), _PASS, tensor)
        # a parameter is a constant factor (a layer scale, a norm's weight): it takes no relevance
        a, b = (t.detach() if isinstance(t, nn.Parameter) else t for t in (a, b))
        if not (self._carries(a) or self._carries(b)):
            return NotImplemented
        signal = None if self._carries(a) and self._carries(b) else 0 if self._carries(a) else 1
        return lrp_apply(ProductOps(signal, divide, (a.shape, b.shape)), self.rules["product"], (a, b))

    def _baddbmm(self, func, args, kwargs):
        """``beta * input + alpha * (batch1 @ batch2)`` (attention scores and a bias, BLOOM's
        ALiBi): the product, its scaling and the sum take their rules; the value is torch's
        fused one, and its relevance passes to the composition."""
        bound = _bind(("input", "batch1", "batch2", "beta", "alpha"), args, kwargs)
        base, a, b = (bound.get(k) for k in ("input", "batch1", "batch2"))
        beta, alpha = bound.get("beta", 1), bound.get("alpha", 1)
        if not all(isinstance(t, Tensor) for t in (base, a, b)) or \
                not all(isinstance(v, (int, float)) for v in (beta, alpha)):
            return NotImplemented
        scores = self._with_rule(torch.bmm, (a, b), {})
        if scores is NotImplemented:
            return NotImplemented
        if alpha != 1:
            scores = self._product(scores, alpha, False)
        if beta != 0:  # (with beta 0 torch ignores the input, even NaN in it)
            if beta != 1:
                base = self._product(base, beta, False) if self._carries(base) else base * beta
            scores = self._sum(base, scores)
        with torch.no_grad():
            value = func(*args, **kwargs)
        return relevance_to(value, scores)

    def _conv(self, dim: int, args, kwargs):
        bound = _bind(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, kwargs)
        weight, padding = bound.get("weight"), bound.get("padding", 0)
        if not isinstance(weight, Tensor) or self._carries(weight) or isinstance(padding, str):
            return NotImplemented

        def expand(value) -> tuple[int, ...]:
            return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dim
        ops = ConvOps(dim, expand(bound.get("stride", 1)), expand(padding), expand(bound.get("dilation", 1)),
                      bound.get("groups", 1))
        return lrp_apply(ops, self.rules["weighted"], bound["input"], weight, bound.get("bias"))


def _from_parameters(value, limit: int = 16) -> bool:
    """Whether ``value`` is a tensor computed from parameters alone (its autograd graph, of at
    most ``limit`` nodes, ends in parameters only), as ``weight[expert]``."""
    if isinstance(value, nn.Parameter):
        return True
    if not isinstance(value, Tensor) or value.grad_fn is None:
        return False
    seen, todo = 0, [value.grad_fn]
    while todo:
        node = todo.pop()
        seen += 1
        if seen > limit:
            return False
        if type(node).__name__ == "AccumulateGrad":
            if not isinstance(node.variable, nn.Parameter):
                return False
            continue
        todo.extend(n for n, _ in node.next_functions if n is not None)
    return True


def _bind(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """The arguments of a call by name (an empty dict if they do not fit ``names``)."""
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return {}
    return {**dict(zip(names, args)), **kwargs}


def _call(func, rest, x):
    return func(x, *rest)
