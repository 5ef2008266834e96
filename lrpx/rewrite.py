"""Functional operations in forward code become layers that take a rule.

Tensor additions (ResNet's ``out += identity``) become :class:`lrpx.layers.Add`, products
:class:`lrpx.layers.Product`, ``F.relu``/``torch.sigmoid``/... activation layers,
``F.avg_pool2d``/``F.adaptive_avg_pool2d`` pooling layers, ``x.mean(dims)``
:class:`lrpx.layers.Mean` and ``F.softmax`` ``nn.Softmax``; ``F.linear``, ``F.conv*d``,
``F.layer_norm``, ``F.group_norm`` and eval-mode ``F.batch_norm`` with weights the module holds
(or computes from what it holds, as weight-standardised convolutions do) become the layers
they compute; ``torch.addcmul`` a product and a sum; in-place calls become out-of-place.
:func:`rewrite_functional` edits the graphs of a :class:`lrpx.graph.ModelGraph`; the modules
whose forward changed become ``torch.fx.GraphModule`` objects when the graph is materialised.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .graph import OUTPUT_KINDS, ModelGraph
from .ops import einsum_operands
from .calls import layer_from_call
from .statistics import held, is_division
from .layers import (Add, Interpolate, Matmul, Mean, Normalize, Product, ScaledDotProductAttention, Sum,
                     WeightMatmul)

__all__ = ["rewrite_functional", "RESHAPES", "CASTS", "tags"]

_ADDS = {operator.add, operator.iadd, torch.add}
_INPLACE_METHODS = {"add_": "add", "relu_": "relu", "mul_": "mul", "sigmoid_": "sigmoid", "clamp_": "clamp",
                    "hardtanh_": "hardtanh", "tanh_": "tanh"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax)
_MATMULS = {operator.matmul, torch.matmul, torch.bmm}
#: the parameters of ``F.scaled_dot_product_attention``, in order
_SDPA = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
#: tensor methods that cast (dtype, device)
CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16", "type_as"})
#: tensor methods that only reshape, view or repeat their input
RESHAPES = frozenset({"view", "reshape", "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "permute",
                      "transpose", "contiguous"})
_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
#: functional calls that become layers: ``{function: (module class, its arguments after the input)}``
_FUNCTIONS: dict = {
    F.relu: (nn.ReLU, ("inplace",)), torch.relu: (nn.ReLU, ()), F.relu6: (nn.ReLU6, ("inplace",)),
    F.gelu: (nn.GELU, ("approximate",)), F.silu: (nn.SiLU, ("inplace",)), F.mish: (nn.Mish, ("inplace",)),
    F.hardswish: (nn.Hardswish, ("inplace",)), F.hardsigmoid: (nn.Hardsigmoid, ("inplace",)),
    torch.sigmoid: (nn.Sigmoid, ()), F.sigmoid: (nn.Sigmoid, ()), torch.tanh: (nn.Tanh, ()), F.tanh: (nn.Tanh, ()),
    F.leaky_relu: (nn.LeakyReLU, ("negative_slope", "inplace")), F.elu: (nn.ELU, ("alpha", "inplace")),
    F.hardtanh: (nn.Hardtanh, ("min_val", "max_val", "inplace")), F.softplus: (nn.Softplus, ("beta", "threshold")),
    F.softmax: (nn.Softmax, ("dim", "_stacklevel", "dtype")), torch.softmax: (nn.Softmax, ("dim", "dtype")),
    F.avg_pool1d: (nn.AvgPool1d, _POOL_ARGS[:-1]), F.avg_pool2d: (nn.AvgPool2d, _POOL_ARGS),
    F.avg_pool3d: (nn.AvgPool3d, _POOL_ARGS), F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)), torch.mean: (Mean, ("dim", "keepdim", "dtype")),
    F.normalize: (Normalize, ("p", "dim", "eps", "out")), torch.sum: (Sum, ("dim", "keepdim", "dtype")),
}
#: the parameters of ``F.interpolate`` after the input, in order
_INTERPOLATE = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")
_METHODS: dict = {"relu": (nn.ReLU, ()), "sigmoid": (nn.Sigmoid, ()), "tanh": (nn.Tanh, ()),
                  "softmax": (nn.Softmax, ("dim", "dtype")), "mean": (Mean, ("dim", "keepdim", "dtype")),
                  "sum": (Sum, ("dim", "keepdim", "dtype"))}


def rewrite_functional(model: nn.Module, graph: ModelGraph) -> None:
    """Rewrite the functional operations in the forward code of every traced module of
    ``model`` into layers: the graphs are edited, the new layers become children of their
    modules (in place), and the edited modules are marked ``changed`` (see
    :meth:`lrpx.graph.ModelGraph.materialize`)."""
    for name, g in graph.items():
        module = model.get_submodule(name) if name else model
        if _rewrite_graph(module, g):
            graph.changed.add(name)


def _rewrite_graph(module: nn.Module, graph: fx.Graph) -> bool:
    """Edit ``graph`` (the forward of ``module``); whether anything changed."""
    changed = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
        if node.op == "call_method" and node.target in _INPLACE_METHODS:
            node.target = _INPLACE_METHODS[node.target]
            changed = True
    kinds = tags(graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.addcmul:
            _split_addcmul(graph, node)
            changed = True
        elif _is_sub(node) and any(isinstance(a, fx.Node) and kinds[a] == "input" for a in node.args):
            _split_sub(graph, node)
            changed = True
        elif _is_neg(node) and kinds[node.args[0]] == "input":  # -x: a constant factor
            _substitute(graph, node, operator.mul, (node.args[0], -1))
            changed = True
        elif _is_square(node) and kinds[node.args[0]] == "input":  # x ** 2: a product of two activations
            _substitute(graph, node, operator.mul, (node.args[0], node.args[0]))
            changed = True
    kinds = tags(graph)
    for node in list(graph.nodes):
        layer = layer_from_call(module, node, kinds) if node.op == "call_function" else None
        if layer is not None:
            new = _replace(module, graph, node, layer, (node.args[0] if node.args else node.kwargs["input"],))
            kinds[new] = "input"
            changed = True
            continue
        computed = node.args and isinstance(node.args[0], fx.Node) and kinds.get(node.args[0]) == "constant"
        layer = None if computed else _as_module(node)  # not what only parameters determine
        if layer is not None:
            kinds[_replace(module, graph, node, layer, (node.args[0],))] = "input"
            changed = True
        elif node.op == "call_function" and node.target is F.interpolate:
            changed = _rewrite_interpolate(module, graph, node) or changed
        elif node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            changed = _rewrite_attention(module, graph, node) or changed
    if changed:
        _drop_dead(graph)
    kinds = tags(graph)
    for node in list(graph.nodes):
        new = None
        if _is_product(node):
            new = _rewrite_product(module, graph, node, kinds)
        elif _is_matmul(node) and all(isinstance(a, fx.Node) and kinds[a] == "input" for a in node.args):
            new = _replace(module, graph, node, Matmul(), tuple(node.args))
        elif _is_matmul(node) and all(isinstance(a, fx.Node) for a in node.args) and \
                sorted(kinds[a] for a in node.args) == ["constant", "input"]:
            weight_first = kinds[node.args[0]] == "constant"
            new = _replace(module, graph, node, WeightMatmul(weight_first=weight_first), tuple(node.args))
        elif _einsum_factors(node, kinds):
            new = _replace(module, graph, node, Matmul(equation=node.args[0]), _einsum_factors(node, kinds))
        elif _is_add(node) and all(_is_number(a) or isinstance(a, fx.Node) and kinds[a] != "meta" for a in node.args) \
                and "input" in (kinds[a] for a in node.args if isinstance(a, fx.Node)):
            new = _replace(module, graph, node, Add(), tuple(_absorbing(graph, a, node) if isinstance(a, fx.Node)
                                                             and kinds[a] == "constant" else a for a in node.args))
        if new is not None:
            kinds[new] = kinds[node]
            changed = True
    return changed


def constant_share(value):
    """A constant operand of a sum (a position embedding, a bias computed from parameters) as
    the sum's rule sees it: it takes its share of the relevance like a bias, and the share
    stays there rather than flowing back into the computation that made it."""
    return value.detach() if isinstance(value, Tensor) else value


def _absorbing(graph: fx.Graph, value: fx.Node, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        return graph.call_function(constant_share, (value,))


def _replace(module: nn.Module, graph: fx.Graph, node: fx.Node, layer: nn.Module, args: tuple,
             kwargs: dict | None = None) -> fx.Node:
    """Put a call of the new child ``layer`` of ``module`` in place of ``node``."""
    name = node.name
    while hasattr(module, name):
        name = f"{name}_"
    module.add_module(name, layer)
    with graph.inserting_after(node):
        new = graph.call_module(name, args, kwargs or {})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _drop_dead(graph: fx.Graph) -> None:
    """Erase the computations from parameters alone that nothing reads any more (a rewritten
    call's weight arithmetic); calls on values from the input stay (``p.extend(...)`` on a
    list argument reads as unused but changes the list)."""
    kinds = tags(graph)
    for node in reversed(list(graph.nodes)):
        if node.users or node.is_impure():
            continue
        if node.op == "get_attr" or (node.op in ("call_function", "call_method") and kinds[node] == "constant"):
            graph.erase_node(node)


def _split_addcmul(graph: fx.Graph, node: fx.Node) -> None:
    """``torch.addcmul(a, b, c, value=v)`` as ``a + (b * c) * v``: a product and a sum, which the
    rewrite then turns into layers."""
    names = ("input", "tensor1", "tensor2")
    bound = {**dict(zip(names, node.args)), **node.kwargs}
    value = bound.get("value", 1)
    with graph.inserting_before(node):
        product = graph.call_function(operator.mul, (bound["tensor1"], bound["tensor2"]))
        if value != 1:
            product = graph.call_function(operator.mul, (product, value))
        total = graph.call_function(operator.add, (bound["input"], product))
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def _rewrite_interpolate(module: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    """``F.interpolate(x, ...)`` as an :class:`Interpolate` layer; the size and scale may be
    computed at run time (they become arguments of the layer's forward), the mode and flags
    must be constants."""
    if not node.args or len(node.args) - 1 > len(_INTERPOLATE):
        return False
    bound = dict(zip(_INTERPOLATE, node.args[1:]))
    bound.update(node.kwargs)
    if set(bound) - set(_INTERPOLATE):
        return False
    flags = {k: bound.get(k, default) for k, default in
             (("mode", "nearest"), ("align_corners", None), ("recompute_scale_factor", None), ("antialias", False))}
    if any(isinstance(v, fx.Node) for v in flags.values()):
        return False
    runtime = {k: bound[k] for k in ("size", "scale_factor") if bound.get(k) is not None}
    _replace(module, graph, node, Interpolate(**flags), (node.args[0],), runtime)
    return True


def _call_args(node: fx.Node, names: tuple[str, ...]) -> dict | None:
    """The arguments after the input by name, or None if one is computed at run time."""
    if len(node.args) - 1 > len(names) or not node.args:
        return None
    bound = dict(zip(names, node.args[1:]))
    bound.update(node.kwargs)
    if any(isinstance(v, fx.Node) for v in bound.values()) or set(bound) - set(names):
        return None
    return bound


def _as_module(node: fx.Node) -> nn.Module | None:
    """The module equal to a functional activation, pooling or mean call; None if none."""
    if node.op == "call_function":
        spec = _FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        spec = _METHODS.get(node.target)
    else:
        return None
    if spec is None:
        return None
    cls, names = spec
    bound = _call_args(node, names)
    if bound is None or bound.pop("dtype", None) is not None or bound.pop("out", None) is not None:
        return None
    for ignored in ("inplace", "_stacklevel"):
        bound.pop(ignored, None)
    if cls in (Mean, Sum) and bound.get("dim", None) is None and "dim" in bound:
        bound.pop("dim")
    return cls(**bound)


def tags(graph: fx.Graph, sizes: frozenset | set = frozenset()) -> dict[fx.Node, str]:
    """"input" for values computed from the forward's inputs, "meta" for sizes read off
    them (``x.shape``) and for the arguments named in ``sizes`` (which the callers pass sizes
    to), "constant" for parameters, buffers and what only they determine."""
    found_tags: dict[fx.Node, str] = {}
    parts: dict[fx.Node, tuple | list] = {}  # calls of modules whose outputs hold sizes, and their parts
    for node in graph.nodes:
        if node.op == "call_module" and OUTPUT_KINDS in node.meta:
            parts[node] = node.meta[OUTPUT_KINDS]
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in parts and \
                isinstance(node.args[1], int) and -len(parts[node.args[0]]) <= node.args[1] < len(parts[node.args[0]]):
            part = parts[node.args[0]][node.args[1]]
            if isinstance(part, (tuple, list)):
                parts[node] = part
            found_tags[node] = "meta" if part == "meta" else found_tags[node.args[0]]
        elif node.op == "placeholder":
            found_tags[node] = "meta" if node.target in sizes else "input"
        elif node.op == "get_attr" or (node.op == "call_function" and node.target is held):
            found_tags[node] = "constant"  # a statistic held constant: lrpx.statistics
        elif (node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim")) or \
                (node.op == "call_method" and node.target in ("size", "dim")):
            found_tags[node] = "meta"
        else:
            found = {found_tags[n] for n in node.all_input_nodes}
            kinds = ("input",) if node.op == "call_module" else ("input", "meta")  # a module gives tensors
            found_tags[node] = next((k for k in kinds if k in found), "constant")
            if found_tags[node] == "meta" and node.op in ("call_method", "call_function") and node.args and \
                    found_tags.get(node.args[0]) == "constant":  # a constant tensor shaped or sliced by sizes
                found_tags[node] = "constant"
    return found_tags


def _einsum_factors(node: fx.Node, kinds: dict) -> tuple[fx.Node, fx.Node] | None:
    """The two operands of ``torch.einsum(equation, a, b)`` (or ``(equation, [a, b])``) when
    both are values from the input: a bilinear product."""
    operands = None if node.op != "call_function" or node.target is not torch.einsum or node.kwargs \
        else einsum_operands(node.args)
    if operands is not None and len(operands) == 2 and all(isinstance(a, fx.Node) and kinds[a] == "input" for a in operands):
        return operands
    return None


def _is_matmul(node: fx.Node) -> bool:
    is_matmul = (node.op == "call_function" and node.target in _MATMULS) or \
                (node.op == "call_method" and node.target in ("matmul", "bmm"))
    return is_matmul and len(node.args) == 2 and not node.kwargs


def _rewrite_attention(module: nn.Module, graph: fx.Graph, node: fx.Node) -> bool:
    """``F.scaled_dot_product_attention(q, k, v, ...)`` as a :class:`ScaledDotProductAttention`
    layer (its other arguments, the mask above all, may be computed at run time)."""
    if len(node.args) > len(_SDPA):
        return False
    bound = {**dict(zip(_SDPA, node.args)), **node.kwargs}
    if set(bound) - set(_SDPA) or len(bound) < 3:
        return False
    operands = tuple(bound.pop(k) for k in _SDPA[:3])
    _replace(module, graph, node, ScaledDotProductAttention(), operands, bound)
    return True


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SUBS = {operator.sub, operator.isub, torch.sub}


def _is_sub(node: fx.Node) -> bool:
    is_sub = (node.op == "call_function" and node.target in _SUBS) or \
             (node.op == "call_method" and node.target == "sub")
    return is_sub and len(node.args) == 2 and not node.kwargs


def _is_neg(node: fx.Node) -> bool:
    is_neg = (node.op == "call_function" and node.target in (operator.neg, torch.neg)) or \
             (node.op == "call_method" and node.target == "neg")
    return is_neg and len(node.args) == 1 and isinstance(node.args[0], fx.Node) and not node.kwargs


def _is_square(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs:
        return False
    if (node.op == "call_function" and node.target is torch.square) or \
            (node.op == "call_method" and node.target == "square"):
        return len(node.args) == 1
    is_pow = (node.op == "call_function" and node.target in (operator.pow, torch.pow)) or \
             (node.op == "call_method" and node.target == "pow")
    return is_pow and len(node.args) == 2 and node.args[1] == 2


def _substitute(graph: fx.Graph, node: fx.Node, target, args: tuple) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _split_sub(graph: fx.Graph, node: fx.Node) -> None:
    """``a - b`` as ``a + b * -1``: a sum (the Norm rule splits relevance between ``a`` and
    ``-b``) and a constant factor, which the rewrite then turns into layers."""
    a, b = node.args
    with graph.inserting_before(node):
        negative = -b if _is_number(b) else graph.call_function(operator.mul, (b, -1))
        total = graph.call_function(operator.add, (a, negative))
    node.replace_all_uses_with(total)
    graph.erase_node(node)


def _is_add(node: fx.Node) -> bool:
    is_add = (node.op == "call_function" and node.target in _ADDS) or \
             (node.op == "call_method" and node.target == "add")
    return is_add and len(node.args) == 2 and not node.kwargs


def _is_product(node: fx.Node) -> bool:
    is_product = (node.op == "call_function" and node.target in _PRODUCTS) or \
                 (node.op == "call_method" and node.target == "mul")
    return (is_product and len(node.args) == 2 and not node.kwargs) or is_division(node)


def _rewrite_product(module: nn.Module, graph: fx.Graph, node: fx.Node, kinds: dict[fx.Node, str]) -> fx.Node | None:
    divide = is_division(node)
    signal = [isinstance(a, fx.Node) and kinds[a] == "input" for a in node.args]
    if not any(signal) or (divide and signal[1]):
        return None  # nothing from the input (lrpx.statistics holds a divisor from it constant)
    if all(signal):
        gates = [_is_gate(module, a) for a in node.args]
        index = gates.index(False) if gates.count(False) == 1 else None
    else:
        index = signal.index(True)
    return _replace(module, graph, node, Product(index, divide), tuple(node.args))


def _is_gate(module: nn.Module, node: fx.Node) -> bool:
    """A value squashed into a gate: the output of a sigmoid-like activation, possibly reshaped."""
    while (node.op == "call_method" and node.target in RESHAPES) or \
            (node.op == "call_function" and node.target is operator.getitem):  # g[:, :, None, None]
        node = node.args[0]
    return node.op == "call_module" and isinstance(module.get_submodule(node.target), _GATES)
