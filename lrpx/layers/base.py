"""What every twin shares: its kind, the rule it carries, construction from the original
module, what it declares about the sign of its output, and its repr."""
from __future__ import annotations

import copy
from typing import ClassVar, TypeVar

from torch import nn

from ..rules.base import KINDS, Rule, fitting_rules

T = TypeVar("T", bound="Twin")


class Twin:
    """Mixin of the LRP twins. A twin subclasses the exact torch class it replaces, shares
    the original's Parameters and buffers (same ``state_dict`` keys), and carries the rule its
    backward applies. What ``convert`` needs to know of a layer is declared here, once:

    ``lrp_kind``
        The kind of layer (``lrpx.rules.KINDS``): which rules fit it.
    ``lrp_fusable``
        Whether the twin can apply a ReLU that alone reads its output (``fused_relu``).
    :meth:`output_nonnegative`
        Whether its output is ``>= 0`` by construction, given whether its inputs are.
    """

    rule: Rule
    lrp_kind: ClassVar[str]
    lrp_fusable: ClassVar[bool] = False
    #: apply the ReLU that alone reads this layer's output (set by ``convert``)
    fused_relu: bool = False
    #: every input is >= 0 by construction, so rules take their non-negative forms without
    #: checking the data (set by ``convert``, see :mod:`lrpx.signs`)
    input_nonnegative: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("lrp_kind")
        if kind is not None and kind not in KINDS:
            raise TypeError(f"{cls.__name__}.lrp_kind is {kind!r}; valid kinds: {', '.join(KINDS)}")

    @classmethod
    def check_rule(cls, rule: Rule, where: str = "") -> None:
        """Refuse a rule that does not fit this twin's kind of layer (``where`` names the layer)."""
        if not isinstance(rule, Rule):
            raise TypeError(f"{where or cls.__name__}: expected an lrpx rule, got {type(rule).__name__}")
        if not rule.fits(cls.lrp_kind):
            what = f"{where} ({cls.__name__})" if where else cls.__name__
            raise TypeError(f"{what}: {rule!r} does not fit {cls.lrp_kind} layers ({type(rule).__name__} fits "
                            f"{', '.join(sorted(rule.kinds))} layers); rules for {cls.lrp_kind} layers: "
                            f"{', '.join(fitting_rules(cls.lrp_kind))}")

    @classmethod
    def from_module(cls: type[T], module: nn.Module, rule: Rule) -> T:
        """A twin of ``module`` with ``rule``; ``module`` itself is left unchanged.

        The twin shares the module's Parameters, buffers and children, and starts with copies
        of its hook dictionaries (a hook added to one later does not reach the other).
        """
        cls.check_rule(rule)
        twin = cls.__new__(cls)
        twin.__dict__.update(module.__dict__)
        for key, value in module.__dict__.items():
            if isinstance(value, (dict, set)):  # _parameters, _buffers, _modules, hook dicts, ...
                twin.__dict__[key] = copy.copy(value)
        twin.__dict__["rule"] = rule
        if hasattr(twin, "inplace"):
            twin.inplace = False
        return twin

    def output_nonnegative(self, inputs_nonnegative: bool) -> bool:
        """Whether this layer's output is ``>= 0`` by construction when (all) its inputs are
        ``>= 0`` (``inputs_nonnegative``) or not."""
        return self.fused_relu

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"rule={self.rule!r}" + (", then ReLU (fused)" if self.fused_relu else "")
        return f"{base}, {extra}" if base else extra


def copy_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` copies of the hook dictionaries of ``source`` (forward, pre-forward,
    backward and state-dict hooks), so that the hooks a user registered keep running."""
    for key, value in source.__dict__.items():
        if "hook" in key and isinstance(value, (dict, set)):
            target.__dict__[key] = copy.copy(value)


def has_hooks(module: nn.Module) -> bool:
    """Whether the user registered forward, pre-forward or backward hooks on ``module``."""
    return any(bool(module.__dict__.get(key)) for key in
               ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))
