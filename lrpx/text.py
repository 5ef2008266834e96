"""Relevance of the input tokens of language models (causal LMs, sequence classifiers,
encoder-decoders and vision-language models).

A model explained here follows the interface of Hugging Face ``transformers`` models: it has
``get_input_embeddings()`` (an ``nn.Embedding``), accepts ``inputs_embeds=`` and
``attention_mask=`` keyword arguments, and returns its logits as ``output.logits`` (or a tensor):
``(B, T, V)`` for a causal language model, ``(B, C)`` for a sequence classifier. The token ids
are embedded outside the model; the relevance is the gradient of the converted model's logits
with respect to these embeddings, with the explained logit's value as the initial relevance,
summed over the hidden size.

>>> lrp_model = lrpx.convert(model, lrpx.Composite())
>>> relevance, logits = lrpx.explain_tokens(lrp_model, input_ids)        # the next token's top id
>>> relevance, logits = lrpx.explain_generated(lrp_model, sequences, 12)  # the token generate wrote at 12

The checks of the inputs and of the explained forward are in :mod:`lrpx.text_inputs`.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .explain import _check_finite
from .text_inputs import (_check_embedding, _check_ids, _check_inputs, _check_mask, _check_vocabulary,
                          _decoder_inputs, _device, _rows, check_same_forward, check_targets, input_embedding,
                          model_logits, padded_positions)

__all__ = ["explain_tokens", "explain_generated", "TokenExplanation", "ScaledEmbedding", "model_logits",
           "input_embedding", "padded_positions", "check_same_forward"]


@dataclass(frozen=True)
class TokenExplanation:
    """What :func:`explain_tokens` returns; unpacks as ``relevance, logits = explain_tokens(...)``.

    Attributes
    ----------
    relevance
        ``(B, T)`` relevance of each input token: its embedding's relevance summed over the hidden
        size; exactly zero where the attention mask is 0.
    logits
        The model's logits (detached): ``(B, T, V)`` for a causal LM, ``(B, C)`` for a classifier.
    target
        ``(B,)`` the token id (or class) explained.
    score
        ``(B,)`` the explained logit, ``logits[b, position[b], target[b]]`` (or ``logits[b, target[b]]``).
    position
        ``(B,)`` non-negative position whose logits are explained; ``None`` for a classifier.
    embedding_relevance
        ``(B, T, H)`` relevance of each embedding entry (zero at padded tokens).
    decoder_relevance
        Encoder-decoder models: ``(B, S)`` relevance of each decoder input token (the output so
        far); the logits, position and score are then the decoder's. ``None`` otherwise.
    decoder_embedding_relevance
        ``(B, S, H)`` relevance of each decoder embedding entry, or ``None``.
    pixel_relevance
        Vision-language models given ``pixel_values``: the relevance of each pixel value, in
        the shape of ``pixel_values``; ``None`` otherwise.
    """

    relevance: Tensor
    logits: Tensor
    target: Tensor
    score: Tensor
    position: Tensor | None
    embedding_relevance: Tensor
    decoder_relevance: Tensor | None = None
    decoder_embedding_relevance: Tensor | None = None
    pixel_relevance: Tensor | None = None

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.relevance, self.logits))


class ScaledEmbedding(nn.Module):
    """``embedding(ids) * scale``: the embedding a model computes from ``input_ids`` where its
    forward scales the lookup itself (Marian's and Pegasus's encoders multiply by
    ``embed_scale`` only when given ids), for ``explain_tokens(..., embedding=...)``.

    >>> encoder = lrp_model.get_encoder()
    >>> embedding = ScaledEmbedding(encoder.embed_tokens, encoder.embed_scale)
    """

    def __init__(self, embedding: nn.Module, scale: float) -> None:
        super().__init__()
        self.embedding, self.scale = _check_embedding(embedding), float(scale)
        self.num_embeddings = embedding.num_embeddings

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.embedding(input_ids) * self.scale


def explain_tokens(
    lrp_model: nn.Module,
    input_ids: Tensor,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    position: int | Sequence[int] | Tensor = -1,
    attention_mask: Tensor | None = None,
    embedding: nn.Module | None = None,
    decoder_input_ids: Tensor | None = None,
    decoder_attention_mask: Tensor | None = None,
    pixel_values: Tensor | None = None,
    inputs: Mapping[str, Any] | None = None,
    decoder_embedding: nn.Module | None = None,
) -> TokenExplanation:
    """Relevance of each input token for one logit of a language model.

    The ids are embedded with ``lrp_model.get_input_embeddings()`` outside the model; the model
    runs on ``inputs_embeds=`` (and ``attention_mask=``), and the relevance is
    ``torch.autograd.grad(logits, embeds, grad_outputs=R)`` with ``R`` zero except the explained
    logit's own value at ``(b, position[b], target[b])``, summed over the hidden size.

    Parameters
    ----------
    lrp_model
        A model returned by :func:`lrpx.convert` with the Hugging Face interface (see the module's
        docstring). An unconverted model gives the gradient times the logit instead.
    input_ids
        ``(B, T)`` (or ``(T,)``, one sequence) integer token ids.
    target
        Token id explained at ``position`` for a causal LM, or class for a classifier: an int
        (every sequence), or ``(B,)`` ints; ``None`` takes each sequence's top logit.
    position
        Position (of ``T``) whose next-token logits are explained, an int or ``(B,)`` ints;
        negative counts from the end (``-1``, the default, predicts the token after the input);
        with ``attention_mask``, from each sequence's last real token, wherever its padding is.
        Not used for ``(B, C)`` logits.
    attention_mask
        ``(B, T)`` 1 for real tokens, 0 for padding; passed to the model (with the positions
        of :func:`padded_positions` when there is padding). Padded tokens get exactly zero relevance.
    embedding
        The input embedding (an ``nn.Embedding``) to use instead of
        ``lrp_model.get_input_embeddings()``, e.g. the original model's, or a
        :class:`ScaledEmbedding`. An encoder-decoder's decoder takes ``decoder_embedding``.
    decoder_input_ids
        Encoder-decoder models (T5, BART): ``(B, S)`` the decoder's input, the output so far
        (starting with the decoder's start token, as ``generate`` returns it); ``position``
        and ``target`` then refer to the decoder's logits, and both the encoder's and the
        decoder's tokens get relevance. Required for such models.
    decoder_attention_mask
        ``(B, S)`` mask of ``decoder_input_ids``.
    pixel_values
        Vision-language models (LLaVA, PaliGemma, Gemma 3, Qwen2-VL): the image(s) the prompt's
        image tokens stand for, passed to the model as ``pixel_values=``; they get relevance
        too (``pixel_relevance``), and the image tokens' own embeddings, which the model
        replaces by the image's features, get none.
    inputs
        Other keyword arguments of the model's forward, passed as they are (e.g.
        ``image_grid_thw``; ``position_ids`` where the model computes them from ``input_ids``,
        which it is not given: Qwen2-VL's ``model.model.get_rope_index(...)``).
    decoder_embedding
        The decoder's input embedding instead of ``lrp_model.get_decoder().get_input_embeddings()``
        (MVP's decoder scales the lookup of ids itself: a :class:`ScaledEmbedding`).

    Returns
    -------
    TokenExplanation
        ``(relevance, logits)`` and the target, score, position and embedding relevance.
    """
    ids = _check_ids(input_ids)
    mask = _check_mask(attention_mask, ids)
    embedding = input_embedding(lrp_model) if embedding is None else _check_embedding(embedding)
    _check_vocabulary(ids, embedding)
    decoder = _decoder_inputs(lrp_model, decoder_input_ids, decoder_attention_mask, len(ids), decoder_embedding)
    extra = _check_inputs(inputs, pixel_values)
    ids = ids.to(_device(embedding, ids.device))  # the ids go where the embedding is
    mask = None if mask is None else mask.to(ids.device)
    with torch.enable_grad():
        embeds = embedding(ids).detach().requires_grad_(True)
        kwargs: dict[str, Any] = {"inputs_embeds": embeds}
        if mask is not None:
            kwargs.update(attention_mask=mask, **padded_positions(lrp_model, mask))
        kwargs.update(extra)
        leaves, explained = [embeds], ids
        if pixel_values is not None:
            pixels = pixel_values.detach().to(ids.device).requires_grad_(True)
            kwargs["pixel_values"] = pixels
            leaves.append(pixels)
        if decoder is not None:
            dec_ids, dec_mask, dec_embedding = decoder
            dec_ids = dec_ids.to(_device(dec_embedding, ids.device))
            dec_mask = None if dec_mask is None else dec_mask.to(dec_ids.device)
            dec_embeds = dec_embedding(dec_ids).detach().requires_grad_(True)
            kwargs["decoder_inputs_embeds"] = dec_embeds
            if dec_mask is not None:
                kwargs["decoder_attention_mask"] = dec_mask
            leaves.append(dec_embeds)
            explained = dec_ids
        logits = model_logits(lrp_model(**kwargs))
        if not logits.requires_grad:
            raise ValueError("the model's logits do not depend on inputs_embeds; its forward must use the "
                             "inputs_embeds= it is given (and not run under torch.no_grad)")
        getter = getattr(lrp_model, "get_input_embeddings", None)
        check_same_forward(lrp_model, logits, ids, mask, None if decoder is None else (dec_ids, dec_mask),
                           {**extra, **({} if pixel_values is None else {"pixel_values": pixels.detach()})},
                           own_embedding=getter is not None and embedding is getter() and decoder_embedding is None)
        rows, positions = _rows(logits, position, explained.shape, dec_mask if decoder is not None else mask)
        classes = check_targets(target, rows, "classes" if positions is None else "token ids")
        r_out = torch.zeros_like(logits)
        batch = torch.arange(ids.shape[0], device=logits.device)
        index = (batch, classes) if positions is None else (batch, positions, classes)
        score = logits.detach()[index]
        r_out[index] = score
        grads = dict(zip(map(id, leaves), torch.autograd.grad(logits, leaves, grad_outputs=r_out,
                                                               allow_unused=True)))
    relevance = _masked(grads[id(embeds)], embeds, mask)
    found: dict[str, Tensor] = {}
    if pixel_values is not None:
        found["pixel_relevance"] = _masked(grads[id(pixels)], pixels, None)
    if decoder is not None:
        dec_relevance = _masked(grads[id(dec_embeds)], dec_embeds, dec_mask)
        found.update(decoder_relevance=dec_relevance.sum(-1), decoder_embedding_relevance=dec_relevance)
    return TokenExplanation(relevance.sum(-1), logits.detach(), classes, score, positions, relevance, **found)


def _masked(relevance: Tensor | None, embeds: Tensor, mask: Tensor | None) -> Tensor:
    """Embedding relevance (zeros where nothing reached it), checked finite, zero at padding."""
    relevance = torch.zeros_like(embeds) if relevance is None else relevance
    _check_finite(relevance)
    return relevance if mask is None else relevance.masked_fill((mask == 0).unsqueeze(-1), 0.0)


def explain_generated(
    lrp_model: nn.Module,
    sequences: Tensor,
    index: int,
    *,
    attention_mask: Tensor | None = None,
    embedding: nn.Module | None = None,
    input_ids: Tensor | None = None,
    pixel_values: Tensor | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> TokenExplanation:
    """Relevance of the tokens before ``sequences[:, index]`` for that token, as ``generate`` chose it.

    ``model.generate`` returns the prompt followed by the generated tokens (``sequences``); the
    token at ``index`` was predicted from ``sequences[:, :index]`` at its last position. This is
    :func:`explain_tokens` on that prefix with ``target=sequences[:, index]`` and ``position=-1``.
    For an encoder-decoder model, ``generate`` returns the decoder's tokens (``sequences``,
    starting with its start token) and ``input_ids`` is the encoder's input: the relevance is
    then that of ``input_ids`` and, as ``decoder_relevance``, of ``sequences[:, :index]``.

    Parameters
    ----------
    lrp_model
        A converted causal language model.
    sequences
        ``(B, L)`` token ids: prompt and generated tokens (left-padded prompts in a batch).
    index
        Position in ``sequences`` of the generated token to explain, ``1 <= index < L``
        (negative counts from the end).
    attention_mask
        ``(B, L)`` mask of ``sequences`` (the prompt's mask extended by ones); its first
        ``index`` columns go to the model. With ``input_ids``: the mask of ``input_ids``.
    embedding
        As in :func:`explain_tokens`.
    input_ids
        Encoder-decoder models: ``(B, T)`` the encoder's input that ``generate`` was given.
    pixel_values, inputs
        As in :func:`explain_tokens` (a vision-language model's image; ``inputs`` whose
        tensors span the sequence, like ``position_ids``, must cover the first ``index``
        tokens only).

    Returns
    -------
    TokenExplanation
        Relevance ``(B, index)`` of the prefix.
    """
    ids = _check_ids(sequences)
    length = ids.shape[1]
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    at = index + length if index < 0 else index
    if not 1 <= at < length:
        raise ValueError(f"index {index} is outside the sequences of length {length}: the explained token needs "
                         f"at least one token before it (valid: 1..{length - 1}, or -{length - 1}..-1)")
    encoder_decoder = bool(getattr(getattr(lrp_model, "config", None), "is_encoder_decoder", False))
    if encoder_decoder and input_ids is None:
        raise ValueError(f"{type(lrp_model).__name__} is an encoder-decoder model: pass input_ids, the encoder's "
                         "input that generate was given (sequences are the decoder's tokens)")
    if input_ids is not None and not encoder_decoder:
        raise ValueError(f"input_ids is for encoder-decoder models (T5, BART); {type(lrp_model).__name__} is not "
                         "one: its sequences hold the prompt")
    if input_ids is not None:
        return explain_tokens(lrp_model, input_ids, ids[:, at], position=-1, attention_mask=attention_mask,
                              embedding=embedding, decoder_input_ids=ids[:, :at], pixel_values=pixel_values,
                              inputs=inputs)
    mask = _check_mask(attention_mask, ids)
    prefix_mask = None if mask is None else mask[:, :at]
    return explain_tokens(lrp_model, ids[:, :at], ids[:, at], position=-1, attention_mask=prefix_mask,
                          embedding=embedding, pixel_values=pixel_values, inputs=inputs)

