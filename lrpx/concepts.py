r"""Concepts: which channels of a layer carry a decision, and where each of them looks
(Concept Relevance Propagation, Achtibat et al. 2023, "From attribution maps to
human-understandable explanations through Concept Relevance Propagation", Nature Machine
Intelligence).

* :func:`attribute`: conditional relevance. Each *condition* keeps, at one or more layers, only
  the relevance of chosen channels on its way down; one forward pass of the inputs, and every
  condition one row of a batched backward pass over it.
* :func:`channel_relevance`, :func:`top_concepts`: the relevance of each channel of a layer,
  and the channels that carry most of a prediction.
* :func:`sub_concepts`: the relevance that flows from one channel of a layer to the channels
  of a lower layer.

Semantics (the rules are linear in the incoming relevance once the forward is fixed, so
conditions on all channels of a layer sum to the unconditioned heatmap):

* A condition acts on the relevance that flows through the *output of the named module*.
  Relevance that bypasses the module, through a skip connection around it, is not masked: it
  reaches the input whatever the condition (condition the module after the sum, e.g. a whole
  ResNet block, to mask everything).
* ``recorded`` relevance of a module is the relevance that arrives at its output from above,
  *before* its own condition is applied (so a conditioned module reports every channel).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .explain import _check_input, _targets
from .record import Probes, forward_with_probes

__all__ = ["ConceptAttribution", "attribute", "channel_relevance", "top_concepts", "sub_concepts"]

Condition = Mapping[str, Sequence[int]]


@dataclass(frozen=True)
class ConceptAttribution:
    """The result of :func:`attribute`, for ``B`` inputs and ``N`` conditions.

    Attributes
    ----------
    relevance
        ``(B, N, ...)``: the conditional input relevance (heatmaps), one per input and condition.
    recorded
        ``{module name: (B, N, ...)}``: the relevance at the output of each recorded module.
    output
        ``(B, classes)``: the model's output on the inputs.
    target
        ``(B,)``: the explained classes.
    conditions
        The conditions, in order.
    """

    relevance: Tensor
    recorded: dict[str, Tensor]
    output: Tensor
    target: Tensor
    conditions: tuple[dict[str, tuple[int, ...]], ...]


def attribute(lrp_model: nn.Module, x: Tensor, target=None, *, conditions: Sequence[Condition] = ({},),
              record: Sequence[str] = (), channel_axis: int = 1, initial: str = "logit",
              batch_size: int = 8) -> ConceptAttribution:
    """Conditional relevance of ``x`` for the classes ``target`` under each condition.

    Parameters
    ----------
    lrp_model
        A model returned by :func:`lrpx.convert`.
    x
        ``(B, ...)`` inputs.
    target
        Class per input (an int, ``(B,)``) or ``None`` for the top class.
    conditions
        ``[{layer name: channels}, ...]``; ``{}`` is the unconditioned explanation; several
        layers in one condition give a path (the product of their masks).
    record
        Layers whose output relevance to return, under each condition.
    channel_axis
        The channel axis of the conditioned layers' outputs (1 for ``(B, C, ...)``).
    initial
        ``"logit"`` or ``"one_hot"``, as for :func:`lrpx.explain`.
    batch_size
        Rows (input x condition) per backward pass: the conditions run in passes of
        ``batch_size // B`` rows (at least one).

    Returns
    -------
    ConceptAttribution

    Notes
    -----
    The rules are linear in the relevance that arrives at a layer once the forward pass is
    fixed, so the model runs forward once on ``x``, and each condition is one row of a batched
    backward pass over that forward (``torch.func.vmap`` of ``torch.autograd.grad`` over the
    relevance at the output; every row applies its own channel masks where the probes of
    :mod:`lrpx.record` sit). Where that cannot work, the input is repeated once per condition
    along the batch (a forward and backward pass per ``batch_size`` rows, the same relevance)
    and a ``UserWarning`` says why: when the graph holds a custom ``torch.autograd.Function``
    that is not lrpx's own (inside a module kept as it is with ``twins={Module: None}``), whose
    backward may not take the rows of a batched pass, or when the batched backward pass raises.
    """
    _check_input(x)
    conditions = tuple({name: tuple(int(c) for c in channels) for name, channels in cond.items()}
                       for cond in conditions)
    if not conditions:
        raise ValueError("conditions must hold at least one condition ({} is the unconditioned one)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    result = _one_forward(lrp_model, x, target, conditions, record, channel_axis, initial, batch_size)
    if isinstance(result, ConceptAttribution):
        return result
    warnings.warn(f"lrpx.concepts.attribute repeats the input once per condition: {result}", UserWarning,
                  stacklevel=2)
    return _repeated(lrp_model, x, target, conditions, record, channel_axis, initial, batch_size)


def _repeated(lrp_model: nn.Module, x: Tensor, target, conditions: tuple, record: Sequence[str], channel_axis: int,
              initial: str, batch_size: int) -> ConceptAttribution:
    """Every condition one row of the batch: the input repeated, one forward and backward per
    ``batch_size`` rows."""
    if x.shape[0] * len(conditions) > batch_size:
        step = max(1, batch_size // x.shape[0])
        parts = [_repeated(lrp_model, x, target, conditions[i:i + step], record, channel_axis, initial,
                           max(batch_size, x.shape[0]))
                 for i in range(0, len(conditions), step)]
        return ConceptAttribution(torch.cat([p.relevance for p in parts], 1),
                                  {k: torch.cat([p.recorded[k] for p in parts], 1) for k in parts[0].recorded},
                                  parts[0].output, parts[0].target, conditions)
    batch, count = x.shape[0], len(conditions)
    layers = sorted({name for cond in conditions for name in cond})
    rows = {name: [cond.get(name) for _ in range(batch) for cond in conditions] for name in layers}
    probes = Probes(record=frozenset(record), conditions=rows, channel_axis=channel_axis)
    inputs = x.detach().repeat_interleave(count, 0).clone().requires_grad_(True)
    with torch.enable_grad():
        out = forward_with_probes(lrp_model, probes, inputs)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError("lrpx.concepts.attribute explains classifiers ((B, classes) outputs)")
        classes = _targets(target if target is None else _repeat(target, batch, count, out.device), out)
        r_out = torch.zeros_like(out).scatter_(1, classes[:, None], 1.0)
        if initial == "logit":
            r_out = r_out * out.detach()
        (relevance,) = torch.autograd.grad(out, inputs, grad_outputs=r_out)
    _warn_unreached(probes, layers, conditions, batch)
    recorded = {name: r.unflatten(0, (batch, count)) for name, r in probes.recorded().items()}
    return ConceptAttribution(relevance.unflatten(0, (batch, count)), recorded, out.detach()[::count],
                              classes[::count], conditions)


def _one_forward(lrp_model: nn.Module, x: Tensor, target, conditions: tuple, record: Sequence[str],
                 channel_axis: int, initial: str, batch_size: int) -> ConceptAttribution | str:
    """One forward of ``x``; the conditions are the rows of batched backward passes
    (``torch.func.vmap`` over the relevance at the output), ``batch_size // B`` rows a pass.
    Returns the reason instead where the graph holds a backward lrpx does not control."""
    batch, count = x.shape[0], len(conditions)
    layers = sorted({name for cond in conditions for name in cond})
    probes = Probes(record=frozenset(record), conditions={name: [c.get(name) for c in conditions] for name in layers},
                    channel_axis=channel_axis, per_pass=True)
    inputs = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = forward_with_probes(lrp_model, probes, inputs)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise TypeError("lrpx.concepts.attribute explains classifiers ((B, classes) outputs)")
        foreign = _foreign_function(out)
        if foreign is not None:
            return (f"the model's graph holds the autograd Function {foreign}, whose backward lrpx cannot batch "
                    "over the conditions")
        classes = _targets(target, out)
        r_out = torch.zeros_like(out).scatter_(1, classes[:, None], 1.0)
        if initial == "logit":
            r_out = r_out * out.detach()
        masks = {name: probes.pass_masks(name, probes.outputs[name]) for name in layers if name in probes.outputs}
        step = max(1, batch_size // batch)
        try:
            parts = [_batched_backward(out, inputs, r_out, probes, {k: m[i:i + step] for k, m in masks.items()},
                                       rows=min(step, count - i), retain=i + step < count)
                     for i in range(0, count, step)]
        except RuntimeError as err:  # an operation in the graph without a batched backward
            return f"a batched backward pass over the conditions failed ({err})"
    relevance = torch.cat([p[0] for p in parts]).transpose(0, 1).contiguous()
    recorded = {}
    for name in sorted(record):
        none = torch.zeros_like(probes.outputs[name])  # no relevance reached the module
        rows = [p[1][name] if name in p[1] else none.expand(len(p[0]), *none.shape) for p in parts]
        recorded[name] = torch.cat(rows).transpose(0, 1).contiguous()
    probes.kept = {name: torch.cat([p[2][name] for p in parts]).transpose(0, 1).reshape(-1) for name in parts[0][2]}
    _warn_unreached(probes, layers, conditions, batch)
    return ConceptAttribution(relevance, recorded, out.detach(), classes, conditions)


def _batched_backward(out: Tensor, inputs: Tensor, r_out: Tensor, probes: Probes, masks: dict[str, Tensor], *,
                      rows: int, retain: bool) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """``(relevance, recorded, kept)`` of one batched backward pass of ``rows`` rows, each the
    relevance of ``r_out`` under its row of every mask (``(rows, ...)``)."""
    names = list(masks)

    def row(r: Tensor, *row_masks: Tensor):
        probes.relevance.clear()
        probes.kept.clear()
        probes.row_masks.clear()
        probes.row_masks.update(zip(names, row_masks))
        (relevance,) = torch.autograd.grad(out, inputs, grad_outputs=r, retain_graph=retain)
        recorded = {name: value for name, value in probes.relevance.items() if name in probes.record}
        return relevance, recorded, dict(probes.kept)

    try:
        return torch.func.vmap(row)(r_out.expand(rows, *r_out.shape), *masks.values())
    finally:
        probes.row_masks.clear()


def _foreign_function(out: Tensor) -> str | None:
    """The name of the first custom autograd Function in the graph of ``out`` that is not
    lrpx's own (its backward may not take the rows of a batched pass), or None."""
    from .core import LRPFunction
    from .layers.sdpa import _Attention, _Biased
    from .oplevel import _Reported
    from .precision import _RelevanceTo
    from .record import Probe

    own = (LRPFunction, Probe, _Biased, _Attention, _RelevanceTo, _Reported)
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and not issubclass(cls, own):
            return f"{cls.__module__}.{cls.__qualname__}"
        stack.extend(fn for fn, _ in node.next_functions)
    return None


