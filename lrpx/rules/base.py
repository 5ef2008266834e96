"""The rule contract and the arithmetic shared by every rule.

A rule turns the relevance arriving at a layer's output into the relevance of its inputs.
It sees the layer only through the primitives of the layer's *kind* (see :class:`Layer`
and ``docs/rules.md``), for example the forward ``f(x; W, b)`` and the input
vector-Jacobian product ``g(s; W) = J_x^T s`` of a weighted layer.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Layer", "Rule", "KINDS", "fitting_rules", "stabilize", "divide", "divide_after_relu", "relu_mask_",
           "batched", "positive", "negative", "nonnegative_number", "is_nonnegative"]

#: the kinds of layer, each with its primitives (``docs/rules.md``):
#:
#: * ``weighted``: ``forward(x, W, b)`` and ``vjp(s, W, x)`` (Linear, Conv, BatchNorm as affine map);
#: * ``elementwise``: ``forward(x)`` (activations);
#: * ``sum``: a linear map without parameters, ``forward(x)`` and ``vjp(s, None, x)``; ``x`` may
#:   be a tuple (a sum of operands); average pooling, means, residual sums;
#: * ``normalization``: ``forward(x, w, b)``, ``centre(x)``, ``centre_vjp(s)`` and
#:   ``bias_like(b, y)`` (LayerNorm, GroupNorm);
#: * ``softmax``: ``forward(x)`` and ``dim``;
#: * ``bilinear``: ``forward((a, b))`` = ``a @ b`` of two activations;
#: * ``product``: ``forward((a, b))`` = ``a * b`` or ``a / b`` and ``signal`` (the operands that
#:   carry the signal: ``0``, ``1`` or ``None`` for both).
KINDS = ("weighted", "elementwise", "sum", "normalization", "softmax", "bilinear", "product")


class Layer(Protocol):
    """What every layer description offers a rule: its ``kind`` and its ``forward``.

    The other primitives depend on the kind (:data:`KINDS`). ``channel_axis`` is the axis of
    the output that the bias runs along (1 for Conv/BatchNorm, -1 for Linear) and
    ``input_nonnegative`` says whether the input is ``>= 0`` by construction.
    """

    kind: str
    channel_axis: int
    input_nonnegative: bool

    def forward(self, input, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor: ...


def stabilize(z: Tensor, epsilon: float | Tensor, scale: float = 1.0) -> Tensor:
    r"""Move ``z`` away from zero: :math:`(z + \epsilon\,\mathrm{sign}_0(z)) / \mathrm{scale}`.

    ``sign0(+0.0) = +1``, so a zero denominator becomes ``epsilon`` and is never 0 (a
    negative zero ``-0.0`` takes ``-epsilon``, equally non-zero). Written as ``copysign``
    plus an add: two memory passes, where a masked select costs several; the scale rides
    along in the add.
    """
    if isinstance(epsilon, Tensor):
        e = (epsilon / scale).to(device=z.device, dtype=z.dtype).expand_as(z)
    else:  # a fill on the device: no copy from the host, no synchronisation
        e = torch.full((), epsilon / scale, dtype=z.dtype, device=z.device).expand_as(z)
    return torch.copysign(e, z).add_(z, alpha=1.0 / scale)


def divide(relevance: Tensor, z: Tensor, epsilon: float | Tensor, scale: float = 1.0) -> Tensor:
    """``scale * relevance / stabilize(z, epsilon)``, written into the denominator's buffer
    (the scale divides the denominator: no extra pass)."""
    den = stabilize(z, epsilon, scale)
    if den.shape != relevance.shape or batched(relevance, den):  # a denominator shared by the batch (Flat,
        return relevance / den  # WSquare) or by the rows of a batched backward
    return torch.div(relevance, den, out=den)


def divide_after_relu(relevance: Tensor, output: Tensor, epsilon: float) -> Tensor:
    """``relevance / stabilize(output, epsilon)`` for ``output = relu(z) >= 0`` (a fused ReLU),
    where that is ``output + epsilon``; 0 at dead units (``output == 0``)."""
    s = output + epsilon
    if batched(relevance, s):
        return relu_mask_(relevance / s, output)
    return relu_mask_(torch.div(relevance, s, out=s), output)


def relu_mask_(s: Tensor, output: Tensor) -> Tensor:
    """``s`` set to 0 where ``output <= 0``: in place (ReLU's backward kernel: one pass, no
    boolean mask in memory), or out of place for the rows of a batched backward pass (use the
    result)."""
    if batched(s, output):
        return torch.where(output <= 0, 0.0, s)
    return torch.ops.aten.threshold_backward.grad_input(s, output, 0, grad_input=s)


def batched(*tensors: Tensor) -> bool:
    """Whether any of ``tensors`` holds many rows of a batched computation
    (``torch.autograd.grad(..., is_grads_batched=True)``, or a tensor of a ``torch.func``
    transform such as ``vmap``): rows that share a tensor cannot be written into it, so the
    rules compute out of place there."""
    if compiling():
        return False
    functorch = torch._C._functorch
    return any(functorch.is_legacy_batchedtensor(t) or functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def nonnegative_number(name: str, value: float) -> float:
    """``value`` as a float, or a ValueError naming the hyper-parameter ``name`` if it is not ``>= 0``."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value}")
    return value


