"""The model graph that ``convert``'s passes read: the module tree with the graph of each
module's own forward, traced once.

``torch.fx`` traces one module at a time with every child call as one node
(:func:`trace_children_as_leaves`), so a graph shows how a module's forward code wires its
children and functional operations together: who reads each value (``node.users``) and how
often each child is called. The passes (BatchNorm folding, rewriting functional operations
into layers, ReLU fusion, sign analysis) edit and read these graphs instead of tracing again.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx
import torch.fx._symbolic_trace as _symbolic_trace
import torch.utils._pytree as pytree
from torch import nn

from .detection import UNTRACED

#: ``fx.Node.meta`` key of a call of a traced module: the kinds of the parts of its output
OUTPUT_KINDS = "lrpx_output_kinds"
from .layers import copy_hooks

__all__ = ["ModelGraph", "TraceError", "trace_children_as_leaves", "chain_graph", "join"]


class TraceError(RuntimeError):
    """A module's forward code could not be traced by ``torch.fx``."""


class _ChildrenAsLeaves(fx.Tracer):
    """Traces one module's own forward code; every submodule call stays one node."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def trace_children_as_leaves(module: nn.Module, constants: dict | None = None) -> fx.Graph:
    """The graph of ``module``'s own forward, each submodule call one node.

    ``constants`` fixes arguments of the forward after the first to the given values (say
    ``shortcut=None``): the code runs the branch those values take, and the graph checks at
    run time that it is called with them (an ``AssertionError`` that names the argument).
    """
    with _inlined(type(module).__module__):
        return _trace_once(module, constants)


def _trace_once(module: nn.Module, constants: dict | None) -> fx.Graph:
    tracer = _ChildrenAsLeaves()
    try:
        if not constants:
            return tracer.trace(module)
        graph = tracer.trace(module, concrete_args=dict(constants))
        _plain_signature(graph, module, constants)
        return graph
    finally:
        # fx leaves the tracer in a reference cycle (closures of its patched calls); emptied,
        # it no longer keeps the traced module and its parameters alive until a cyclic gc
        vars(tracer).clear()


@contextlib.contextmanager
def _inlined(module_name: str):
    """Trace into the functions that the module's own source file marks ``torch.fx.wrap`` (kept
    as one opaque call otherwise, as torchvision's ``shifted_window_attention``), so that the
    operations inside them get their rules, or fail (they branch on sizes, which is why they
    are wrapped) and leave the module to rules at run time; other files' wrapped functions
    stay calls."""
    table = _symbolic_trace._wrapped_fns_to_patch
    own = {key: value for key, value in table.items() if value.get("__name__") == module_name}
    for key in own:
        del table[key]
    try:
        yield
    finally:
        table.update(own)


def _plain_signature(graph: fx.Graph, module: nn.Module, constants: dict) -> None:
    """Give a graph traced with fixed arguments the forward's own signature back (fx renames
    the arguments and flattens them through pytrees, which drops their defaults)."""
    info = getattr(graph._codegen, "pytree_info", None)
    params = list(inspect.signature(module.forward).parameters.values())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, param in zip(placeholders, params):
        node.target = param.name
        default = constants.get(param.name, param.default)
        node.args = () if default is inspect.Parameter.empty else (default,)
    if info is not None and info.out_spec is not None:
        out = graph.output_node()
        out.args = (pytree.tree_unflatten(list(out.args[0]), info.out_spec),)
    graph._codegen = fx.graph.CodeGen()


#: argument values a forward may be specialised to
_CONSTANTS = (type(None), bool, int, float, str)


def _fixed_arguments(module: nn.Module, sites: list[fx.Node]) -> dict | None:
    """The arguments after the first that every call of ``module`` (``sites``, the call nodes
    in its callers' graphs; none: the defaults) passes as the same constant or leaves at their
    default (``None``, a flag): tracing with them fixed takes the branch the model takes. ``None`` if the forward
    takes ``*args``/``**kwargs`` or a call cannot be bound to its signature."""
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if not params or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    values: dict[str, list] = {p.name: [] for p in params[1:]}
    for site in sites or [None]:  # no call known: the defaults
        try:
            given = {} if site is None else signature.bind(*site.args, **site.kwargs).arguments
        except TypeError:
            return None
        for p in params[1:]:
            values[p.name].append(given.get(p.name, p.default))
    fixed = {}
    for name, seen in values.items():
        first = seen[0] if seen else None
        if seen and type(first) in _CONSTANTS and all(type(v) is type(first) and v == first for v in seen):
            fixed[name] = first
    return fixed


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


def _optional(module: nn.Module) -> bool:
    """Whether ``module``'s forward has an argument with a default value."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return True
    return any(p.default is not inspect.Parameter.empty for p in params)


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

    #: the class of each traced module (before it becomes a ``GraphModule``)
    classes: dict[str, type] = field(default_factory=dict)
    #: torch layers without a twin whose forward could not be traced: ``{name: reason}``
    untraced: dict[str, str] = field(default_factory=dict)
    #: modules whose forward could not be traced (or rebuilt): their operations take their
    #: rules at run time (:mod:`lrpx.oplevel`); ``{name: reason}``
    oplevel: dict[str, str] = field(default_factory=dict)
    #: the call nodes of each module in its callers' graphs
    sites: dict[str, list[fx.Node]] = field(default_factory=dict)
    #: the kinds of batch for which :func:`lrpx.text_inputs.check_same_forward` found the converted model,
    #: with its own input embedding, to compute the same logits from embeddings as from ids
    verified: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, model: nn.Module, *, trace: bool = True, whole: tuple[type[nn.Module], ...] = (),
              known: frozenset | set = frozenset()) -> "ModelGraph":
        """Trace each module of ``model`` once (children of ``whole`` classes are not entered;
        leaves are traced only if their class is not ``known``)."""
        result = cls()
        result._visit(model, "", trace, whole, known, result.sites)
        result._annotate_outputs()
        return result

    def _annotate_outputs(self) -> None:
        """Mark each call of a traced module with which parts of its output are sizes (ViT-like
        patch embeddings return ``x, (height, width)``), so that its callers' code can tell the
        sizes it unpacks from tensors (``rewrite.tags``)."""
        from .rewrite import tags

        for name in sorted(self.graphs, key=lambda n: -n.count(".") - bool(n)):  # children first
            graph = self.graphs[name]
            kinds = tags(graph)
            out = next(n for n in reversed(graph.nodes) if n.op == "output")
            parts = fx.node.map_aggregate(out.args[0], lambda v: kinds.get(v, "input") if isinstance(v, fx.Node)
                                          else "constant")
            if isinstance(parts, (tuple, list)) and "meta" in pytree.tree_leaves(parts):
                for site in self.sites.get(name, []):
                    site.meta[OUTPUT_KINDS] = parts

    def _visit(self, module: nn.Module, name: str, trace: bool, whole: tuple, known, sites: dict) -> None:
        self.classes[name] = type(module)
        children = list(module.named_children())
        if name and type(module) in whole:
            return
        # called only by code with rules at run time: its arguments are not known here, so it is
        # traced with free arguments or takes its rules at run time too
        free = bool(name) and name.rpartition(".")[0] in self.oplevel and not sites.get(name)
        if free and trace and _has_forward(module) and _optional(module) and \
                (children or type(module) not in known) and not isinstance(module, UNTRACED):
            # a trace would take one side of each `if argument is None` for all calls
            self.oplevel[name] = (f"'{name}' ({type(module).__qualname__}) has optional arguments and is called by code "
                                  "with rules at run time: its rules are applied at run time too")
            for child_name, child in children:
                self._visit(child, join(name, child_name), trace, whole, known, sites)
            return
        if not children:  # a leaf: traced if its class is unknown, to rewrite what its forward does
            if trace and name and type(module) not in known and _has_forward(module):
                try:
                    self.graphs[name] = _trace(module, name, sites.get(name, []), free=free)
                except TraceError as err:
                    reason = str(err.__cause__ or err).splitlines()[0]
                    if type(module).__module__.startswith("torch."):  # a torch layer (LSTM): one fused kernel
                        self.untraced[name] = reason
                    else:  # its operations take their rules at run time
                        self.oplevel[name] = reason
            return
        if type(module) is nn.Sequential:
            self.graphs[name] = chain_graph(module)
        elif trace and _has_forward(module) and not isinstance(module, UNTRACED):
            try:
                self.graphs[name] = _trace(module, name, sites.get(name, []), free=free)
            except TraceError as err:
                self.oplevel[name] = str(err).splitlines()[0]
        for node in self.graphs[name].nodes if name in self.graphs else ():
            if node.op == "call_module":
                sites.setdefault(join(name, node.target), []).append(node)
        for child_name, child in children:
            self._visit(child, join(name, child_name), trace, whole, known, sites)

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
        Returns the root: ``model``, or its GraphModule if the root's own forward changed.

        A module whose GraphModule cannot be built (an attribute fx cannot copy) keeps its own
        forward, with rules at run time (``oplevel``), and so do the modules inside it: its
        code may call their other methods (timm's ``rope.get_embed``)."""
        originals: dict[str, nn.Module] = {}
        failed: list[str] = []
        root = model
        # deepest first, so a parent's GraphModule picks up its rewritten children
        for name in sorted(self.changed, key=lambda n: -n.count(".") - bool(n)):
            module = model.get_submodule(name) if name else model
            graph = self.graphs[name]
            graph.lint()
            try:
                gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
            except Exception as err:  # noqa: BLE001 - an attribute fx cannot copy: rules at run time
                self.oplevel[name] = (f"the traced forward of '{name}' ({type(module).__qualname__}) cannot be "
                                      f"rebuilt: {type(err).__name__}: {err}")
                failed.append(name)
                continue
            gm.training = module.training
            copy_hooks(module, gm)
            originals[name] = module
            if not name:
                root = gm
                continue
            parent, _, field = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, field, gm)
        inside = sorted((n for n in originals if any(_within(n, f) for f in failed)), key=lambda n: n.count("."))
        for name in inside:  # top down, on the restored parents
            parent, _, field = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, field, originals[name])
        return model if "" in failed else root


def _within(name: str, outer: str) -> bool:
    return outer == "" or name.startswith(outer + ".")


def _trace(module: nn.Module, name: str, sites: list[fx.Node], *, free: bool = False) -> fx.Graph:
    """The graph of ``module``, its arguments fixed to the constants its callers pass (the
    model's root, called by the user, is traced with free arguments where it can be; ``free``:
    only with free arguments)."""
    fixed = _fixed_arguments(module, sites) if sites else None
    try:
        if fixed is None:
            try:
                return trace_children_as_leaves(module)
            except Exception:  # noqa: BLE001 - retried with the defaults, which raises its own error
                fixed = None if free else _fixed_arguments(module, [])
                if not fixed:
                    raise
        return trace_children_as_leaves(module, fixed)
    except Exception as err:  # fx raises many types
        label = f"'{name}'" if name else "the model itself"
        raise TraceError(
            f"torch.fx cannot trace the forward of {label} ({type(module).__module__}.{type(module).__qualname__}): "
            f"{type(err).__name__}: {err}\nlrpx traces forward code to give functional operations such as "
            "`a + b` their LRP rule. Make that forward traceable, or pass trace=False to only swap layers "
            "(additions then keep their plain gradient, which does not conserve relevance)."
        ) from err
