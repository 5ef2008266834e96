"""Token flipping: perturbation curves of language models, by token relevance.

The text counterpart of :func:`~lrpx.eval.pixel_flipping`. The removable tokens of a sequence
are its real tokens (attention mask 1) and, for a causal language model (logits ``(B, T, V)``),
only those at or before the explained position (later tokens cannot change its logits). With
``n`` removable tokens and ``S`` steps, step ``k`` removes the first ``floor(k n / S)`` of them in
the order, so step ``S`` removes all. The score after each step is the target's log-probability,
``log_softmax(logits[position])[target]``. All perturbed sequences of a call are independent; they
are stacked along the batch and go through the model in chunks of ``batch_size``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..text_inputs import _check_ids, _check_mask, check_positions, check_targets, model_logits, padded_positions
from . import scores as _scores
from .flipping import warn_if_training
from .order import ORDERS
from .result import order_row

__all__ = ["token_flipping", "TokenFlippingResult", "REPLACEMENTS", "number_of_token_calls", "perturb"]

REPLACEMENTS = ("mask", "pad", "unk", "delete")


@dataclass(frozen=True, eq=False)
class TokenFlippingResult:
    """Token perturbation curves and their scores.

    Attributes
    ----------
    curves
        ``(orders, B, S + 1)`` float64 log-probability of the target after each step; column 0
        is the clean input.
    removed
        ``(B, S + 1)`` int64 number of tokens removed after each step.
    removable
        ``(B,)`` int64 number of removable tokens of each sequence.
    orders
        Order names, one per row of ``curves``.
    target
        ``(B,)`` token id (or class) whose log-probability is tracked.
    position
        ``(B,)`` explained position of the clean input; ``None`` for a sequence classifier.
    replace
        ``"delete"`` or the replacement token id.
    ranks
        ``(orders, B, T)`` removal position of each token; ``T`` for tokens never removed.
    """

    curves: Tensor
    removed: Tensor
    removable: Tensor
    orders: tuple[str, ...]
    target: Tensor
    position: Tensor | None
    replace: str | int
    ranks: Tensor

    @property
    def fractions(self) -> Tensor:
        """``(S + 1,)`` float64 ``k / S``, the x axis (share of removable tokens removed)."""
        return torch.linspace(0.0, 1.0, self.curves.shape[-1], dtype=torch.float64)

    def curve(self, order: str | None = None) -> Tensor:
        """``(B, S + 1)`` curves of one order (may be omitted when there is only one)."""
        return self.curves[self._row(order)]

    def auc(self, order: str | None = None) -> Tensor:
        """``(B,)`` area under the curve on ``x = k / S`` from 0 to 1 (``torch.trapezoid``)."""
        return torch.trapezoid(self.curve(order), self.fractions, dim=-1)

    def aopc(self, order: str | None = None) -> Tensor:
        """``(B,)`` area over the perturbation curve, ``mean_k (y_0 - y_k)``."""
        return _scores.aopc(self.curve(order))

    def srg(self) -> Tensor:
        """``(B,)`` symmetric relevance gain ``auc(lrf) - auc(morf)``."""
        return self.auc("lrf") - self.auc("morf")

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and standard deviation over the sequences of the AUC and AOPC of each order."""
        table = {}
        for order in self.orders:
            table[f"auc_{order}"] = _scores.mean_std(self.auc(order))
            table[f"aopc_{order}"] = _scores.mean_std(self.aopc(order))
        if {"morf", "lrf"} <= set(self.orders):
            table["srg"] = _scores.mean_std(self.srg())
        return table

    def _row(self, order: str | None) -> int:
        return order_row(self.orders, order)


