"""Tiny language models with the Hugging Face interface that ``lrpx.convert`` handles today.

``get_input_embeddings()`` is a plain ``nn.Embedding`` (kept as it is by ``convert(...,
twins={nn.Embedding: None})``); ``forward`` accepts ``input_ids=`` or ``inputs_embeds=`` and
``attention_mask=`` and returns an object with ``.logits``. Their forward builds tensors from the
input's sizes and dtype, which ``torch.fx`` does not trace, so ``convert`` gives them run-time rules
and they keep their methods (a traced model is rebuilt as a ``GraphModule`` and loses
``get_input_embeddings`` today).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import lrpx


@dataclass
class Output:
    logits: Tensor


def causal_weights(mask: Tensor | None, length: int, batch: int, dtype) -> Tensor:
    """``(B, T, S)`` 1 where token ``s <= t`` is a real token (a causal bag of tokens)."""
    weights = torch.tril(torch.ones(length, length, dtype=dtype)).expand(batch, length, length)
    if mask is not None:
        weights = weights * mask[:, None, :].to(dtype)
    return weights


class _Tokens(nn.Module):
    """An ``embed`` table read by ``get_input_embeddings``; ``inputs_embeds`` or its lookup of the ids."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def embeds(self, input_ids, inputs_embeds):
        return self.embed(input_ids) if inputs_embeds is None else inputs_embeds


class BagLM(_Tokens):
    """``logits[b, t] = sum_{s <= t, mask[s] = 1} W e[b, s]``: a causal bag of tokens, no bias.

    The sum over tokens is a reduction (``sum``), so LRP splits each logit over the tokens by
    their share ``(W e_s)_k``, and the Epsilon rule on the bias-free head splits it further over
    the hidden units: the relevance of token ``s`` is exactly ``(W e_s)_k`` for the explained id ``k``.
    """

    def __init__(self, vocabulary: int = 13, hidden: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.head = nn.Linear(hidden, vocabulary, bias=False)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        inputs_embeds = self.embeds(input_ids, inputs_embeds)
        batch, length, _ = inputs_embeds.shape
        per_token = self.head(inputs_embeds)  # (B, S, V)
        weights = causal_weights(attention_mask, length, batch, per_token.dtype)
        return Output((weights.unsqueeze(-1) * per_token.unsqueeze(1)).sum(2))


class ToyLM(_Tokens):
    """Linear, ReLU, causal averaging, LayerNorm and an LM head: a small nonlinear causal LM."""

    def __init__(self, vocabulary: int = 17, hidden: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocabulary)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        inputs_embeds = self.embeds(input_ids, inputs_embeds)
        batch, length, _ = inputs_embeds.shape
        h = self.act(self.fc(inputs_embeds))
        weights = causal_weights(attention_mask, length, batch, h.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        return Output(self.head(self.norm(weights @ h)))


class BagClassifier(_Tokens):
    """``logits[b] = sum_{s, mask[s] = 1} W e[b, s]``: a bag-of-tokens sequence classifier; returns
    ``{"logits": ...}``."""

    def __init__(self, vocabulary: int = 13, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.head = nn.Linear(hidden, classes, bias=False)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        inputs_embeds = self.embeds(input_ids, inputs_embeds)
        batch, length, _ = inputs_embeds.shape
        per_token = self.head(inputs_embeds)
        weights = torch.ones(batch, length, dtype=per_token.dtype)
        if attention_mask is not None:
            weights = weights * attention_mask.to(per_token.dtype)
        per_token = per_token * weights.unsqueeze(-1)
        return {"logits": per_token.sum(1)}


class BagSeq2Seq(_Tokens):
    """An encoder-decoder bag of tokens: ``logits[b, t] = sum_{s, mask[s] = 1} A e[b, s] +
    sum_{u <= t, dmask[u] = 1} B d[b, u]`` (encoder tokens ``e``, decoder tokens ``d``, their own
    tables, bias-free heads ``A`` and ``B``). The relevance of encoder token ``s`` for id ``k`` at
    any position is ``(A e_s)_k``, of decoder token ``u <= t`` it is ``(B d_u)_k``."""

    class _Decoder(_Tokens):
        def __init__(self, vocabulary: int, hidden: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocabulary, hidden)

    def __init__(self, vocabulary: int = 11, hidden: int = 5) -> None:
        super().__init__()
        self.config = type("Config", (), {"is_encoder_decoder": True})()
        self.embed = nn.Embedding(vocabulary, hidden)
        self.decoder = self._Decoder(vocabulary, hidden)
        self.encoder_head = nn.Linear(hidden, vocabulary, bias=False)
        self.decoder_head = nn.Linear(hidden, vocabulary, bias=False)

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, decoder_input_ids=None,
                decoder_inputs_embeds=None, decoder_attention_mask=None):
        encoded = self.encoder_head(self.embeds(input_ids, inputs_embeds))  # (B, S, V)
        if attention_mask is not None:
            encoded = encoded * attention_mask.unsqueeze(-1).to(encoded.dtype)
        decoded = self.decoder_head(self.decoder.embeds(decoder_input_ids, decoder_inputs_embeds))  # (B, T, V)
        batch, length, _ = decoded.shape
        weights = causal_weights(decoder_attention_mask, length, batch, decoded.dtype)
        context = encoded.sum(1, keepdim=True)  # (B, 1, V): every position sees the whole source
        return Output(context + (weights.unsqueeze(-1) * decoded.unsqueeze(1)).sum(2))


def converted(model: nn.Module) -> nn.Module:
    """``lrpx.convert`` with the embedding kept as it is (it runs outside the explained part)."""
    return lrpx.convert(model, lrpx.Composite(), twins={nn.Embedding: None})


def greedy(model: nn.Module, prompt: Tensor, new_tokens: int) -> Tensor:
    """Greedy decoding by hand: append the top next-token id ``new_tokens`` times."""
    sequences = prompt
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=sequences).logits
            sequences = torch.cat([sequences, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return sequences


def tiny_gpt2(seed: int, vocabulary: int = 24, **config):
    """A one-layer GPT-2 language model (hidden size 8, random weights from ``seed``), or a skip
    where transformers is not installed."""
    import pytest
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocabulary, n_positions=16, n_embd=8, n_layer=1, n_head=2, **config)).eval()