def _repeat(target, batch: int, count: int, device) -> Tensor:
    t = torch.as_tensor(target, device=device)
    t = t.expand(batch) if t.dim() == 0 else t
    return t.repeat_interleave(count)


def _warn_unreached(probes: Probes, layers: list[str], conditions, batch: int) -> None:
    """Say so when a condition lets no relevance through (one warning per layer)."""
    for name in layers:
        kept = probes.kept.get(name)
        if kept is None:
            warnings.warn(f"condition on {name!r}: no relevance reaches that layer (the explained score does not "
                          "depend on its output); the conditional heatmaps are zero", UserWarning, stacklevel=3)
            continue
        empty = [cond[name] for k, cond in enumerate(conditions)
                 if name in cond and bool((kept.view(batch, len(conditions))[:, k] == 0).all())]
        if empty:
            warnings.warn(f"{len(empty)} condition(s) on {name!r} keep channels that receive no relevance (e.g. "
                          f"{list(empty[0])}); their conditional heatmaps are zero", UserWarning, stacklevel=3)


def channel_relevance(relevance: Tensor, *, channel_axis: int = 1, batch_dims: int = 1) -> Tensor:
    """The relevance of each channel: ``relevance`` summed over every axis but the first
    ``batch_dims`` and ``channel_axis``; ``(*batch, C)``. For ``ConceptAttribution.recorded``
    (``(B, N, C, ...)``) pass ``channel_axis=2, batch_dims=2``."""
    axis = channel_axis % relevance.dim()
    if axis < batch_dims:
        raise ValueError(f"channel_axis {channel_axis} falls within the {batch_dims} batch axes")
    summed = [d for d in range(batch_dims, relevance.dim()) if d != axis]
    out = relevance.sum(summed) if summed else relevance
    return out