def token_flipping(
    model: nn.Module,
    input_ids: Tensor,
    relevance: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    order: str | Sequence[str] = "morf",
    replace: str | int = "mask",
    steps: int | None = None,
    attention_mask: Tensor | None = None,
    position: int | Sequence[int] | Tensor = -1,
    seed: int = 0,
    batch_size: int = 64,
) -> TokenFlippingResult:
    """Remove tokens in relevance order and track the target's log-probability.

    For sequence ``b`` with ``n_b`` removable tokens (see the module's docstring) ranked by
    ``relevance`` (``"morf"``: decreasing, ties by position; ``"lrf"``: the exact reverse;
    ``"random"``: a permutation drawn from ``seed``), step ``k = 0..S`` removes the first
    ``m_bk = floor(k n_b / S)`` tokens of the order and records

    .. math:: y_{bk} = \\log \\operatorname{softmax}(f(\\tilde x_{bk})_{p_b})_{c_b}

    with ``f`` the model's logits, ``p_b`` the explained position and ``c_b`` the target.
    ``auc = trapezoid(y_b, x)`` with ``x_k = k / S``, from 0 to 1.

    Parameters
    ----------
    model
        A language model with the Hugging Face interface, called as
        ``model(input_ids=..., attention_mask=...)``; its output has ``.logits`` (or is the logits):
        ``(N, T, V)`` for a causal LM, ``(N, C)`` for a sequence classifier. Should be in eval mode.
    input_ids
        ``(B, T)`` token ids.
    relevance
        ``(B, T)`` token relevance (e.g. from :func:`lrpx.explain_tokens`).
    target
        Token id (or class) per sequence, an int for all; ``None``: the top one on the clean input.
    order
        ``"morf"``, ``"lrf"``, ``"random"``, or several of them.
    replace
        What a removed token becomes: ``"mask"``, ``"pad"`` or ``"unk"`` (the model config's
        ``mask_token_id`` / ``pad_token_id`` / ``unk_token_id``), a token id, or ``"delete"``: the
        token is dropped and the kept tokens are left-padded back to length ``T`` (pad id from the
        config, else 0; attention mask 0 there, and ``position_ids`` that count the real tokens
        when the model takes them, see :func:`lrpx.text_inputs.padded_positions`); the explained
        position moves with its token (when every token up to it is deleted, the score is read
        at a padded position: the model's answer to an empty prefix).
    steps
        ``S``; ``None``: the largest ``n_b`` (one token per step for the longest sequence).
    attention_mask
        ``(B, T)`` 1 for real tokens, 0 for padding (never removed).
    position
        Explained position of a causal LM, an int or ``(B,)``, negative from each sequence's last real
        token (as in :func:`lrpx.explain_tokens`).
    seed
        Seed of the random order.
    batch_size
        Sequences per model call.

    Returns
    -------
    TokenFlippingResult
        ``curves`` ``(orders, B, S + 1)``, ``.curve(order)``, ``.auc(order)``, ``.aopc(order)``, ``.srg()``.
    """
    ids = _check_ids(input_ids)
    mask = _check_mask(attention_mask, ids)
    mask = torch.ones_like(ids) if mask is None else mask.long()
    orders = _check_orders(order)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    replacement = _replacement(model, replace)
    warn_if_training(model)
    with torch.inference_mode():
        clean = _forward(model, ids, mask)
        positions = _positions(clean, position, ids.shape, mask)
        what = "classes" if positions is None else "token ids"
        targets = check_targets(target, _at(clean, positions), what)
        removable = (mask == 1) if positions is None else (mask == 1) & (
            torch.arange(ids.shape[1], device=ids.device) <= positions[:, None])
        scores = _log_probability(clean, positions, targets)
        ranks = torch.stack([_ranks(_check_relevance(relevance, ids), removable, name, seed) for name in orders])
        counts = _counts(removable.sum(1), steps)
        curves = _curves(model, ids, mask, ranks, counts, replacement, positions, targets, batch_size)
        curves[:, :, 0] = scores.double()
    return TokenFlippingResult(curves=curves.clone(), removed=counts.clone(), removable=removable.sum(1).clone(),
                               orders=orders, target=targets.clone(),
                               position=None if positions is None else positions.clone(), replace=replacement,
                               ranks=ranks.clone())


def _curves(model, ids: Tensor, mask: Tensor, ranks: Tensor, counts: Tensor, replacement, positions, targets,
            batch_size: int) -> Tensor:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    orders, batch = ranks.shape[:2]
    steps = counts.shape[1] - 1
    curves = torch.empty(orders, batch, steps + 1, dtype=torch.float64, device=ids.device)
    o, b, k = (g.flatten() for g in torch.meshgrid(torch.arange(orders), torch.arange(batch),
                                                   torch.arange(1, steps + 1), indexing="ij"))
    for start in range(0, o.numel(), batch_size):
        part = slice(start, start + batch_size)
        removed = ranks[o[part], b[part]] < counts[b[part], k[part], None]
        inputs, attention, where = perturb(ids[b[part]], mask[b[part]], removed, replacement,
                                           None if positions is None else positions[b[part]], pad=pad)
        logits = _forward(model, inputs, attention)
        curves[o[part], b[part], k[part]] = _log_probability(logits, where, targets[b[part]]).double()
    return curves


