"""The inputs of token explanations, checked, and the forward they explain.

:func:`lrpx.explain_tokens` embeds the token ids outside the model and runs it on
``inputs_embeds=``. This module checks what it is given (ids, masks, positions, targets, a
decoder's input, extra keyword arguments) with errors that name the problem, finds the logits in
a model's output, numbers the positions of padded sequences as ``generate`` does, and checks
that the forward on the embeddings computes what the model computes from ``input_ids``
(:func:`check_same_forward`).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_same_forward", "padded_positions", "input_embedding", "model_logits", "check_positions",
           "check_targets"]


def _device(embedding: nn.Module, default: torch.device) -> torch.device:
    weight = getattr(embedding, "weight", None)
    return weight.device if isinstance(weight, Tensor) else default


def check_same_forward(model: nn.Module, logits: Tensor, ids: Tensor, mask: Tensor | None,
                       decoder: tuple[Tensor, Tensor | None] | None = None, inputs: Mapping[str, Any] | None = None,
                       own_embedding: bool = True) -> None:
    """Raise if ``logits`` (of the forward on the embeddings, as explained) are not what ``model``
    computes from ``input_ids=ids`` with the same mask, positions (:func:`padded_positions`) and
    inputs: a model that scales the embeddings of ``input_ids`` only (Marian, Pegasus), or pools
    the last token it finds from ``input_ids`` (transformers' decoder classifiers, padding at the
    end), would be explained for another forward than its own. Compared at the real tokens,
    without gradients, in one forward; a converted model with its own embedding runs it once per
    kind of batch (padding at the start, at the end, a padding id among the real tokens, a
    decoder). Not for a model in training mode or whose forward takes no ``input_ids`` by name."""
    if getattr(model, "training", False) or not _named(model, "input_ids"):
        return
    key = _layout(model, ids, mask, decoder)
    memo = getattr(getattr(model, "lrpx_graph", None), "verified", None) if own_embedding else None
    if memo is not None and key in memo:
        return
    kwargs: dict[str, Any] = {"input_ids": ids}
    if mask is not None:
        kwargs.update(attention_mask=mask, **padded_positions(model, mask))
    kwargs.update(inputs or {})
    real = mask
    if decoder is not None:
        kwargs["decoder_input_ids"], real = decoder
        if real is not None:
            kwargs["decoder_attention_mask"] = real
    with torch.no_grad():
        expected = model_logits(model(**kwargs)).detach()
    got = logits.detach()
    if got.shape != expected.shape:
        gap, scale = float("inf"), 0.0
    else:
        where = torch.ones(got.shape[:-1], dtype=torch.bool, device=got.device) if got.dim() == 2 or real is None \
            else real.to(got.device) == 1
        a, b = got[where].double(), expected[where].double()
        finite = torch.isfinite(a) & torch.isfinite(b)
        difference = torch.where(finite, (a - b).abs(), torch.where(a == b, 0.0, float("inf")))
        gap = float(difference.max()) if difference.numel() else 0.0
        scale = float(b[finite].abs().max()) if bool(finite.any()) else 0.0
    tolerance = max(1e-4, 16 * torch.finfo(got.dtype).eps) if got.is_floating_point() else 0.0
    if not gap <= tolerance * scale:
        raise ValueError(
            f"{type(model).__name__} computes other logits from the embeddings than from input_ids for this batch "
            f"(largest difference {gap:.3g} at the real tokens, largest logit {scale:.3g}); the relevance would "
            f"explain another forward than the model's. {_causes(key)}")
    if memo is not None:
        memo.add(key)


def _layout(model: nn.Module, ids: Tensor, mask: Tensor | None, decoder) -> str:
    """The kind of batch that the forward's agreement depends on."""
    parts = ["decoder" if decoder is not None else "alone"]
    if mask is not None and _padding_before_real(mask):
        parts.append("padding at the start")
    if mask is not None and _padding_before_real(mask.flip(-1)):
        parts.append("padding at the end")
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and bool(((ids == pad) & (mask == 1 if mask is not None else True)).any()):
        parts.append("padding id among the real tokens")
    return ", ".join(parts)


def _causes(layout: str) -> str:
    causes = ["A model that scales the embeddings of input_ids in its forward (Marian's and Pegasus's encoders) "
              "needs embedding=lrpx.text.ScaledEmbedding(encoder.embed_tokens, encoder.embed_scale)."]
    if "padding at the end" in layout or "padding id among" in layout:
        causes.append("A classifier that pools the last token that is not padding finds it from input_ids only: "
                      "pad on the left, and do not use the padding id for a real token.")
    return " ".join(causes)


