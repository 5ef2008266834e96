"""``explain``: one call from an input batch to its relevance."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["explain", "Explanation"]


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns; unpacks as ``relevance, output = explain(...)``.

    Attributes
    ----------
    relevance
        Input relevance, shape of the input.
    output
        The model output (detached).
    target
        The class explained per sample, ``(B,)`` integer indices; ``None`` when the initial
        relevance was a tensor.
    """

    relevance: Tensor
    output: Tensor
    target: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.relevance, self.output))


def explain(
    lrp_model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    initial: str | Tensor = "logit",
) -> Explanation:
    """Explain ``lrp_model(x)`` for the classes ``target``.

    Wraps the relevance convention: ``torch.autograd.grad(out, x, grad_outputs=R_out)``.

    Parameters
    ----------
    lrp_model
        A model returned by :func:`lrpx.convert`.
    x
        Input batch (floating point); never modified.
    target
        Class per sample: an int (every sample), a sequence or a tensor of shape ``(B,)``;
        ``None`` takes the argmax of the output. Not needed with a tensor ``initial``.
    initial
        Initial relevance: ``"logit"`` (the target logit, so relevance sums to it up to what
        biases absorb), ``"one_hot"``, or a tensor shaped like the output.

    Returns
    -------
    Explanation
        ``(relevance, output)``; ``output`` is detached.
    """
    _check_input(x)
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = lrp_model(inp)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; explain needs a tensor output")
        r_out, target = _initial(out, target, initial)
        (relevance,) = torch.autograd.grad(out, inp, grad_outputs=r_out)
    if not torch.isfinite(relevance).all():
        raise FloatingPointError(
            "the relevance has NaN or inf entries: a denominator vanished or overflowed. Use a larger "
            "epsilon/stabilizer, a wider dtype than float16, or check the model's output for inf."
        )
    return Explanation(relevance, out.detach(), target)


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point to carry relevance, got dtype {x.dtype}; convert it with x.float()")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}: explain needs a batch of at least one sample, "
                         "(batch, ...) with batch >= 1")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; relevance of a non-finite input is undefined")


def _initial(out: Tensor, target, initial: str | Tensor) -> tuple[Tensor, Tensor | None]:
    """The initial relevance and the classes it starts from (None for a tensor ``initial``)."""
    if isinstance(initial, Tensor):
        if initial.shape != out.shape:
            raise ValueError(f"initial relevance has shape {tuple(initial.shape)}, expected the output's {tuple(out.shape)}")
        if not torch.isfinite(initial).all():
            raise ValueError("initial relevance contains NaN or inf")
        return initial.to(dtype=out.dtype, device=out.device), None
    if initial not in ("logit", "one_hot"):
        raise ValueError(f"initial must be 'logit', 'one_hot' or a tensor, got {initial!r}")
    if out.dim() != 2:
        raise ValueError(f"a class target needs an output of shape (batch, classes), got {tuple(out.shape)}; "
                         "pass a tensor as initial relevance instead")
    classes = _targets(target, out)
    mask = torch.zeros_like(out)
    mask.scatter_(1, classes.unsqueeze(1), 1.0)
    return (mask * out.detach() if initial == "logit" else mask), classes


def _targets(target, out: Tensor) -> Tensor:
    batch, classes = out.shape
    if target is None:
        return out.detach().argmax(1)
    t = torch.as_tensor(target, device=out.device)
    if t.numel() == 0:
        raise ValueError(f"target is empty; expected ({batch},) class indices or a single int")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"target has shape {tuple(t.shape)}, expected ({batch},) or a single int")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"target {t.tolist()} out of range for {classes} classes (valid: 0..{classes - 1})")
    return t.long()
