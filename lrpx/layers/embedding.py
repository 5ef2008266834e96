"""The twin of ``nn.Embedding``: the table lookup, as a constant.

A lookup reads rows of its weight at integer indices; no relevance can go to the indices.
Language models are explained at their word embeddings instead: the caller looks the
embeddings up (``model.get_input_embeddings()(input_ids)``), marks them as requiring grad and
passes them as ``inputs_embeds``; the gradient of the converted model with respect to them is
their relevance. Embeddings of positions or token types are computed from constants, so the
sum that adds them to the word embeddings gives them their share of the relevance, as it
gives a bias its share: they absorb it.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Twin

__all__ = ["LRPEmbedding"]


class LRPEmbedding(Twin, nn.Embedding):
    """``nn.Embedding`` whose output is a constant: the same rows, computed from the detached
    weight, so that no gradient (and no relevance) reaches the weight. Its rule (the
    composite's element-wise rule) is never applied."""

    lrp_kind = "elementwise"

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(input, self.weight.detach(), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)
