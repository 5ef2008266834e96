"""``convert``: a copy of a model whose backward pass computes LRP relevance.

The conversion is a fixed sequence of passes over one model graph
(:class:`lrpx.graph.ModelGraph`, each module traced at most once):

1. copy the model (unless ``inplace``), put it in eval mode and give torchvision's detection
   modules their routing classes (:func:`lrpx.detection.adopt`);
2. check that every leaf has a twin or is kept (:class:`UnsupportedModuleError`);
3. canonize: trace, fold BatchNorms, rewrite functional operations into layers
   (:mod:`lrpx.canonizers`, :mod:`lrpx.rewrite`);
4. check the parameters of modules without a twin (used only where relevance is absorbed);
5. ask the composite for a rule per layer and swap each layer for its twin;
6. fuse ReLUs into the layers before them (:mod:`lrpx.fusion`);
7. materialise the edited forwards as ``torch.fx.GraphModule`` objects;
8. mark the twins whose inputs are ``>= 0`` by construction (:mod:`lrpx.signs`).
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.fx as fx
from torch import nn

from .canonizers import canonize_graph
from .composites import Composite
from .detection import adopt
from .fusion import fuse_relus
from .graph import ModelGraph
from .layers import Twin, registry
from .rewrite import tags
from .routing import ROUTING_FUNCTIONS, ROUTING_METHODS, unrouted
from .oplevel import OpRules
from .rules import Epsilon, Rule
from .signs import mark_nonnegative_inputs

__all__ = ["convert", "rule_table", "UnsupportedModuleError"]


class UnsupportedModuleError(TypeError):
    """The model holds layers lrpx has no twin for.

    ``modules`` lists them as ``(qualified name, class)`` pairs (``""`` is the model itself).
    """

    def __init__(self, modules: list[tuple[str, type]], reasons: list[str] | None = None) -> None:
        self.modules = list(modules)
        self.reasons = list(reasons or [])
        lines = "\n".join(f"  '{name or '<root>'}' ({cls.__module__}.{cls.__qualname__})" for name, cls in modules)
        why = "".join(f"\n  {reason}" for reason in self.reasons)
        super().__init__(
            "lrpx has no LRP twin for these modules:\n" + lines + why + "\n"
            "Register one per class: lrpx.convert(model, composite, twins={YourModule: YourTwin}) where "
            "YourTwin subclasses YourModule and lrpx.layers.Twin (see the README, 'Custom layers'), "
            "or map a class to None to keep it as it is (its plain gradient then carries the relevance)."
        )

    def __reduce__(self):
        return type(self), (self.modules, self.reasons)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def convert(
    model: nn.Module,
    composite: Composite | None = None,
    *,
    inplace: bool = False,
    trace: bool = True,
    twins: dict[type[nn.Module], type[nn.Module] | None] | None = None,
    fuse: bool = True,
) -> nn.Module:
    """Return a model that computes ``model``'s forward and whose gradient is LRP relevance.

    Parameters
    ----------
    model
        Any ``nn.Module``; left unchanged unless ``inplace``.
    composite
        Which rule each layer gets; ``None`` means ``Composite()``: ``Epsilon(1e-6)`` on every
        weighted layer and the default rule of every other kind.
    inplace
        Convert ``model`` itself instead of a deep copy (its layers are replaced).
    trace
        Trace forward code with ``torch.fx`` so that tensor additions get the ``Norm`` rule.
        ``False`` only swaps layers (additions keep their plain gradient).
    twins
        Extra ``{module class: twin class}`` entries (``None`` keeps a layer as it is), on top
        of :func:`lrpx.layers.default_twins`. A twin class subclasses ``lrpx.layers.Twin`` and
        declares its ``lrp_kind``.
    fuse
        Let a Linear/Conv/BatchNorm layer or a residual sum whose output only a ReLU reads
        apply that ReLU in place (the ReLU becomes :class:`lrpx.layers.FusedReLU`, or leaves the
        traced forward code): the same forward and relevance with less memory and time. The
        relevance of units with a non-positive pre-activation is then zero, as it is without
        fusing unless a Flat or WSquare layer follows. ``False`` keeps every layer separate.

    Returns
    -------
    nn.Module
        The converted model, in eval mode. Hooks registered on the model's modules are kept
        (on copies of their dictionaries); modules that hold hooks are not folded or fused.
        Its attribute ``lrpx_graph`` holds the model graph, for relevance at named layers
        (``lrpx.explain(..., record=...)``, :mod:`lrpx.concepts`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if composite is not None and not isinstance(composite, Composite):
        raise TypeError(f"composite must be an lrpx.Composite (e.g. lrpx.composites.epsilon_plus()), "
                        f"got {type(composite).__name__}")
    _check_attention_implementations(model)
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    adopt(target)  # torchvision's detection modules: see lrpx.detection
    twins = registry(twins, target)
    opened = _check_leaves(target, twins, trace)  # before tracing can fail on them
    target, graph = canonize_graph(target, twins, trace=trace)
    _check_opened(graph, opened, target)
    _check_parameters(target, twins, graph)
    composite = composite or Composite()
    table = composite.table(target, twins)
    _swap(target, table, twins)
    if fuse:
        fuse_relus(target, graph)
    target = graph.materialize(target)
    _rules_at_run_time(target, graph, composite)
    mark_nonnegative_inputs(target, graph)
    target.lrpx_graph = graph  # for relevance at named layers (lrpx.record)
    return target.eval()


_OPLEVEL_CLASSES: dict[type, type] = {}


def _rules_at_run_time(model: nn.Module, graph: ModelGraph, composite: Composite) -> None:
    """Give each module whose forward could not be traced a class that runs that forward with
    its operations under their rules (:class:`lrpx.oplevel.OpRules`): the composite's rule of
    each kind of layer."""
    rules = dict(composite.kinds)
    rules.setdefault("weighted", Epsilon())
    for name in graph.oplevel:
        module = model.get_submodule(name) if name else model
        own = _rule_by_class(composite, module)
        cls = type(module)
        if cls not in _OPLEVEL_CLASSES:
            @functools.wraps(cls.forward)  # its signature too: callers read it (position_ids, generate)
            def forward(self, *args, _forward=cls.forward, **kwargs):
                if not torch.is_grad_enabled():  # no rule applies: the operations run as they are
                    return _forward(self, *args, **kwargs)
                with OpRules(self.lrpx_rules, type(self).__qualname__):
                    return _forward(self, *args, **kwargs)
            _OPLEVEL_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                                "__qualname__": cls.__qualname__})
        module.__class__ = _OPLEVEL_CLASSES[cls]
        module.lrpx_rules = rules if own is None else {**rules, "weighted": own}


