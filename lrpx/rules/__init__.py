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
``Pass``        identity, activations
``Norm``        proportional split, average pooling and residual sums
==============  ===========================================================
"""
from .base import Layer, Rule, stabilize
from .elementwise import Norm, Pass
from .linear import AlphaBeta, Epsilon, Flat, Gamma, WSquare, ZBox, ZPlus

__all__ = [
    "Rule", "Layer", "stabilize",
    "Epsilon", "ZPlus", "AlphaBeta", "Gamma", "ZBox", "Flat", "WSquare", "Pass", "Norm",
]