def positive(t: Tensor | None) -> Tensor | None:
    """``max(t, 0)``, passing ``None`` through (a missing bias)."""
    return None if t is None else t.clamp(min=0)


def negative(t: Tensor | None) -> Tensor | None:
    """``min(t, 0)``, passing ``None`` through (a missing bias)."""
    return None if t is None else t.clamp(max=0)


def is_nonnegative(t: Tensor, layer: Layer) -> bool:
    """Whether every entry of a layer input is ``>= 0`` (inputs after a ReLU take the cheap
    forms): known from the model when ``layer.input_nonnegative`` (no look at the data);
    otherwise checked on the CPU. On other devices (where reading the data would make the host
    wait for the device), under ``torch.compile`` and in ``torch.func`` transforms (``vmap``
    over samples) an unknown input counts as signed: the
    general forms, which give the same relevance for non-negative data, with no
    synchronisation and no graph break."""
    if layer.input_nonnegative:
        return True
    if t.device.type != "cpu" or compiling() or batched(t):
        return False
    return bool(t.min() >= 0) if t.numel() else True


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the running code."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def fitting_rules(kind: str) -> list[str]:
    """Names of the rule classes defined so far (lrpx's and the user's) that fit ``kind``."""
    names, stack = [], list(Rule.__subclasses__())
    while stack:
        cls = stack.pop(0)
        stack.extend(cls.__subclasses__())
        if kind in cls.kinds and not cls.__name__.startswith("_") and cls.__name__ not in names:
            names.append(cls.__name__)
    return names


class _Frozen(type):
    """Makes every rule immutable once its ``__init__`` (however many levels) has returned."""

    def __call__(cls, *args, **kwargs):
        rule = super().__call__(*args, **kwargs)
        if cls.relevance is Rule.relevance:
            raise TypeError(f"{cls.__name__} does not implement relevance(layer, relevance, input, weight, "
                            "bias, output); a rule must")
        object.__setattr__(rule, "_frozen", True)
        return rule