def _rule_by_class(composite: Composite, module: nn.Module) -> Rule | None:
    """The rule of the first composite entry that names a class ``module`` is an instance of
    (timm's ``Conv2dSame`` is a ``Conv2d``), if it fits weighted layers."""
    for matcher, rule in composite.rules:
        classes = matcher if isinstance(matcher, tuple) else (matcher,)
        if all(isinstance(c, type) for c in classes) and isinstance(module, classes) and rule.fits("weighted"):
            return rule
    return None


def _swap(model: nn.Module, table: dict[str, Rule], twins: dict) -> None:
    """Put each layer's twin in its place; a layer shared by several names with one rule stays
    one (shared) twin."""
    made: dict[tuple[int, Rule], nn.Module] = {}
    for name, rule in table.items():
        module = model.get_submodule(name)
        twin_cls = twins.get(type(module))
        if twin_cls is None:  # already a twin, or kept by the user's registry
            if isinstance(module, Twin) and type(module) not in twins:
                raise ValueError(f"'{name}' is already an LRP twin: convert the original model, not a converted one")
            continue
        twin_cls.check_rule(rule, f"layer '{name}'")
        key = (id(module), rule)
        if key not in made:
            made[key] = twin_cls.from_module(module, rule)
        parent, _, field = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, field, made[key])