def perturb(ids: Tensor, mask: Tensor, removed: Tensor, replacement: str | int, positions: Tensor | None, *,
            pad: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """The perturbed ``(ids, attention mask, positions)``: removed tokens replaced by the id
    ``replacement``, or (``"delete"``) dropped and the kept tokens left-padded with ``pad``."""
    if replacement != "delete":
        return torch.where(removed, torch.as_tensor(replacement, device=ids.device), ids), mask, positions
    kept = (mask == 1) & ~removed
    length = ids.shape[1]
    # stable sort puts the dropped tokens (key 0) first and keeps the order of the kept ones
    index = torch.argsort(kept.long(), dim=1, stable=True)
    new_mask = torch.gather(kept.long(), 1, index)
    new_ids = torch.where(new_mask == 1, torch.gather(ids, 1, index), torch.full_like(ids, pad))
    if positions is None:
        return new_ids, new_mask, None
    after = (kept & (torch.arange(length, device=ids.device) > positions[:, None])).sum(1)
    return new_ids, new_mask, length - 1 - after


def _forward(model, ids: Tensor, mask: Tensor) -> Tensor:
    return model_logits(model(input_ids=ids, attention_mask=mask, **padded_positions(model, mask)))


def _log_probability(logits: Tensor, positions: Tensor | None, targets: Tensor) -> Tensor:
    return torch.log_softmax(_at(logits, positions).double(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _at(logits: Tensor, positions: Tensor | None) -> Tensor:
    if positions is None:
        return logits
    return logits[torch.arange(logits.shape[0], device=logits.device), positions]


def _ranks(relevance: Tensor, removable: Tensor, order: str, seed: int) -> Tensor:
    """``(B, T)`` removal position of each token; ``T`` for tokens that are never removed."""
    batch, length = relevance.shape
    ranks = torch.full((batch, length), length, dtype=torch.long, device=relevance.device)
    generator = torch.Generator().manual_seed(seed)
    for b in range(batch):
        candidates = removable[b].nonzero().squeeze(1)
        if order == "random":
            sequence = candidates[torch.randperm(candidates.numel(), generator=generator).to(candidates.device)]
        else:
            morf = candidates[torch.argsort(relevance[b, candidates].double(), descending=True, stable=True)]
            sequence = morf if order == "morf" else morf.flip(0)
        ranks[b, sequence] = torch.arange(sequence.numel(), device=relevance.device)
    return ranks


def _counts(removable: Tensor, steps: int | None) -> Tensor:
    """``(B, S + 1)`` tokens removed after each step, ``floor(k n_b / S)``."""
    most = int(removable.max())
    if steps is None:
        steps = max(most, 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    k = torch.arange(steps + 1, device=removable.device)
    return torch.div(k[None, :] * removable[:, None], steps, rounding_mode="floor")


def _replacement(model, replace) -> str | int:
    if isinstance(replace, bool):
        raise TypeError(f"replace must be one of {REPLACEMENTS} or a token id, got {replace!r}")
    if isinstance(replace, int):
        if replace < 0:
            raise ValueError(f"replace must be a non-negative token id, got {replace}")
        return replace
    if replace not in REPLACEMENTS:
        raise ValueError(f"replace must be one of {REPLACEMENTS} or a token id, got {replace!r}")
    if replace == "delete":
        return replace
    value = getattr(getattr(model, "config", None), f"{replace}_token_id", None)
    if value is None:
        raise ValueError(f"replace={replace!r} needs model.config.{replace}_token_id, which this model does not "
                         f"set; pass the token id as replace=ID (e.g. tokenizer.{replace}_token_id)")
    return int(value)


def _check_orders(order) -> tuple[str, ...]:
    orders = (order,) if isinstance(order, str) else tuple(order)
    if not orders or any(o not in ORDERS for o in orders) or len(set(orders)) != len(orders):
        raise ValueError(f"order must be one or several distinct of {ORDERS}, got {order!r}")
    return orders


def _check_relevance(relevance, ids: Tensor) -> Tensor:
    if not isinstance(relevance, Tensor) or relevance.shape != ids.shape:
        got = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance).__name__
        raise ValueError(f"relevance must be a tensor of shape {tuple(ids.shape)} (one value per token), got {got}")
    if not torch.isfinite(relevance).all():
        raise ValueError("relevance contains NaN or inf")
    return relevance.to(ids.device)


def _positions(logits: Tensor, position, shape, mask: Tensor | None) -> Tensor | None:
    return None if logits.dim() == 2 else check_positions(position, *shape, logits.device, mask)


def number_of_token_calls(batch: int, orders: int, steps: int, batch_size: int) -> int:
    """Model calls of :func:`token_flipping`: one for the clean batch, then ``ceil(B orders S / batch_size)``."""
    return 1 + math.ceil(batch * orders * steps / batch_size)