def top_concepts(lrp_model: nn.Module, x: Tensor, target=None, *, layer: str, k: int = 5,
                 channel_axis: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` channels of ``layer`` with the most relevance for each input's prediction.

    Returns ``(channels, relevance, share)``, each ``(B, k)``: the channel indices, their
    relevance and their share of the layer's total relevance.
    """
    from .explain import explain

    recorded = explain(lrp_model, x, target, record=[layer]).recorded[layer]
    per_channel = channel_relevance(recorded, channel_axis=channel_axis)
    if not 1 <= k <= per_channel.shape[-1]:
        raise ValueError(f"k must be between 1 and the {per_channel.shape[-1]} channels of {layer!r}, got {k}")
    values, channels = per_channel.topk(k, dim=-1)
    total = per_channel.sum(-1, keepdim=True)
    return channels, values, values / torch.where(total == 0, torch.ones_like(total), total)


def sub_concepts(lrp_model: nn.Module, x: Tensor, target=None, *, layer: str, channel: int, lower: str,
                 channel_axis: int = 1) -> Tensor:
    """The relevance that flows from ``channel`` of ``layer`` to each channel of the lower
    layer ``lower``: ``(B, C_lower)``."""
    result = attribute(lrp_model, x, target, conditions=[{layer: [channel]}], record=[lower],
                       channel_axis=channel_axis)
    return channel_relevance(result.recorded[lower][:, 0], channel_axis=channel_axis)