def _check_leaves(model: nn.Module, twins: dict, trace: bool) -> list[tuple[str, type]]:
    """Every leaf has a twin, is kept, or has a forward of its own to trace (returned: its
    operations become layers, see :func:`_check_opened`)."""
    unknown = [(name, m) for name, m in model.named_modules()
               if type(m) not in twins and type(m) not in _CONTAINERS and not isinstance(m, Twin)
               and not any(True for _ in m.children())]
    bad = [(name, type(m)) for name, m in unknown
           if not (trace and name and type(m).forward is not nn.Module.forward)]
    if bad:
        raise UnsupportedModuleError(bad)
    return [(name, type(m)) for name, m in unknown]


def _sizes(graph: ModelGraph, name: str) -> set[str]:
    """The arguments of module ``name``'s forward to which every caller passes no value
    computed from the input (sizes, flags, nothing)."""
    sites = graph.sites.get(name)
    g = graph.graphs.get(name)
    if not sites or g is None:
        return set()
    names = [n.target for n in g.nodes if n.op == "placeholder"]
    kinds = {id(site.graph): tags(site.graph) for site in sites}
    passed: set[str] = set()
    for site in sites:
        given = list(site.args) + [site.kwargs.get(n) for n in names[len(site.args):]]
        for param, value in zip(names, given):
            nodes = [v for v in fx.node.map_aggregate(value, lambda v: v) if isinstance(v, fx.Node)] \
                if isinstance(value, (list, tuple)) else [value] if isinstance(value, fx.Node) else []
            if any(kinds[id(site.graph)][v] == "input" for v in nodes):
                passed.add(param)
    return set(names) - passed


#: the attention implementations of Hugging Face models (``config._attn_implementation``) whose
#: operations lrpx sees; the others run kernels no rule reaches (flash, flex, paged attention)
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


def _check_attention_implementations(model: nn.Module) -> None:
    """Modules with a Hugging Face ``config`` name their attention implementation: one lrpx
    cannot see into raises a ValueError that names the module and the implementations that work."""
    for name, module in model.named_modules():
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str) and implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"'{name or '<root>'}' ({type(module).__qualname__}) uses the attention implementation "
                f"{implementation!r}, a kernel that no LRP rule reaches; lrpx explains "
                f"{' and '.join(map(repr, ATTENTION_IMPLEMENTATIONS))}: load the model with "
                "attn_implementation='sdpa' or set model.config._attn_implementation = 'sdpa'")


def _check_opened(graph: ModelGraph, opened: list[tuple[str, type]], model: nn.Module) -> None:
    """Traced forward code computes nothing from the input outside the layers the rewrite made
    of it (moving, reshaping and joining values aside; divisors from the input are held
    constant, :mod:`lrpx.statistics`): an operation without a rule would pass its plain
    gradient as relevance. Forward
    code that does not trace takes its rules at run time (:mod:`lrpx.oplevel`), except a torch
    layer's (an LSTM runs one fused kernel that no rule could see into)."""
    bad, reasons = [], []
    for name, reason in graph.untraced.items():
        bad.append((name, graph.classes.get(name, nn.Module)))
        reasons.append(f"'{name}': its forward cannot be traced ({reason})")
    for name, g in list(graph.items()):
        ops = unrouted(g, _sizes(graph, name))
        if ops and _called_at_run_time(graph, name):
            _to_run_time(graph, name, ops, model, leaf=any(name == n for n, _ in opened))
        elif ops:
            bad.append((name, graph.classes.get(name, nn.Module)))
            reasons.append(f"'{name or '<root>'}': its forward applies {', '.join(sorted(set(ops)))} to values "
                           "computed from the input, which take no LRP rule")
    order = {name: i for i, name in enumerate(graph.classes)}
    ranked = sorted(range(len(bad)), key=lambda i: order.get(bad[i][0], -1))
    bad, reasons = [bad[i] for i in ranked], [reasons[i] for i in ranked]
    if bad:
        raise UnsupportedModuleError(bad, reasons)


def _called_at_run_time(graph: ModelGraph, name: str) -> bool:
    """Whether module ``name`` is called only by forward code that takes its rules at run time
    (its parent's forward could not be traced): what it is given is known only then."""
    parent = name.rpartition(".")[0]
    return bool(name) and name not in graph.sites and parent in graph.oplevel


def _to_run_time(graph: ModelGraph, name: str, ops: list[str], model: nn.Module, *, leaf: bool) -> None:
    """Let module ``name`` keep its own forward with rules at run time: there, operations on
    values that carry no relevance (``cos`` of positions in a rotary embedding) run as they
    are, and the others take their rules (:mod:`lrpx.oplevel`). The layers the rewrite gave a
    module that had no children are taken away again."""
    if leaf:
        module = model.get_submodule(name)
        for child in list(module._modules):
            delattr(module, child)
    del graph.graphs[name]
    graph.changed.discard(name)
    graph.oplevel[name] = (f"'{name}' ({graph.classes[name].__qualname__}) applies {', '.join(sorted(set(ops)))}, "
                           "which take no rule, to its arguments: judged at run time, where they are known")


def _check_parameters(model: nn.Module, twins: dict, graph: ModelGraph) -> None:
    """A module without a twin that holds parameters of its own uses them only in operations
    the rewrite turned into layers, or to reshape and concatenate them to the activations
    (ViT's class token): the relevance they receive is absorbed like a bias's."""
    bad = []
    for name, module in model.named_modules():
        if type(module) in twins or type(module) in _CONTAINERS or isinstance(module, Twin):
            continue
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if owns_parameters and name not in graph.oplevel and not _parameters_absorb(module, graph.graphs.get(name)):
            bad.append((name, type(module)))
    if bad:
        raise UnsupportedModuleError(bad)


def _parameters_absorb(module: nn.Module, graph: fx.Graph | None) -> bool:
    if graph is None:
        return False
    own = {name for name, _ in module.named_parameters(recurse=False)}
    uses = [n for n in graph.nodes if n.op == "get_attr" and n.target in own]
    kinds = tags(graph)
    return all(_absorbs(module, n, kinds) for n in uses)  # unused: what a rewritten layer reads


_JOINS = {torch.cat, torch.stack, torch.concat}


def _absorbs(module: nn.Module, node: fx.Node, kinds: dict[fx.Node, str]) -> bool:
    """Whether a parameter, or what is computed from parameters alone (a clamped scale, a
    bias table indexed and permuted), reaches only layers and submodules: sums, products and
    attention masks give it its share of relevance as they give a bias, a submodule takes it
    as an input (CaiT's class token), joined to the activations it is one of them, and
    returned by a forward that takes no input (Swin's relative position bias table, read out)
    it is a constant to the caller."""
    for user in node.users:
        if user.op == "call_module" or (user.op == "call_function" and user.target in _JOINS) or \
                kinds.get(user) == "meta":  # a size read off it
            continue
        if user.op == "output" and not any(n.op == "placeholder" for n in user.graph.nodes):
            continue
        if user.op in ("call_method", "call_function") and kinds.get(user) == "constant" and \
                _absorbs(module, user, kinds):
            continue
        moves = (user.op == "call_method" and user.target in ROUTING_METHODS) or \
                (user.op == "call_function" and user.target in ROUTING_FUNCTIONS)
        if moves and user.args and user.args[0] is node and _absorbs(module, user, kinds):
            continue
        return False
    return True


def rule_table(model: nn.Module) -> dict[str, Rule]:
    """``{qualified name: rule}`` of the twins in a converted model."""
    return {name: m.rule for name, m in model.named_modules() if isinstance(m, Twin)}
