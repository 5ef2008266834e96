"""The rule protocol and the stabilizer shared by every rule.

A rule turns the relevance arriving at a layer's output into the relevance of its input.
It sees the layer only through two primitives (see :class:`Layer`): the forward
``f(x; W, b)`` and the input vector-Jacobian product ``g(s; W) = J_x^T s``.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

__all__ = ["Layer", "Rule", "stabilize", "divide", "divide_after_relu", "relu_mask_", "positive", "negative",
           "is_nonnegative"]


class Layer(Protocol):
    """The two primitives of a layer that a rule may call.

    ``forward(input, weight, bias)`` computes the layer with the given parameters and
    ``vjp(s, weight, input)`` the input vector-Jacobian product of the same layer
    with weight ``weight``; ``input`` is the layer input (only its shape is read) or a
    shape. Element-wise layers ignore the weight. ``channel_axis`` is the
    axis of the output that the bias runs along (1 for Conv/BatchNorm, -1 for Linear).
    """

    channel_axis: int
    input_nonnegative: bool

    def forward(self, input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor: ...

    def vjp(self, s: Tensor, weight: Tensor | None, input: Tensor | torch.Size) -> Tensor: ...


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
    if den.shape != relevance.shape:  # a denominator shared by the batch (Flat, WSquare)
        return relevance / den
    return torch.div(relevance, den, out=den)


def divide_after_relu(relevance: Tensor, output: Tensor, epsilon: float) -> Tensor:
    """``relevance / stabilize(output, epsilon)`` for ``output = relu(z) >= 0`` (a fused ReLU),
    where that is ``output + epsilon``; 0 at dead units (``output == 0``)."""
    s = output + epsilon
    return relu_mask_(torch.div(relevance, s, out=s), output)


def relu_mask_(s: Tensor, output: Tensor) -> Tensor:
    """``s`` set to 0 in place where ``output <= 0`` (ReLU's backward kernel: one pass, no
    boolean mask in memory)."""
    return torch.ops.aten.threshold_backward.grad_input(s, output, 0, grad_input=s)


def positive(t: Tensor | None) -> Tensor | None:
    """``max(t, 0)``, passing ``None`` through (a missing bias)."""
    return None if t is None else t.clamp(min=0)


def negative(t: Tensor | None) -> Tensor | None:
    """``min(t, 0)``, passing ``None`` through (a missing bias)."""
    return None if t is None else t.clamp(max=0)


def is_nonnegative(t: Tensor, layer: "Layer | None" = None) -> bool:
    """Whether every entry of a layer input is ``>= 0`` (inputs after a ReLU take the cheap
    forms): known from the model when ``layer.input_nonnegative`` (no look at the data);
    otherwise checked on the CPU. On other devices (where reading the data would make the host
    wait for the device) and under ``torch.compile`` an unknown input counts as signed: the
    general forms, which give the same relevance for non-negative data, with no
    synchronisation and no graph break."""
    if getattr(layer, "input_nonnegative", False):
        return True
    if t.device.type != "cpu" or _compiling():
        return False
    return bool(t.min() >= 0) if t.numel() else True


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


class Rule:
    """Base class of all rules: immutable, shareable between layers and threads.

    Subclasses implement :meth:`relevance`. ``saves`` names the tensors of the forward
    call that the backward needs; the autograd Function saves exactly those.
    """

    saves: tuple[str, ...] = ("input", "weight", "bias", "output")
    #: the kinds of layer the rule applies to: "weighted", "elementwise" or "sum"
    kinds: frozenset[str] = frozenset({"weighted"})
    #: whether the rule is unchanged when it reads ``relu(z)`` for the saved output ``z`` where
    #: its relevance is zero at ``z <= 0`` (then ``convert`` may fuse a following ReLU)
    fusable: bool = False

    def relevance(
        self,
        layer: Layer,
        relevance: Tensor,
        input: Tensor | None,
        weight: Tensor | None,
        bias: Tensor | None,
        output: Tensor | None,
    ) -> Tensor:
        """Return the relevance of ``input`` given the relevance of ``output``."""
        raise NotImplementedError

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

    def _freeze(self) -> None:
        object.__setattr__(self, "_frozen", True)


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
