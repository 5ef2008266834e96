"""LRP rules: immutable objects that map output relevance to input relevance.

==============  ===========================================================
rule            use
==============  ===========================================================
``Epsilon``     LRP-epsilon, upper layers (LRP-0 with ``epsilon=0``)
``ZPlus``       z+, convolutions after ReLU
``AlphaBeta``   alpha-beta (``alpha - beta = 1``)
``Gamma``       generalized gamma, lower and middle convolutions
``ZBox``        zB, first layer on bounded input
``Flat``        flat, first layer
``WSquare``     w-square, first layer on unbounded input
``Pass``        identity, activations (and whole normalisation layers)
``Norm``        proportional split: average pooling, sums, normalisations
``Taylor``      softmax (AttnLRP)
``Uniform``     products of two activations: attention matmuls, gates
==============  ===========================================================

Each rule's ``kinds`` names the kinds of layer it applies to (:data:`KINDS`).
"""
from .attention import Taylor, Uniform
from .base import KINDS, Layer, Rule, stabilize
from .elementwise import Norm, Pass
from .linear import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

__all__ = [
    "Rule", "Layer", "KINDS", "stabilize",
    "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare", "Pass", "Norm", "Taylor", "Uniform",
]
