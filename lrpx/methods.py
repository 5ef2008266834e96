"""Attribution methods by name: the LRP presets and the gradient baselines, as functions
``(x, target) -> relevance`` that the command line, the demo and the evaluation share."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import composites
from .convert import convert
from .explain import explain

__all__ = ["Attributor", "gradient", "gradient_x_input", "BASELINES", "method_names", "attributor",
           "explain_batches"]

#: ``(x, target) -> relevance`` of the shape of ``x``
Attributor = Callable[[Tensor, Tensor], Tensor]


def gradient(model: nn.Module, x: Tensor, target: Tensor | Callable) -> Tensor:
    """Gradient of the target logit (or of the scores of a callable target, see
    :mod:`lrpx.targets`) with respect to the input (sensitivity), shape of ``x``."""
    inp = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(inp)
        score = target(out).sum() if callable(target) else out.gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, inp)
    return grad


def gradient_x_input(model: nn.Module, x: Tensor, target: Tensor | Callable) -> Tensor:
    """Gradient × input, shape of ``x``."""
    return gradient(model, x, target) * x.detach()


#: attribution baselines next to the LRP presets, ``{name: function(model, x, target)}``
BASELINES: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "gradient": gradient,
    "gradient_x_input": gradient_x_input,
}


def method_names() -> list[str]:
    """Names :func:`attributor` accepts: the LRP presets, then the baselines."""
    return [*composites.presets(), *BASELINES]


def attributor(model: nn.Module, method: str, *, low: Tensor | float, high: Tensor | float) -> Attributor:
    """A function ``(x, target) -> relevance`` for an LRP preset or a baseline.

    Parameters
    ----------
    model
        The classifier (not modified; LRP works on a converted copy).
    method
        A name from :func:`method_names`.
    low, high
        ZBox bounds of the input, for the presets that take them.
    """
    if method in BASELINES:
        baseline = BASELINES[method]
        return lambda x, target: baseline(model, x, target)
    if method not in composites.presets():
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(method_names())}")
    preset = composites.presets()[method]
    kwargs = {"low": low, "high": high} if "low" in inspect.signature(preset).parameters else {}
    lrp_model = convert(model, preset(**kwargs))
    return lambda x, target: explain(lrp_model, x, target).relevance


def explain_batches(explainer: Attributor, x: Tensor, target: Tensor, batch_size: int = 8) -> Tensor:
    """``explainer`` over ``x`` in batches of ``batch_size`` samples, concatenated."""
    return torch.cat([explainer(xb, tb) for xb, tb in zip(x.split(batch_size), target.split(batch_size))])


def quantus_explain_func(method: str = "epsilon_plus", *, low: Tensor | float = -3.0, high: Tensor | float = 3.0,
                         channel_sum: bool = False) -> Callable:
    """An ``explain_func`` for Quantus: ``explain_func(model, inputs, targets, **kwargs)``
    takes numpy (or torch) inputs ``(B, C, H, W)`` and class indices and returns the relevance of
    ``method`` (an LRP preset or a baseline, :func:`method_names`) as a float32 numpy array,
    ``(B, C, H, W)`` or, with ``channel_sum``, ``(B, 1, H, W)``.

    The conversion of each model is made once and kept while the model lives::

        quantus.FaithfulnessCorrelation()(model=model, x_batch=x, y_batch=y,
                                          explain_func=lrpx.methods.quantus_explain_func("epsilon_plus"))
    """
    import weakref

    if method not in method_names():
        raise ValueError(f"unknown method '{method}'; valid: {', '.join(method_names())}")
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def explain_func(model: nn.Module, inputs, targets, **kwargs):
        device = next(model.parameters()).device
        x = torch.as_tensor(inputs, dtype=torch.float32, device=device)
        target = torch.as_tensor(targets, device=device).long().view(-1).expand(x.shape[0])
        if model not in cache:
            cache[model] = attributor(model.eval(), method, low=low, high=high)
        relevance = cache[model](x, target).detach()
        if channel_sum:
            relevance = relevance.sum(1, keepdim=True)
        return relevance.float().cpu().numpy()

    return explain_func