#: keyword arguments explain_tokens passes itself
_OWN_INPUTS = ("input_ids", "inputs_embeds", "attention_mask", "decoder_input_ids", "decoder_inputs_embeds",
               "decoder_attention_mask", "pixel_values")


def _check_inputs(inputs, pixel_values) -> dict[str, Any]:
    """``inputs`` as a dict of keyword arguments that explain_tokens does not set itself, and
    ``pixel_values`` checked to be a floating tensor."""
    if pixel_values is not None and not (isinstance(pixel_values, Tensor) and pixel_values.is_floating_point()):
        given = pixel_values.dtype if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise TypeError(f"pixel_values must be a floating-point tensor, got {given}")
    if inputs is None:
        return {}
    if not isinstance(inputs, Mapping) or not all(isinstance(k, str) for k in inputs):
        raise TypeError(f"inputs must map keyword names to values, got {type(inputs).__name__}")
    own = [k for k in inputs if k in _OWN_INPUTS]
    if own:
        raise ValueError(f"inputs may not hold {own[0]!r}: explain_tokens sets it itself (input_ids, "
                         "attention_mask, decoder_input_ids, decoder_attention_mask and pixel_values are its own "
                         "arguments)")
    return dict(inputs)


def _decoder_inputs(model: nn.Module, decoder_input_ids, decoder_attention_mask, batch: int,
                    embedding: nn.Module | None = None):
    """``(ids, mask, embedding)`` of an encoder-decoder model's decoder input, checked, or
    ``None`` for other models; the error that names what is wrong."""
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if decoder_input_ids is None:
        if embedding is not None:
            raise ValueError("decoder_embedding given without decoder_input_ids")
        if encoder_decoder or decoder_attention_mask is not None:
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model: pass decoder_input_ids, the "
                             "decoder's output so far (starting with its start token, as generate returns it)"
                             if encoder_decoder else "decoder_attention_mask given without decoder_input_ids")
        return None
    if not encoder_decoder or not hasattr(model, "get_decoder"):
        raise ValueError(f"decoder_input_ids is for encoder-decoder models (T5, BART); {type(model).__name__} is "
                         "not one")
    ids = _check_ids(decoder_input_ids, "decoder_input_ids")
    if len(ids) != batch:
        raise ValueError(f"decoder_input_ids has {len(ids)} sequences, input_ids has {batch}; they must match")
    mask = _check_mask(decoder_attention_mask, ids, "decoder_attention_mask", "decoder_input_ids")
    embedding = input_embedding(model.get_decoder()) if embedding is None else _check_embedding(embedding)
    _check_vocabulary(ids, embedding)
    return ids, mask, embedding


def padded_positions(model: nn.Module, attention_mask: Tensor) -> dict[str, Tensor]:
    """``{"position_ids": ...}`` that count the real tokens only, as ``generate`` does, when the mask
    has padding before a real token and ``model.forward`` takes ``position_ids``; else ``{}``.

    Some models (GPT-2) number the positions from 0 at the first column whatever the mask says, so
    a left-padded sequence would see its tokens at other positions than unpadded. Padding after
    the real tokens moves none of them: the model numbers them as it does.
    """
    if not _padding_before_real(attention_mask) or not _named(model, "position_ids"):
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp_min(0)}


def _padding_before_real(mask: Tensor) -> bool:
    """Whether some sequence of ``mask`` has a padding position before a real token."""
    m = mask.long()
    return bool((m[:, 1:] > m[:, :-1]).any())


