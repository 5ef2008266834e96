r"""Statistics of activations held constant: the scaling of RMSNorm, hand-written LayerNorm and
global response normalisation.

A normalisation divides an activation by a value computed from it through a reduction,
``x * rsqrt(mean(x ** 2) + eps)`` (Llama's RMSNorm), ``x / sqrt(var(x) + eps)``,
``x / x.norm(dim=...)``. AttnLRP (Achtibat et al. 2024, Prop. 3.4) reads that factor as a
constant: relevance passes through the scaling in proportion, none of it reaches the statistic.
lrpx does so wherever such a factor appears, without knowing the class that computes it:

* in traced forward code, :func:`hold_statistics` finds each *statistic*, a value computed by
  a root (``rsqrt``, ``sqrt``, ``reciprocal``, ``norm``, ``var``, ``std``, a negative power) from
  an activation through operations whose results only feed that statistic (``pow``, ``mean``,
  ``+ eps``, casts), and cuts it off the activation with :func:`held` (a ``detach``). The
  statistic is then computed from constants alone, so a product with it is a constant factor
  (:class:`lrpx.layers.Product` gives all relevance to the activation) and the operations that
  compute it take no rule;
* a division ``a / b`` by an activation ``b`` is a product with the root ``1 / b``: the divisor
  is a statistic in the same way (``x / x.sum(-1, keepdim=True)``, a router's renormalised
  top-k weights, ``x / (1 + exp(-x))``), and all of the relevance of ``a / b`` goes to ``a``;
* in forward code that runs with rules at run time (:mod:`lrpx.oplevel`), the same roots
  applied to an activation compute their result from the detached activation
  (:data:`ROOTS`), and divisors are detached, with the same effect.

The forward value is unchanged: ``held`` returns the same numbers.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

__all__ = ["held", "hold_statistics", "hold_all", "held_root", "ROOTS", "is_root"]


def held(input: Tensor) -> Tensor:
    """``input`` as a constant: the same values, no relevance (and no gradient) flows back."""
    return input.detach()


_T = torch.Tensor
#: functions and tensor methods that end a statistic: their result is a scale computed from an activation
ROOTS = frozenset({torch.rsqrt, _T.rsqrt, torch.sqrt, _T.sqrt, torch.reciprocal, _T.reciprocal, torch.norm,
                   _T.norm, torch.linalg.vector_norm, torch.linalg.norm, torch.var, _T.var, torch.std, _T.std,
                   torch.var_mean, torch.std_mean})
_ROOT_METHODS = frozenset({"rsqrt", "sqrt", "reciprocal", "norm", "var", "std"})
_POWS = {operator.pow, torch.pow}
_DIVISIONS = {operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide}
_DIVISION_METHODS = ("div", "divide", "true_divide")


def is_root(node: fx.Node) -> bool:
    """Whether ``node`` computes a statistic's scale from its first argument (a root, a norm, a
    variance, a negative power)."""
    if node.op == "call_function" and node.target in ROOTS:
        return True
    if node.op == "call_method" and node.target in _ROOT_METHODS:
        return True
    exponent = node.args[1] if len(node.args) > 1 else None
    is_pow = (node.op == "call_function" and node.target in _POWS) or (node.op == "call_method" and node.target == "pow")
    return is_pow and isinstance(exponent, (int, float)) and exponent < 0


def is_division(node: fx.Node) -> bool:
    """Whether ``node`` is ``a / b`` of two values (no rounding mode)."""
    is_div = (node.op == "call_function" and node.target in _DIVISIONS) or \
        (node.op == "call_method" and node.target in _DIVISION_METHODS)
    return is_div and len(node.args) == 2 and not node.kwargs


def hold_statistics(graph: fx.Graph, kinds: dict[fx.Node, str]) -> bool:
    """Cut every statistic of ``graph`` off the activations it is computed from (see the module
    docstring); ``kinds`` are the tags of :func:`lrpx.rewrite.tags`. Whether anything changed."""
    changed = False
    for node in [n for n in graph.nodes if is_division(n) and kinds.get(n.args[1]) == "input"]:
        with graph.inserting_before(node):  # a / b as a * (1 / b): the divisor is a statistic
            divisor = graph.call_function(held, (node.args[1],))
        node.update_arg(1, divisor)
        _cut(graph, _statistic(graph, divisor, kinds) - {divisor}, kinds)
        changed = True
    for root in [n for n in graph.nodes if is_root(n) and n.args and kinds.get(n.args[0]) == "input"]:
        changed |= _cut(graph, _statistic(graph, root, kinds), kinds)
    return changed


def _cut(graph: fx.Graph, chain: set[fx.Node], kinds: dict[fx.Node, str]) -> bool:
    """Compute the operations ``chain`` from constants: each activation that is read by one
    of them and computed outside of it is read through :func:`held`."""
    changed = False
    for node in chain:
        for source in [a for a in node.all_input_nodes if a not in chain and kinds.get(a) == "input"]:
            with graph.inserting_after(source):
                constant = graph.call_function(held, (source,))
            node.replace_input_with(source, constant)
            changed = True
    return changed


def _statistic(graph: fx.Graph, root: fx.Node, kinds: dict[fx.Node, str]) -> set[fx.Node]:
    """The operations that compute ``root`` and whose results nothing else reads."""
    chain = {root}
    for node in reversed(list(graph.nodes)):
        if node in chain or node.op not in ("call_function", "call_method") or kinds.get(node) != "input":
            continue
        if node.users and all(user in chain for user in node.users) and _feeds(node, chain):
            chain.add(node)
    return chain


def hold_all(model_graph) -> None:
    """:func:`hold_statistics` on every graph of a :class:`lrpx.graph.ModelGraph`, and
    ``torch.addmm(b, x, w)`` of an activation ``x`` and constants as ``F.linear(x, w.t(), b)``
    (Hugging Face's ``Conv1D``) and a softmax in a given dtype as a softmax of the cast input,
    which the rewrite then makes layers; the edited modules are marked ``changed``."""
    from .rewrite import tags

    for name, graph in model_graph.items():
        kinds = tags(graph)
        if _addmm_as_linear(graph, kinds) | _softmax_cast(graph, kinds) | hold_statistics(graph, kinds):
            model_graph.changed.add(name)


_SOFTMAXES = {F.softmax: ("input", "dim", "_stacklevel", "dtype"), torch.softmax: ("input", "dim", "dtype")}


def _softmax_cast(graph: fx.Graph, kinds: dict[fx.Node, str]) -> bool:
    """``softmax(x, dim, dtype=d)`` of an activation as ``softmax(x.to(d), dim)`` (the same
    values: the input is cast first), which the rewrite then makes a softmax layer."""
    changed = False
    for node in list(graph.nodes):
        names = _SOFTMAXES.get(node.target) if node.op == "call_function" else None
        if names is None or len(node.args) > len(names):
            continue
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        dtype = bound.pop("dtype", None)
        bound.pop("_stacklevel", None)
        if dtype is None or set(bound) != {"input", "dim"} or kinds.get(bound["input"]) != "input" or \
                isinstance(bound["dim"], fx.Node):
            continue
        with graph.inserting_before(node):
            cast = graph.call_method("to", (bound["input"], dtype))
            new = graph.call_function(F.softmax, (cast,), {"dim": bound["dim"]})
        kinds[cast] = kinds[new] = "input"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    return changed


def _addmm_as_linear(graph: fx.Graph, kinds: dict[fx.Node, str]) -> bool:
    changed = False
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.addmm and len(node.args) == 3
                and not node.kwargs):
            continue
        bias, x, weight = node.args
        if kinds.get(x) != "input" or any(isinstance(v, fx.Node) and kinds.get(v) != "constant" for v in (bias, weight)):
            continue
        with graph.inserting_before(node):
            transposed = graph.call_method("t", (weight,))
            linear = graph.call_function(F.linear, (x, transposed, bias))
        kinds[transposed], kinds[linear] = "constant", "input"
        node.replace_all_uses_with(linear)
        graph.erase_node(node)
        changed = True
    return changed


def held_root(func, args: tuple, kwargs: dict):
    """At run time: a root applied to an activation, computed from the detached activation
    (``NotImplemented`` if ``func`` is no root of its first argument)."""
    if not args or not isinstance(args[0], Tensor):
        return NotImplemented
    negative_power = func in (torch.pow, _T.pow, _T.__pow__) and isinstance(args[1] if len(args) > 1 else None,
                                                                          (int, float)) and args[1] < 0
    if func not in ROOTS and not negative_power:
        return NotImplemented
    return func(args[0].detach(), *args[1:], **kwargs)


def _feeds(node: fx.Node, chain: set[fx.Node]) -> bool:
    return any(node in user.all_input_nodes for user in chain)
