"""Pixel flipping / region perturbation, streamed through the model in chunks.

Every (order, sample, step) input is independent: it is built lazily for its chunk
(``mask = rank < n_k``, ``torch.where(mask, fill, x)``), the chunks of ``batch_size`` items go
through the model under :func:`torch.inference_mode`, and the target scores are gathered. Step 0
(the clean input) is shared by all orders. Items are ordered step-major, so the chunks of an
iterative fill hold holes of similar size. Nothing leaves the input's device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .draws import Generators
from .perturb import FillSpec, Normalizer, Perturbation, Schedule
from .result import FlippingResult
from .scores import as_score


def pixel_flipping(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    relevance: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    patch_size: int = 1,
    steps: int | None = None,
    schedule: Schedule = "linear",
    order: str | Sequence[str] = "morf",
    fill: FillSpec = "random",
    score: str | Callable[[Tensor, Tensor], Tensor] = "logit",
    reduce: str = "sum",
    normalizer: Normalizer | None = None,
    pixel_range: tuple[float, float] | None = None,
    batch_size: int = 32,
    generator: Generators = None,
    progress: bool = False,
) -> FlippingResult:
    """Remove regions in relevance order and track the target score (pixel flipping).

    Regions of ``patch_size x patch_size`` pixels (smaller at the right and bottom border when
    the image size is not a multiple) are ranked by their relevance, summed over channels and
    pixels. After step ``k`` the first ``n_k`` regions of the order are replaced by the fill
    (cumulative masks; pixels outside the mask keep their exact input values) and the model's
    score of the fixed target class is recorded (Samek et al. 2017).

    Parameters
    ----------
    model
        Classifier mapping ``(N, C, H, W)`` to ``(N, classes)``; should be in eval mode.
    x
        ``(B, C, H, W)`` inputs in model-input space. Not modified.
    relevance
        ``(B, C, H, W)``, ``(B, 1, H, W)`` or ``(B, H, W)`` attribution. Not modified.
    target
        Class per sample (an int for all); ``None``: the argmax on the clean input. Or a
        callable ``target(output, sample) -> (N,)`` that picks the score of each input from
        whatever the model returns (``sample``: which sample of ``x`` each input comes from;
        e.g. ``lrpx.targets.segment(c, masks, reduce="mean")`` for segmentation); ``score`` is
        then not used and ``result.target`` holds -1.
    patch_size
        Region side; 1 is pixel flipping, more is region perturbation.
    steps
        Number of steps ``T`` (see :func:`~lrpx.eval.order.schedule_counts` for defaults).
    schedule
        ``"linear"``, ``"quadratic"`` (step ``k`` removes ``2k - 1`` regions), ``"log"``, or
        explicit cumulative counts (ints) or fractions (floats in ``(0, 1]``).
    order
        ``"morf"``, ``"lrf"``, ``"random"``, or several of them.
    fill
        ``"random"``, ``"inpaint"``, ``"road"``, ``"constant"`` (pixel-range midpoint),
        ``"mean"``, ``"blur"``, a number or tensor (model-input space), a
        :class:`~lrpx.eval.fills.Fill`, or a callable ``fill(x, mask) -> values``.
    score
        ``"logit"``, ``"softmax"``, or a callable ``score(output, target) -> (N,)``.
    reduce
        Region relevance ``"sum"`` (default) or ``"mean"`` over its pixels.
    normalizer
        ``(mean, std)`` per channel, or ``(to_pixel, from_pixel)`` functions: the map between
        model-input and pixel space, where the named fills work. ``None``: the same space.
    pixel_range
        ``(low, high)`` of pixel values for ``random`` and ``constant``; ``None``: the
        per-sample minimum and maximum of the image.
    batch_size
        Items per model call.
    generator
        Source of the random order, noise and ROAD noise (on ``x``'s device): one
        ``torch.Generator``, or one per sample so that a sample's draws do not depend on the
        rest of the batch.
    progress
        Show a ``tqdm`` progress bar over the chunks.

    Returns
    -------
    FlippingResult
        Curves ``(orders, B, T + 1)``, the step counts and fractions, the target, and the
        AUC / AOPC / SRG methods.
    """
    return perturbation_curves(model, x, relevance, target, patch_size=patch_size, steps=steps,
                               schedule=schedule, order=order, fill=fill, score=score, reduce=reduce,
                               normalizer=normalizer, pixel_range=pixel_range, batch_size=batch_size,
                               generator=generator, progress=progress)


def perturbation_curves(model, x: Tensor, relevance: Tensor, target=None, *, mode: str = "delete",
                        patch_size: int, steps: int | None, schedule: Schedule, order: str | Sequence[str],
                        fill: FillSpec, score, reduce: str, normalizer: Normalizer | None,
                        pixel_range: tuple[float, float] | None, batch_size: int,
                        generator: Generators, progress: bool) -> FlippingResult:
    """The engine of :func:`pixel_flipping` (``mode="delete"``) and of insertion
    (``mode="insert"``: the first ``n_k`` regions of the order are kept, the rest filled); with
    ``target=None`` insertion takes the argmax of the clean input, one extra forward."""
    score_name, score_fn = as_score(score)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    targets = check_target(target, x)
    warn_if_training(model)
    plan = Perturbation(x, relevance, patch_size=patch_size, steps=steps, schedule=schedule,
                        orders=order, fill=fill, reduce=reduce, normalizer=normalizer,
                        pixel_range=pixel_range, generator=generator, mode=mode)
    with torch.inference_mode():
        if targets is None and mode == "insert":  # step 0 holds no pixel of the input
            targets = clean_argmax(model, plan.x, batch_size)
        callable_target = callable(targets)
        curves, targets = _stream(model, plan, targets, score_fn, batch_size, progress)
    if callable_target:
        score_name = getattr(target, "__name__", type(target).__name__)
    return FlippingResult(
        curves=curves.clone(), counts=torch.tensor(plan.counts), num_regions=plan.num_regions,
        orders=plan.orders, target=targets.clone(), score=score_name, fill=repr(plan.fill),
        patch_size=patch_size, ranks=plan.ranks.clone(), size=tuple(x.shape[-2:]), mode=mode,
    )


def clean_argmax(model, x: Tensor, batch_size: int) -> Tensor:
    """The class the model predicts for each clean input, in chunks of ``batch_size``."""
    return torch.cat([model_output(model, chunk).argmax(1) for chunk in x.split(batch_size)])


def model_output(model, inputs: Tensor) -> Tensor:
    """``model(inputs)``, which must be a tensor of shape ``(N, classes)``."""
    output = model(inputs)
    if not isinstance(output, Tensor):
        raise TypeError(f"the model returned {type(output).__name__}; lrpx.eval needs a tensor of shape "
                        "(N, classes): pass a function that returns the logits, e.g. lambda x: model(x)[0]")
    if output.dim() != 2:
        raise ValueError(f"model output must be (N, classes), got shape {tuple(output.shape)}")
    return output


def item_indices(batch: int, orders: int, steps: int, device=None) -> tuple[Tensor, ...]:
    """Step-major ``(order, sample, step)`` indices of all items; step 0 once per sample.

    Returns
    -------
    tuple of Tensor
        Three ``(B * (1 + orders * steps),)`` int64 tensors.
    """
    per_step = orders * batch
    step = torch.arange(1, steps + 1, device=device).repeat_interleave(per_step)
    order = torch.arange(orders, device=device).repeat_interleave(batch).repeat(steps)
    sample = torch.arange(batch, device=device).repeat(orders * steps)
    first = torch.arange(batch, device=device)
    zeros = torch.zeros_like(first)
    return torch.cat([zeros, order]), torch.cat([first, sample]), torch.cat([zeros, step])


def _stream(model, plan: Perturbation, targets, score_fn, batch_size: int,
            progress: bool) -> tuple[Tensor, Tensor]:
    batch, device = plan.x.shape[0], plan.x.device
    order, sample, step = item_indices(batch, len(plan.orders), len(plan.counts) - 1, device)
    scores = torch.empty(order.numel(), dtype=torch.float64, device=device)
    if callable(targets):  # scores picked by the caller from any output
        for start in tqdm(range(0, order.numel(), batch_size), disable=not progress, desc="pixel flipping",
                          unit="batch"):
            part = slice(start, start + batch_size)
            inputs, _ = plan(order[part], sample[part], step[part])
            scores[part] = target_scores(targets, model(inputs), sample[part])
        known = torch.full((batch,), -1, dtype=torch.long, device=device)
        return _curves(plan, order, sample, step, scores), known
    known = targets if targets is not None else torch.zeros(batch, dtype=torch.long, device=device)
    chunks = range(0, order.numel(), batch_size)
    for start in tqdm(chunks, disable=not progress, desc="pixel flipping", unit="batch"):
        part = slice(start, start + batch_size)
        inputs, _ = plan(order[part], sample[part], step[part])
        output = model_output(model, inputs)
        if targets is None:
            clean = step[part] == 0
            known[sample[part][clean]] = output[clean].argmax(dim=1)
        check_target_range(known, output)
        scores[part] = score_fn(output, known[sample[part]]).double()
    return _curves(plan, order, sample, step, scores), known


def _curves(plan: Perturbation, order: Tensor, sample: Tensor, step: Tensor, scores: Tensor) -> Tensor:
    curves = torch.empty(len(plan.orders), plan.x.shape[0], len(plan.counts), dtype=torch.float64,
                         device=scores.device)
    curves[order, sample, step] = scores
    curves[:, :, 0] = scores[:plan.x.shape[0]]
    return curves


def target_scores(target: Callable, output, sample: Tensor) -> Tensor:
    """``target(output, sample)`` of a callable target (see :mod:`lrpx.targets`), checked to be
    one score per item; ``sample`` says which sample of the batch each item comes from."""
    scores = target(output, sample)
    if not isinstance(scores, Tensor) or scores.shape != sample.shape:
        got = f"shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the target callable returned {got}; it must return ({sample.numel()},), one score per "
                         "input")
    return scores.detach().double()


def check_target(target, x: Tensor) -> Tensor | Callable | None:
    """The target as ``(B,)`` class indices, a callable, or None."""
    if target is None or (callable(target) and not isinstance(target, Tensor)):
        return target
    batch = x.shape[0]
    target = torch.as_tensor(target, device=x.device)
    if target.is_floating_point() or target.dim() > 1:
        raise ValueError(f"target must be an int or {batch} ints, got {target!r}")
    target = target.long().expand(batch) if target.dim() == 0 else target.long()
    if target.shape != (batch,):
        raise ValueError(f"target must be an int or {batch} ints (one per sample), got "
                         f"{target.numel()}")
    if bool((target < 0).any()):
        raise ValueError(f"target must be non-negative class indices, got {target.tolist()}")
    return target.clone()


def check_target_range(target: Tensor, output: Tensor) -> None:
    if bool((target >= output.shape[1]).any()):
        raise ValueError(
            f"target out of range: the model has {output.shape[1]} classes, got "
            f"{target.tolist()}"
        )


def warn_if_training(model) -> None:
    if isinstance(model, torch.nn.Module) and model.training:
        warnings.warn(
            "model is in training mode: dropout and batch-norm statistics make the scores "
            "depend on the batch; call model.eval() first",
            UserWarning,
            stacklevel=4,
        )


def number_of_calls(batch: int, orders: int, steps: int, batch_size: int) -> int:
    """Model calls :func:`pixel_flipping` makes: ``ceil(B (1 + orders T) / batch_size)``."""
    return math.ceil(batch * (1 + orders * steps) / batch_size)