def _named(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` by that name."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def input_embedding(model: nn.Module) -> nn.Embedding:
    """``model.get_input_embeddings()``, checked to be an embedding with a vocabulary size."""
    getter = getattr(model, "get_input_embeddings", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(): token relevance needs a model with "
                        "the Hugging Face interface (get_input_embeddings, inputs_embeds=, attention_mask=)")
    return _check_embedding(getter())


def _check_embedding(embedding) -> nn.Module:
    if not isinstance(embedding, nn.Module) or not hasattr(embedding, "num_embeddings"):
        raise TypeError(f"the input embedding is a {type(embedding).__name__}; expected an nn.Embedding")
    return embedding


def model_logits(output) -> Tensor:
    """The logits of a model's output: ``output.logits``, ``output["logits"]`` or the tensor itself."""
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif hasattr(output, "logits"):
        logits = output.logits
    else:
        raise TypeError(f"the model returned {type(output).__name__} without logits; expected a tensor or an "
                        "output with .logits")
    if not isinstance(logits, Tensor) or logits.dim() not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model's logits have shape {shape}; expected (B, T, vocabulary) of a causal LM or "
                         "(B, classes) of a sequence classifier")
    return logits


def _check_ids(input_ids, name: str = "input_ids") -> Tensor:
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(input_ids.shape)}; expected (batch, tokens) with at least one "
                         "sequence of at least one token")
    return ids.long()


def _check_mask(attention_mask, ids: Tensor, name: str = "attention_mask", of: str = "input_ids") -> Tensor | None:
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(attention_mask).__name__}")
    mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {tuple(attention_mask.shape)}, but {of} has "
                         f"{tuple(ids.shape)}; they must match")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 (padding) and 1 (real token)")
    return mask.to(ids.device)


def _check_vocabulary(ids: Tensor, embedding: nn.Module) -> None:
    vocabulary = int(embedding.num_embeddings)
    bad = (ids < 0) | (ids >= vocabulary)
    if bool(bad.any()):
        first = int(ids[bad][0])
        raise ValueError(f"token id {first} is outside the vocabulary of {vocabulary} ids (valid: 0..{vocabulary - 1})")


def _rows(logits: Tensor, position, shape: torch.Size, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The ``(B, V)`` logits explained and the ``(B,)`` positions (None for a classifier); a
    negative position counts from each sequence's last real token under ``mask``."""
    batch, length = shape
    if logits.shape[0] != batch:
        raise ValueError(f"the model returned logits for {logits.shape[0]} sequences, not {batch}")
    if logits.dim() == 2:
        return logits.detach(), None
    if logits.shape[1] != length:
        raise ValueError(f"the model returned logits at {logits.shape[1]} positions for {length} tokens")
    p = check_positions(position, batch, length, logits.device, mask)
    return logits.detach()[torch.arange(batch, device=logits.device), p], p


def check_positions(position, batch: int, length: int, device, mask: Tensor | None = None) -> Tensor:
    """``position`` (an int, or one per sequence; negative counts from the end, or with the
    attention ``mask`` from each sequence's last real token) as ``(batch,)`` indices into
    sequences of ``length``, or the error that names what is wrong."""
    given = _per_sequence(position, batch, "position", device)
    outside = (given < -length) | (given >= length)
    if bool(outside.any()):
        raise ValueError(f"position {int(given[outside][0])} is beyond the sequence of {length} "
                         f"tokens (valid: 0..{length - 1}, or -{length}..-1)")
    if mask is None:
        return torch.where(given < 0, given + length, given)
    # padding at the end: -1 is the last real token, as with padding at the start
    columns = torch.arange(length, device=device)
    ends = torch.where(mask.to(device) == 1, columns, -1).amax(1) + 1
    ends = torch.where(ends > 0, ends, length)  # a sequence without real tokens: from the end
    p = torch.where(given < 0, given + ends, given)
    if bool((p < 0).any()):
        b = int((p < 0).nonzero()[0, 0])
        raise ValueError(f"position {int(given[b])} is beyond the {int(ends[b])} real tokens of sequence {b}")
    return p


def check_targets(target, rows: Tensor, what: str) -> Tensor:
    """``target`` (an int, or one per sequence; ``None``: the top one) as ``(B,)`` indices into
    the rows of logits ``rows``, or the error that names what is wrong (``what`` the rows hold)."""
    batch, size = rows.shape
    if target is None:
        return rows.argmax(1)
    t = _per_sequence(target, batch, "target", rows.device)
    outside = (t < 0) | (t >= size)
    if bool(outside.any()):
        raise ValueError(f"target {int(t[outside][0])} is outside the logits: the model has "
                         f"{size} {what} (valid: 0..{size - 1})")
    return t


def _per_sequence(value, batch: int, name: str, device) -> Tensor:
    t = torch.as_tensor(value, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1:
        raise TypeError(f"{name} must be an int or {batch} ints, got {value!r}")
    t = t.long().expand(batch).clone() if t.dim() == 0 else t.long()
    if t.shape != (batch,):
        raise ValueError(f"{name} must be an int or {batch} ints (one per sequence), got {t.numel()}")
    return t
