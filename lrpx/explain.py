"""``explain``: one call from an input batch to its relevance."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .record import Probes, forward_with_probes

__all__ = ["explain", "Explanation"]


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` returns; unpacks as ``relevance, output = explain(...)``.

    Attributes
    ----------
    relevance
        Input relevance, shape of the input.
    output
        The model output (detached; a tensor, or the model's dict / list of tensors).
    target
        The class explained per sample, ``(B,)`` integer indices; ``None`` when the initial
        relevance was a tensor or the target a callable.
    score
        The explained score per sample, ``(B,)``: the target logit, or what a callable target
        returned; ``None`` for a tensor initial relevance.
    recorded
        With ``record``: ``{module name: relevance at its output}``, per sample.
    """

    relevance: Tensor
    output: Any
    target: Tensor | None = None
    score: Tensor | None = None
    recorded: dict[str, Tensor] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.relevance, self.output))


def explain(
    lrp_model: nn.Module,
    x: Tensor,
    target: int | Sequence[int] | Tensor | Callable[[Any], Tensor] | None = None,
    *,
    initial: str | Tensor = "logit",
    record: Sequence[str] | None = None,
) -> Explanation:
    """Explain ``lrp_model(x)`` for the classes (or scores) ``target``.

    Wraps the relevance convention: ``torch.autograd.grad(out, x, grad_outputs=R_out)``.

    Parameters
    ----------
    lrp_model
        A model returned by :func:`lrpx.convert`.
    x
        Input batch (floating point); never modified.
    target
        Class per sample: an int (every sample), a sequence or a tensor of shape ``(B,)``;
        ``None`` takes the argmax of the output. Not needed with a tensor ``initial``. Or a
        callable ``target(output) -> (B,)`` that picks the scores to explain from whatever the
        model returns (a tensor, a dict, a list of dicts; see :mod:`lrpx.targets`): the initial
        relevance is then ``output * d score / d output`` for every output tensor, which for a
        score that sums outputs (class logits over a region, a detection's score) is those
        outputs themselves, as ``"logit"`` is for a class.
    initial
        Initial relevance: ``"logit"`` (the target logit, so relevance sums to it up to what
        biases absorb), ``"one_hot"`` (the gradient of the score: 1 at the target), or a
        tensor shaped like the output.
    record
        Qualified names of modules (``["features.28", "layer4"]``) whose output relevance, the
        relevance that arrives there from above, is returned in ``Explanation.recorded``
        (shape of the module's output; zeros where the score does not depend on it). Per call
        and thread-safe, without hooks; see :mod:`lrpx.record`.

    Returns
    -------
    Explanation
        ``(relevance, output)``; ``output`` is detached.
    """
    _check_input(x)
    inp = x.detach().clone().requires_grad_(True)
    probes = None
    with torch.enable_grad():
        if record:
            probes = Probes(record=frozenset(record))
            out = forward_with_probes(lrp_model, probes, inp)
        else:
            out = lrp_model(inp)
        if callable(target) and not isinstance(target, Tensor):
            return _with_recorded(_explain_scores(out, inp, target, initial), probes)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model returned {type(out).__name__}; explain needs a tensor output, or a "
                            "callable target that picks the scores from it (see lrpx.targets)")
        r_out, target = _initial(out, target, initial)
        (relevance,) = torch.autograd.grad(out, inp, grad_outputs=r_out)
    _check_finite(relevance)
    score = None if target is None else out.detach().gather(1, target.view(-1, 1)).squeeze(1)
    return _with_recorded(Explanation(relevance, out.detach(), target, score), probes)


def _with_recorded(explanation: Explanation, probes: Probes | None) -> Explanation:
    if probes is None:
        return explanation
    return dataclasses.replace(explanation, recorded=probes.recorded())


def _check_finite(relevance: Tensor) -> None:
    if not torch.isfinite(relevance).all():
        raise FloatingPointError(
            "the relevance has NaN or inf entries: a denominator vanished or overflowed. Use a larger "
            "epsilon/stabilizer, a wider dtype than float16, or check the model's output for inf."
        )


def _explain_scores(out, inp: Tensor, target: Callable, initial: str | Tensor) -> Explanation:
    """Relevance of the scores ``target(out)`` (``(B,)``): initial relevance ``out * d score /
    d out`` (``"logit"``) or ``d score / d out`` (``"one_hot"``) on each output tensor."""
    if isinstance(initial, Tensor) or initial not in ("logit", "one_hot"):
        raise ValueError(f"with a callable target, initial must be 'logit' or 'one_hot', got {initial!r}")
    scores = target(out)
    batch = inp.shape[0]
    if not isinstance(scores, Tensor):
        raise TypeError(f"the target callable returned {type(scores).__name__}; it must return a tensor of "
                        f"shape ({batch},), one score per sample")
    if scores.shape != (batch,):
        raise ValueError(f"the target callable returned shape {tuple(scores.shape)}; it must return ({batch},), "
                         "one score per sample")
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.requires_grad]
    grads = torch.autograd.grad(scores.sum(), leaves, retain_graph=True, allow_unused=True)
    used = [(t, g) for t, g in zip(leaves, grads) if g is not None]
    if not used:
        raise ValueError("the target callable's scores do not depend on the model's output")
    r_out = [g * t.detach() if initial == "logit" else g for t, g in used]
    (relevance,) = torch.autograd.grad([t for t, _ in used], inp, grad_outputs=r_out)
    _check_finite(relevance)
    detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, out)
    return Explanation(relevance, detached, None, scores.detach())


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
