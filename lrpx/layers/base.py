"""What every twin shares: construction from the original module and its repr."""
from __future__ import annotations

from typing import TypeVar

from torch import nn

from ..rules.base import Rule

T = TypeVar("T", bound="Twin")


class Twin:
    """Mixin of the LRP twins. A twin subclasses the exact torch class it replaces,
    shares the original's Parameters and buffers (same ``state_dict`` keys), and carries
    the rule its backward applies.
    """

    rule: Rule
    #: weighted twins: apply the ReLU that alone reads this layer's output (set by ``convert``)
    fused_relu: bool = False
    #: weighted twins: every input is >= 0 by construction, so rules take their non-negative
    #: forms without checking the data (set by ``convert``, see :mod:`lrpx.signs`)
    input_nonnegative: bool = False

    @classmethod
    def from_module(cls: type[T], module: nn.Module, rule: Rule) -> T:
        """A twin of ``module`` with ``rule``; ``module`` itself is left unchanged."""
        twin = cls.__new__(cls)
        twin.__dict__.update(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if key in module.__dict__:
                twin.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
        twin.__dict__["rule"] = rule
        if hasattr(twin, "inplace"):
            twin.inplace = False
        return twin

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        extra = f"rule={self.rule!r}" + (", then ReLU (fused)" if self.fused_relu else "")
        return f"{base}, {extra}" if base else extra
