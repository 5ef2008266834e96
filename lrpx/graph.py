"""The model graph that ``convert``'s passes read: the module tree with the graph of each
module's own forward, traced once.

``torch.fx`` traces one module at a time with every child call as one node
(:func:`trace_children_as_leaves`), so a graph shows how a module's forward code wires its
children and functional operations together: who reads each value (``node.users``) and how
often each child is called. The passes (BatchNorm folding, rewriting functional operations
into layers, ReLU fusion, sign analysis) edit and read these graphs instead of tracing again.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from .detection import UNTRACED
from .layers import copy_hooks

__all__ = ["ModelGraph", "TraceError", "trace_children_as_leaves", "chain_graph", "join"]


class TraceError(RuntimeError):
    """A module's forward code could not be traced by ``torch.fx``."""


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward code; every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_children_as_leaves(module: nn.Module) -> fx.Graph:
    """The graph of ``module``'s own forward, each submodule call one node."""
    tracer = _ChildrenAsLeaves()
    try:
        return tracer.trace(module)
    finally:
        # fx leaves the tracer in a reference cycle (closures of its patched calls); emptied,
        # it no longer keeps the traced module and its parameters alive until a cyclic gc
        vars(tracer).clear()


def chain_graph(sequential: nn.Sequential) -> fx.Graph:
    """The graph of an ``nn.Sequential``'s forward (each child reads the previous output),
    built without tracing."""
    graph = fx.Graph()
    value = graph.placeholder("input")
    for key in sequential._modules:
        value = graph.call_module(key, (value,))
    graph.output(value)
    return graph


def join(prefix: str, target: str) -> str:
    """The qualified name of ``target`` inside the module named ``prefix``."""
    return f"{prefix}.{target}" if prefix else target


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # ModuleList / ModuleDict have none


@dataclass
class ModelGraph:
    """The graphs of a model's modules by qualified name.

    ``graphs[name]`` is the graph of the forward of the module ``name`` (``""``: the root),
    each child call one node whose target is the child's name inside that module; modules
    without a graph are leaves, modules whose class has a twin of its own (replaced whole),
    containers without a forward, and (with ``trace=False``) every module but the exact
    ``nn.Sequential``s, whose graphs are built without tracing. ``changed`` holds the names of
    modules whose graph a pass edited (they become ``torch.fx.GraphModule``).
    """

    graphs: dict[str, fx.Graph] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: nn.Module, *, trace: bool = True, whole: tuple[type[nn.Module], ...] = ()) -> "ModelGraph":
        """Trace each module of ``model`` once (children of ``whole`` classes are not entered)."""
        result = cls()
        result._visit(model, "", trace, whole)
        return result

    def _visit(self, module: nn.Module, name: str, trace: bool, whole: tuple) -> None:
        children = list(module.named_children())
        if not children or (name and type(module) in whole):
            return
        if type(module) is nn.Sequential:
            self.graphs[name] = chain_graph(module)
        elif trace and _has_forward(module) and not isinstance(module, UNTRACED):
            self.graphs[name] = _trace(module, name)
        for child_name, child in children:
            self._visit(child, join(name, child_name), trace, whole)

    def calls(self) -> Counter[str]:
        """How many call nodes of all graphs name each module (by qualified name)."""
        return Counter(join(owner, node.target) for owner, graph in self.graphs.items()
                       for node in graph.nodes if node.op == "call_module")

    def items(self):
        """``(name, graph)`` pairs, parents before their children."""
        return self.graphs.items()

    def materialize(self, model: nn.Module) -> nn.Module:
        """Turn each ``changed`` module of ``model`` into a ``torch.fx.GraphModule`` that runs its
        edited graph, with the same children and the hooks the user registered on the module.
        Returns the root: ``model``, or its GraphModule if the root's own forward changed."""
        # deepest first, so a parent's GraphModule picks up its rewritten children
        for name in sorted(self.changed, key=lambda n: -n.count(".") - bool(n)):
            module = model.get_submodule(name) if name else model
            graph = self.graphs[name]
            graph.lint()
            gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
            gm.training = module.training
            copy_hooks(module, gm)
            if not name:
                return gm
            parent, _, field = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, field, gm)
        return model


def _trace(module: nn.Module, name: str) -> fx.Graph:
    try:
        return trace_children_as_leaves(module)
    except Exception as err:  # fx raises many types
        label = f"'{name}'" if name else "the model itself"
        raise TraceError(
            f"torch.fx cannot trace the forward of {label} ({type(module).__module__}.{type(module).__qualname__}): "
            f"{type(err).__name__}: {err}\nlrpx traces forward code to give functional operations such as "
            "`a + b` their LRP rule. Make that forward traceable, or pass trace=False to only swap layers "
            "(additions then keep their plain gradient, which does not conserve relevance)."
        ) from err
