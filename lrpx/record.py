"""Relevance at the outputs of named modules, and conditions on it, without hooks.

``convert`` keeps its model graph on the converted model. A forward with *probes* runs the
modules on the path to each named module through that graph (a ``torch.fx`` interpreter), and
puts an identity autograd Function (:class:`Probe`) on the named module's output: in the
backward pass the probe reads the relevance that arrives there from above and, with a
condition, keeps only the relevance of chosen channels on its way down. Everything a probe
records lives in the objects of one call, so two threads may record different modules of one
converted model at once; nothing on the model changes.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .graph import ModelGraph, join

__all__ = ["Probes", "forward_with_probes", "model_graph"]


@dataclass
class Probes:
    """What one forward-and-backward records and conditions.

    Attributes
    ----------
    record
        Names of the modules whose output relevance is recorded.
    conditions
        ``{name: channels per row}``: relevance through the output of ``name`` keeps only the
        listed channels (along ``channel_axis``) in each row of the batch; a row's ``None``
        keeps every channel.
    channel_axis
        The channel axis of the conditioned outputs.
    relevance
        Filled in the backward pass: ``{name: relevance at the output}``, before the mask
        (summed over the calls of a module called more than once).
    outputs
        Filled in the forward pass: ``{name: the module's output}`` (detached; its last call).
    kept
        Filled in the backward pass: ``{conditioned name: (rows,) magnitude of the relevance
        the condition let through}``.
    per_pass
        If true, the rows of ``conditions`` are the rows of a batched backward pass over one
        forward (``torch.func.vmap`` over the relevance at the output, see
        :func:`lrpx.concepts.attribute`), not rows of the batch: each pass row keeps its
        channels in every sample. The pass then sets ``row_masks``.
    row_masks
        ``{conditioned name: mask}`` while a batched backward pass runs: the masks of
        :meth:`pass_masks`, one per pass row (batched by ``vmap``).
    """

    record: frozenset[str] = frozenset()
    conditions: Mapping[str, Sequence[Sequence[int] | None]] = field(default_factory=dict)
    channel_axis: int = 1
    relevance: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    kept: dict[str, Tensor] = field(default_factory=dict)
    per_pass: bool = False
    row_masks: dict[str, Tensor] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.record) | set(self.conditions)

    def check(self, name: str, output: Tensor) -> None:
        """Channels within the output of ``name``, one channel list per row."""
        rows = self.conditions.get(name)
        if rows is None:
            return
        if not self.per_pass and len(rows) != output.shape[0]:
            raise ValueError(f"{len(rows)} condition rows for {name!r}, but its output has batch {output.shape[0]}")
        channels = output.shape[self.channel_axis]
        for row in rows:
            bad = [c for c in (row or ()) if not 0 <= c < channels]
            if bad:
                raise ValueError(f"channel {bad[0]} is out of range for {name!r}, whose output has {channels} channels "
                                 f"(0..{channels - 1}) along axis {self.channel_axis}")

    def mask(self, name: str, relevance: Tensor) -> Tensor | None:
        """The ``(rows, C, 1, ...)`` 0/1 mask of the condition on ``name``, or None (and None
        when the rows are those of a batched pass: :meth:`pass_masks`)."""
        rows = self.conditions.get(name)
        if rows is None or self.per_pass:
            return None
        axis = self.channel_axis % relevance.dim()
        shape = [len(rows)] + [1] * (relevance.dim() - 1)
        shape[axis] = relevance.shape[axis]
        return self._keep(rows, relevance.shape[axis], relevance).view(shape)

    def pass_masks(self, name: str, output: Tensor) -> Tensor:
        """``(rows, 1, ..., C, ..., 1)``: the 0/1 mask of the condition on ``name`` for each row
        of a batched backward pass, shaped to broadcast against ``output`` after the row axis."""
        rows = self.conditions[name]
        axis = self.channel_axis % output.dim()
        shape = [len(rows)] + [1] * output.dim()
        shape[axis + 1] = output.shape[axis]
        return self._keep(rows, output.shape[axis], output).view(shape)

    @staticmethod
    def _keep(rows: Sequence[Sequence[int] | None], channels: int, like: Tensor) -> Tensor:
        keep = torch.ones(len(rows), channels, dtype=like.dtype, device=like.device)
        for i, row in enumerate(rows):
            if row is not None:
                keep[i] = 0
                keep[i, list(row)] = 1
        return keep

    def recorded(self) -> dict[str, Tensor]:
        """The relevance at every recorded module; zeros where none arrived (the explained
        score does not depend on that module's output)."""
        return {name: self.relevance[name] if name in self.relevance else torch.zeros_like(self.outputs[name])
                for name in sorted(self.record)}


class Probe(torch.autograd.Function):
    """Identity in forward; in backward, records the relevance arriving at the output and
    applies the condition mask (per row of the batch, or per row of a batched backward pass:
    :attr:`Probes.row_masks`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output: Tensor, name: str, probes: Probes) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.name, ctx.probes = inputs[1], inputs[2]

    @staticmethod
    @once_differentiable
    def backward(ctx, relevance: Tensor):
        probes, name = ctx.probes, ctx.name
        if name in probes.record:
            previous = probes.relevance.get(name)
            probes.relevance[name] = relevance.clone() if previous is None else previous + relevance
        mask = probes.row_masks[name] if name in probes.row_masks else probes.mask(name, relevance)
        if mask is not None:
            relevance = relevance * mask
            kept = relevance.detach().abs().flatten(1).sum(1)
            probes.kept[name] = kept if name not in probes.kept else probes.kept[name] + kept
        return relevance, None, None


def model_graph(model: nn.Module) -> ModelGraph:
    """The model graph that ``lrpx.convert`` kept on a converted model."""
    graph = getattr(model, "lrpx_graph", None)
    if not isinstance(graph, ModelGraph):
        raise TypeError(f"recording relevance at layers needs a model returned by lrpx.convert (with its model "
                        f"graph), got {type(model).__name__}")
    return graph


def check_names(model: nn.Module, names: Sequence[str]) -> None:
    """Every name is a module of ``model`` whose parents all have a graph; else an error that
    suggests close names."""
    graph = model_graph(model)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
            raise ValueError(f"the model has no module named {name!r}" + (f"; close names: {close}" if close else ""))
        parents = [".".join(name.split(".")[:i]) for i in range(name.count(".") + 1)]
        missing = [p for p in parents if not _is_interpretable(modules, graph, p)]
        if missing:
            raise ValueError(f"cannot record or condition {name!r}: the forward of {missing[0] or 'the model'!r} "
                             f"({type(modules[missing[0]]).__name__}) calls it where lrpx cannot follow (inside a "
                             "twin, or in forward code that could not be traced)")


def _is_interpretable(modules: dict, graph: ModelGraph, name: str) -> bool:
    # a parent path may pass through a ModuleList/ModuleDict without forward: their children are
    # called by the graph of the module above, by their full dotted target
    return name in graph.graphs or type(modules[name]) in (nn.ModuleList, nn.ModuleDict)


def forward_with_probes(model: nn.Module, probes: Probes, *args, **kwargs):
    """``model(*args, **kwargs)`` with a :class:`Probe` on the output of every module that
    ``probes`` names. The model and the modules on the path to a named module run their
    graphs (their own forward hooks are not called); every other module runs as usual."""
    check_names(model, sorted(probes.names()))
    return _ProbingInterpreter(model, "", model_graph(model), probes).run(*args, **kwargs)


class _ProbingInterpreter(fx.Interpreter):
    """Runs one module's graph; descends into the children on the way to a probed module."""

    def __init__(self, module: nn.Module, name: str, graph: ModelGraph, probes: Probes) -> None:
        super().__init__(module, garbage_collect_values=True, graph=graph.graphs[name])
        self.name, self.model_graph, self.probes = name, graph, probes
        self.wanted = probes.names()

    def run(self, *args, **kwargs):
        if kwargs:  # a graph's placeholders by name
            names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
            args = tuple(args) + tuple(kwargs[n] for n in names[len(args):])
        return super().run(*args)

    def call_module(self, target: str, args, kwargs):
        qualified = join(self.name, target)
        submodule = self.fetch_attr(target)
        if any(w.startswith(qualified + ".") for w in self.wanted) and qualified in self.model_graph.graphs:
            output = _ProbingInterpreter(submodule, qualified, self.model_graph, self.probes).run(*args, **kwargs)
        else:
            output = submodule(*args, **kwargs)
        if qualified in self.wanted:
            if not isinstance(output, Tensor):
                raise TypeError(f"module {qualified!r} returns {type(output).__name__}; relevance can be recorded "
                                "at modules that return a tensor")
            self.probes.check(qualified, output)
            self.probes.outputs[qualified] = output.detach()
            output = Probe.apply(output, qualified, self.probes)
        return output