class Rule(metaclass=_Frozen):
    """Base class of all rules: immutable values, shareable between layers and threads.

    A rule subclasses :class:`Rule`, sets its hyper-parameters in ``__init__`` and implements
    :meth:`relevance`; the instance is frozen when ``__init__`` returns. Class attributes:

    ``kinds``
        The kinds of layer (:data:`KINDS`) the rule applies to. ``lrpx.convert`` and
        ``Composite.assign`` refuse to put a rule on a layer of another kind.
    ``saves``
        The tensors of the forward call that :meth:`relevance` reads (``"input"``,
        ``"weight"``, ``"bias"``, ``"output"``); the autograd Function saves exactly those
        and passes ``None`` for the others.
    ``fusable``
        Whether the rule may read ``relu(z)`` for the saved output ``z`` of a layer whose only
        reader is a ReLU (``convert`` then lets the layer apply that ReLU): true when the
        rule's relevance at units with ``z <= 0`` does not matter, since none reaches them.
    ``row_local``
        Whether the relevance of each row (last axis) of the input of a layer that maps rows
        to rows (``Linear``) depends on that row and its output row alone. A row whose
        relevance is all zero then passes none, and lrpx runs the rule on the other rows only
        (a language model's head, where one of tokens x vocabulary rows is explained).
    ``epsilon``
        The stabilizer, ``1e-6`` unless the rule sets its own.

    :meth:`relevance` may receive the rows of a batched backward pass over one forward
    (:func:`lrpx.concepts.attribute` runs ``torch.func.vmap`` over the relevance at the
    output): there it writes into no saved tensor in place (:func:`batched` tells), reads no
    value of the relevance on the host (``.item()``, ``bool(...)``) and branches in Python on
    the saved tensors only. A rule that does not would make ``attribute`` fall back to one
    forward pass per batch of conditions (with a warning).
    """

    saves: tuple[str, ...] = ("input", "weight", "bias", "output")
    kinds: frozenset[str] = frozenset({"weighted"})
    fusable: bool = False
    row_local: bool = False
    epsilon: float = 1e-6

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.kinds) - set(KINDS)
        if unknown:
            raise TypeError(f"{cls.__name__}.kinds names unknown layer kinds {sorted(unknown)}; known: {KINDS}")

    def saves_for(self, layer: Layer) -> tuple[str, ...]:
        """The tensors to save for ``layer`` (``saves``, unless the rule needs less for a kind)."""
        return self.saves

    def fits(self, kind: str | None) -> bool:
        """Whether the rule applies to layers of ``kind``."""
        return kind in self.kinds

    def relevance(
        self,
        layer: Layer,
        relevance: Tensor,
        input: Tensor | tuple[Tensor, ...] | None,
        weight: Tensor | None,
        bias: Tensor | None,
        output: Tensor | None,
    ) -> Tensor | tuple[Tensor | None, ...]:
        """The relevance of ``input`` (a tensor, or one per operand for a tuple) given the
        relevance of ``output``. ``None`` for an operand means it receives none."""
        raise NotImplementedError

    def padded(self, pad: list[int], mode: str) -> "Rule":
        """This rule for the padded input of a layer that pads before it applies (a Conv with
        ``padding_mode`` reflect/replicate/circular or an asymmetric ``'same'``): itself, unless
        the rule holds per-element values of the input (ZBox bounds)."""
        return self

    def relevance_after_relu(self, layer, relevance, input, weight, bias, output):
        """:meth:`relevance` of a layer that applied a fused ReLU: ``output`` is ``relu(z)``.

        Units with ``z <= 0`` pass no relevance. Rules that do not read ``output`` need no
        change; the others see ``relu(z) == z`` wherever relevance remains. Rules override
        this to mask without a full copy of ``relevance``.
        """
        if output is not None:
            relevance = torch.where(output > 0, relevance, 0.0)
        return self.relevance(layer, relevance, input, weight, bias, output)

    def _fields(self) -> dict[str, object]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        a, b = self._fields(), other._fields()  # type: ignore[attr-defined]
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)

    def __hash__(self) -> int:
        return hash((type(self), tuple(self._fields())))

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable; create a new rule instead")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable; create a new rule instead")
        object.__delattr__(self, name)


def _short(v: object) -> str:
    if isinstance(v, Tensor):
        if v.numel() == 1:
            return f"{v.item():g}"
        return f"tensor(shape={tuple(v.shape)})"
    return repr(v)


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b
