"""Functional calls with weights (``F.linear``, ``F.conv*d``, ``F.layer_norm``, ``F.group_norm``,
eval-mode ``F.batch_norm``) in traced forward code, as the layers they compute.

The weights are the module's own parameters, shared with the new layer, or values the forward
computes from them alone (a weight-standardised convolution's standardised weight), computed
once when the model is converted and frozen.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["layer_from_call"]

#: functional layers with weights: ``{function: (parameter names, builder)}``, see :func:`layer_from_call`
_CONV = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}
_WEIGHTED_CALLS: dict = {
    F.linear: ("input", "weight", "bias"),
    **dict.fromkeys(_CONV, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    F.layer_norm: ("input", "normalized_shape", "weight", "bias", "eps"),
    F.group_norm: ("input", "num_groups", "weight", "bias", "eps"),
    F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)



def _evaluate(module: nn.Module, value):
    """The value of a graph argument computed from ``module``'s parameters, buffers and
    constants alone (a node tagged "constant")."""
    if not isinstance(value, fx.Node):
        return fx.node.map_aggregate(value, lambda v: _evaluate(module, v) if isinstance(v, fx.Node) else v)
    if value.op == "get_attr":
        owner, _, attr = value.target.rpartition(".")
        return getattr(module.get_submodule(owner) if owner else module, attr)
    args = fx.node.map_arg(value.args, lambda n: _evaluate(module, n))
    kwargs = fx.node.map_arg(value.kwargs, lambda n: _evaluate(module, n))
    with torch.no_grad():
        if value.op == "call_function":
            return value.target(*args, **kwargs)
        if value.op == "call_method":
            return getattr(args[0], value.target)(*args[1:], **kwargs)
        if value.op == "call_module":
            return module.get_submodule(value.target)(*args, **kwargs)
    raise ValueError(f"cannot evaluate {value.op} node {value.name}")


def _as_parameter(value) -> nn.Parameter | None:
    """A Parameter the module holds as it is, or a frozen one for a weight it computes."""
    if value is None or isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value.detach(), requires_grad=False)


def layer_from_call(module: nn.Module, node: fx.Node, kinds: dict[fx.Node, str]) -> nn.Module | None:
    """The layer a functional ``F.linear``/``F.conv*d``/``F.layer_norm``/``F.group_norm``/eval-mode
    ``F.batch_norm`` call computes, sharing the module's parameters (``None``: not such a call,
    or its weights depend on the input)."""
    names = _WEIGHTED_CALLS.get(node.target)
    if names is None or len(node.args) > len(names):
        return None
    bound = {**dict(zip(names, node.args)), **node.kwargs}
    if set(bound) - set(names) or not isinstance(bound.get("input"), fx.Node) or kinds[bound["input"]] != "input":
        return None
    if any(isinstance(v, fx.Node) and kinds[v] != "constant" for k, v in bound.items() if k != "input"):
        return None
    values = {k: _evaluate(module, v) for k, v in bound.items() if k != "input"}
    weight, bias = _as_parameter(values.get("weight")), _as_parameter(values.get("bias"))
    fn = node.target
    if fn is F.linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    elif fn in _CONV:
        groups = values.get("groups", 1)
        layer = _CONV[fn](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                          stride=values.get("stride", 1), padding=values.get("padding", 0),
                          dilation=values.get("dilation", 1), groups=groups, bias=bias is not None, device="meta")
    elif fn is F.layer_norm:
        if weight is None and bias is not None:
            return None
        layer = nn.LayerNorm(values["normalized_shape"], eps=values.get("eps", 1e-5),
                             elementwise_affine=weight is not None, bias=bias is not None, device="meta")
    elif fn is F.group_norm:
        if weight is None and bias is not None:
            return None
        groups = values["num_groups"]
        layer = nn.GroupNorm(groups, groups if weight is None else weight.numel(), eps=values.get("eps", 1e-5),
                             affine=weight is not None, device="meta")
        if weight is not None and bias is None:
            layer.bias = None
    else:  # batch_norm: in eval mode with running statistics, as the module's own BatchNorm class
        cls = next((c for c in _BATCHNORMS if isinstance(module, c)), None)
        if cls is None or values.get("training", False) or values.get("running_mean") is None:
            return None
        layer = cls(values["running_mean"].numel(), eps=values.get("eps", 1e-5), affine=weight is not None,
                    device="meta").eval()
        layer.running_mean, layer.running_var = values["running_mean"], values["running_var"]
        layer.num_batches_tracked = None
    if weight is not None:
        layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer
