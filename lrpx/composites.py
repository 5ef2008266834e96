"""Composites: which rule each layer of a model gets.

A composite is data: an ordered list of ``(matcher, rule)`` pairs, first match wins, plus
the rules of the layers no pair claims. A matcher is

* a module class or tuple of classes (``isinstance``),
* a string: a qualified module name (``"features.0"``; a container name covers every layer
  inside it) or a glob (``"features.*"``),
* a position among the Linear/Conv layers in module order: :class:`First`, :class:`Last`,
  :class:`Position` (an index or slice), :class:`Depth` (a fraction of the depth),
* or any callable ``(name, module) -> bool``.

Every layer has a kind (``lrpx.rules.KINDS``) and every rule says which kinds it fits. A pair
whose matcher names a layer explicitly (its class, or its exact qualified name) with a rule
that does not fit it is an error; a broader matcher (a container name, a glob, a position, a
callable) applies only to the layers its rule fits (a weighted-layer rule never lands on a
ReLU). ``composite.assign(model)`` returns the ``{name: rule}`` table that ``convert`` uses.
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Mapping, Sequence, Union

from torch import Tensor, nn

from .canonizers import canonize_graph
from .layers import BATCHNORMS, CONVOLUTIONS, kind_of, registry
from .rules.base import fitting_rules
from .rules import KINDS, AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, Rule, Taylor, Uniform, ZBox, ZPlus

__all__ = ["Composite", "First", "Last", "Position", "Depth", "epsilon_gamma_box", "epsilon_plus",
           "epsilon_plus_flat", "epsilon_alpha2_beta1", "epsilon_alpha2_beta1_flat", "tutorial",
           "presets", "get_preset"]

#: the layers that "first layer" and positions count
LAYERS = (nn.Linear,) + CONVOLUTIONS


@dataclass(frozen=True)
class Position:
    """Layers at ``index`` (an int or a slice) among the Linear/Conv layers in module order."""

    index: int | slice

    def select(self, count: int) -> range:
        if isinstance(self.index, slice):
            return range(count)[self.index]
        i = self.index + count if self.index < 0 else self.index
        return range(i, i + 1) if 0 <= i < count else range(0)


def First() -> Position:
    """The first Linear or Conv layer (the input layer)."""
    return Position(0)


def Last() -> Position:
    """The last Linear or Conv layer (the output layer)."""
    return Position(-1)


@dataclass(frozen=True)
class Depth:
    """Layers of the types ``among`` whose relative depth is in ``[start, stop)``.

    The relative depth of the i-th of n such layers is ``i / n``; ``skip_first`` leaves the
    model's first Linear/Conv layer out of the count (it usually has a rule of its own).
    """

    start: float
    stop: float
    among: tuple[type[nn.Module], ...] = CONVOLUTIONS
    skip_first: bool = True


Matcher = Union[type, tuple, str, Position, Depth, Callable[[str, nn.Module], bool]]


#: the rule of each kind of layer that no pair claims, unless a composite says otherwise
DEFAULT_RULES: Mapping[str, Rule] = MappingProxyType({
    "weighted": Epsilon(), "elementwise": Pass(), "sum": Norm(), "normalization": Norm(), "softmax": Taylor(),
    "bilinear": Uniform(), "product": Uniform(),
})


@dataclass(frozen=True)
class Composite:
    """Ordered ``(matcher, rule)`` pairs, first match wins, and a rule per kind of layer for
    the layers no pair claims.

    Parameters
    ----------
    rules
        The pairs.
    default
        Rule of weighted layers (Linear, Conv, BatchNorm) no pair matches; ``None`` makes an
        unmatched weighted layer an error.
    elementwise
        Rule of activations (``Pass``).
    sum
        Rule of average pooling, means and residual sums (``Norm``); also of normalisation
        layers (LayerNorm, GroupNorm), unless ``kinds`` names one for them.
    kinds
        Rules of the other kinds, ``{kind: rule}`` (``lrpx.rules.KINDS``), e.g.
        ``{"normalization": Pass()}``; unnamed kinds take :data:`DEFAULT_RULES`.

    Raises
    ------
    ValueError
        A fallback rule that does not fit its kind of layer (``Composite(sum=Pass())``: Pass
        fits element-wise and normalisation layers, a sum needs ``Norm``), or an unknown kind.
    """

    rules: Sequence[tuple[Matcher, Rule]] = ()
    default: Rule | None = field(default_factory=Epsilon)
    elementwise: Rule = field(default_factory=Pass)
    sum: Rule = field(default_factory=Norm)
    kinds: Mapping[str, Rule] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for pair in self.rules:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[1], Rule):
                raise TypeError(f"a composite entry is a (matcher, rule) pair, got {pair!r}")
        object.__setattr__(self, "rules", tuple(tuple(pair) for pair in self.rules))
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"Composite(kinds=...) names unknown kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
        fallbacks = dict(self.kinds)
        if "normalization" not in fallbacks and self.sum.fits("normalization"):
            fallbacks["normalization"] = self.sum
        fallbacks.update(elementwise=self.elementwise, sum=self.sum)
        if self.default is not None:
            fallbacks["weighted"] = self.default
        for kind, rule in fallbacks.items():
            _check_fallback(kind, rule)
        object.__setattr__(self, "kinds", MappingProxyType({**DEFAULT_RULES, **fallbacks}))

    def assign(self, model: nn.Module, *, canonize_copy: bool = True,
               twins: dict[type[nn.Module], type[nn.Module] | None] | None = None) -> dict[str, Rule]:
        """The ``{qualified name: rule}`` table for ``model``.

        With ``canonize_copy`` (the default) the table is that of the canonized copy that
        ``lrpx.convert`` builds: folded BatchNorms are gone, residual sums appear as ``add``.
        ``twins`` is the user registry passed to ``convert`` (for custom layers' kinds).
        """
        merged = registry(twins)
        if canonize_copy:
            model = canonize_graph(copy.deepcopy(model).eval(), merged)[0]
        return self.table(model, merged)

    def table(self, model: nn.Module, twins: dict[type[nn.Module], type[nn.Module] | None]) -> dict[str, Rule]:
        """The ``{qualified name: rule}`` table of a canonized ``model`` with the merged
        registry ``twins`` (what ``convert`` calls)."""
        modules = list(model.named_modules(remove_duplicate=False))  # a shared layer under each name
        names = [name for name, _ in modules]
        layers = [(name, m, kind_of(m, twins)) for name, m in modules]
        layers = [(name, m, kind) for name, m, kind in layers if kind is not None]
        ranks = {name: i for i, name in enumerate(n for n, m, _ in layers if isinstance(m, LAYERS))}
        used = set()
        table = {}
        for name, module, kind in layers:
            for i, (matcher, rule) in enumerate(self.rules):
                if not _matches(matcher, name, module, ranks, layers):
                    continue
                if rule.fits(kind):
                    table[name] = rule
                    used.add(i)
                    break
                if _names_explicitly(matcher, name, module):
                    raise ValueError(
                        f"composite entry ({_describe(matcher)}, {rule!r}) names layer '{name}' "
                        f"({type(module).__name__}, {kind}), but {type(rule).__name__} fits "
                        f"{', '.join(sorted(rule.kinds))} layers; rules for {kind} layers: "
                        f"{', '.join(fitting_rules(kind))}")
            else:
                table[name] = self._fallback(kind, name, module)
        self._check_names(names, used)
        return table

    def _fallback(self, kind: str, name: str, module: nn.Module) -> Rule:
        if kind == "weighted" and self.default is None:
            raise ValueError(f"no composite entry matches layer '{name}' ({type(module).__name__}) "
                             "and the composite has no default rule")
        return self.kinds[kind]

    def _check_names(self, names: list[str], used: set[int]) -> None:
        for i, (matcher, _) in enumerate(self.rules):
            if isinstance(matcher, str) and i not in used and not any(_name_match(matcher, n) for n in names):
                close = [n for n in names if n and (n.startswith(matcher.split(".")[0]) or matcher in n)][:5]
                hint = f"; similar names: {close}" if close else f"; the model's names include {names[1:6]}"
                raise ValueError(f"composite names a module that does not exist: '{matcher}'{hint}")


def _check_fallback(kind: str, rule: Rule) -> None:
    if not isinstance(rule, Rule):
        raise TypeError(f"the composite's rule for {kind} layers must be an lrpx rule, got {rule!r}")
    if not rule.fits(kind):
        argument = {"weighted": "default", "elementwise": "elementwise", "sum": "sum"}.get(kind)
        where = f"Composite({argument}={rule!r})" if argument else f"Composite(kinds={{{kind!r}: {rule!r}}})"
        raise ValueError(f"{where}: that rule is for {kind} layers, but {type(rule).__name__} fits "
                         f"{', '.join(sorted(rule.kinds))} layers; rules for {kind} layers: "
                         f"{', '.join(fitting_rules(kind))}")


def _names_explicitly(matcher: Matcher, name: str, module: nn.Module) -> bool:
    """Whether ``matcher`` names this layer itself: its exact class, or its exact name."""
    if isinstance(matcher, str):
        return matcher == name
    if isinstance(matcher, type):
        return type(module) is matcher
    if isinstance(matcher, tuple):
        return type(module) in matcher
    return False


def _describe(matcher: Matcher) -> str:
    if isinstance(matcher, type):
        return matcher.__name__
    if isinstance(matcher, tuple):
        return "(" + ", ".join(getattr(m, "__name__", repr(m)) for m in matcher) + ")"
    return repr(matcher)


def _name_match(pattern: str, name: str) -> bool:
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.startswith(pattern + ".")


def _matches(matcher: Matcher, name: str, module: nn.Module, ranks: dict[str, int], layers) -> bool:
    if isinstance(matcher, str):
        return _name_match(matcher, name)
    if isinstance(matcher, (type, tuple)):
        return isinstance(module, matcher)
    if isinstance(matcher, Position):
        return name in ranks and ranks[name] in matcher.select(len(ranks))
    if isinstance(matcher, Depth):
        first = min(ranks, key=ranks.get) if ranks else None
        group = [n for n, m, _ in layers if isinstance(m, matcher.among) and not (matcher.skip_first and n == first)]
        if name not in group:
            return False
        return matcher.start <= group.index(name) / len(group) < matcher.stop
    if callable(matcher):
        return bool(matcher(name, module))
    raise TypeError(f"unknown composite matcher {matcher!r}: use a class, a name or glob, a Position, "
                    "a Depth or a callable (name, module) -> bool")


def _conv_and_linear(first: Rule | None, conv: Rule, linear: Rule, stabilizer: float) -> Composite:
    rules: list[tuple[Matcher, Rule]] = [] if first is None else [(First(), first)]
    rules += [(CONVOLUTIONS + BATCHNORMS[1:], conv), ((nn.Linear, nn.BatchNorm1d), linear)]
    return Composite(rules, default=linear, sum=Norm(stabilizer))


def epsilon_gamma_box(low: float | Tensor, high: float | Tensor, epsilon: float = 1e-6, gamma: float = 0.25,
                      stabilizer: float = 1e-6) -> Composite:
    """zB on the first layer, gamma on the other convolutions, epsilon on Linear layers."""
    return _conv_and_linear(ZBox(low, high, stabilizer), Gamma(gamma, stabilizer), Epsilon(epsilon), stabilizer)


def epsilon_plus(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """z+ on convolutions, epsilon on Linear layers."""
    return _conv_and_linear(None, ZPlus(stabilizer), Epsilon(epsilon), stabilizer)


def epsilon_plus_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Flat on the first layer, z+ on the other convolutions, epsilon on Linear layers."""
    return _conv_and_linear(Flat(stabilizer), ZPlus(stabilizer), Epsilon(epsilon), stabilizer)


def epsilon_alpha2_beta1(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """alpha=2, beta=1 on convolutions, epsilon on Linear layers."""
    return _conv_and_linear(None, AlphaBeta(2, 1, stabilizer), Epsilon(epsilon), stabilizer)


def epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, stabilizer: float = 1e-6) -> Composite:
    """Flat on the first layer, alpha=2, beta=1 on the other convolutions, epsilon on Linear."""
    return _conv_and_linear(Flat(stabilizer), AlphaBeta(2, 1, stabilizer), Epsilon(epsilon), stabilizer)


def tutorial(low: float | Tensor, high: float | Tensor, gamma: float = 0.25, epsilon: float = 0.25,
             lower: float = 0.5, stabilizer: float = 1e-6) -> Composite:
    """The LRP tutorial's composite (Montavon et al. 2019), by depth.

    zB on the first layer; Gamma(gamma) on the lower ``lower`` fraction of the other
    convolutions; ``Epsilon(epsilon * RMS(z), relative)`` on the remaining convolutions;
    LRP-0 (up to ``stabilizer``) on the Linear layers. On VGG16 this is the tutorial's split:
    conv 1 zB, convs 2-7 gamma, convs 8-13 epsilon, the three Linear layers LRP-0.
    """
    rules: list[tuple[Matcher, Rule]] = [
        (First(), ZBox(low, high, stabilizer)),
        (Depth(0.0, lower), Gamma(gamma, stabilizer)),
        (CONVOLUTIONS + BATCHNORMS[1:], Epsilon(epsilon, relative=True)),
        ((nn.Linear, nn.BatchNorm1d), Epsilon(stabilizer)),
    ]
    return Composite(rules, default=Epsilon(stabilizer), sum=Norm(stabilizer))


_PRESETS = {
    "epsilon_gamma_box": epsilon_gamma_box,
    "epsilon_plus": epsilon_plus,
    "epsilon_plus_flat": epsilon_plus_flat,
    "epsilon_alpha2_beta1": epsilon_alpha2_beta1,
    "epsilon_alpha2_beta1_flat": epsilon_alpha2_beta1_flat,
    "tutorial": tutorial,
}


def presets() -> dict[str, Callable[..., Composite]]:
    """``{name: preset function}`` (a new dict)."""
    return dict(_PRESETS)


def get_preset(name: str, **kwargs) -> Composite:
    """The preset ``name`` called with ``kwargs``; an unknown name lists the valid ones."""
    if name not in _PRESETS:
        raise ValueError(f"unknown composite '{name}'; valid: {', '.join(_PRESETS)}")
    return _PRESETS[name](**kwargs)
