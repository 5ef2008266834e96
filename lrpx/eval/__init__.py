"""Faithfulness evaluation: pixel flipping, insertion and deletion, faithfulness correlation,
randomization, sparseness, ground truth; fills; AUC / AOPC / SRG; token flipping of language models.

>>> result = lrpx.eval.pixel_flipping(model, x, relevance, patch_size=8, schedule="quadratic",
...                                   order=("morf", "lrf"), fill="inpaint")
>>> result.auc("morf"), result.srg(), result.summary()
"""

from .fills import (
    FILLS,
    ChannelMean,
    Constant,
    Fill,
    FunctionFill,
    GaussianBlur,
    Inpaint,
    Road,
    UniformNoise,
    get_fills,
)
from .ground_truth import relevance_mass_accuracy, relevance_rank_accuracy
from .flipping import item_indices, number_of_calls, pixel_flipping
from .metrics import deletion, faithfulness_correlation, insertion, pearson, sparseness
from .randomization import RandomizationResult, randomization, spearman, ssim
from .order import ORDERS, SCHEDULES, region_relevance, removal_order, schedule_counts
from .perturb import perturbed_inputs
from .result import FlippingResult
from .scores import SCORES, aopc, auc, mean_std, unit_step_auc
from .dataset import MetricSettings, evaluate_dataset
from .tokens import REPLACEMENTS, TokenFlippingResult, number_of_token_calls, token_flipping

__all__ = [
    "evaluate_dataset",
    "MetricSettings",
    "deletion",
    "insertion",
    "faithfulness_correlation",
    "sparseness",
    "randomization",
    "RandomizationResult",
    "pearson",
    "spearman",
    "ssim",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "FILLS",
    "ORDERS",
    "SCHEDULES",
    "SCORES",
    "ChannelMean",
    "Constant",
    "Fill",
    "FlippingResult",
    "FunctionFill",
    "GaussianBlur",
    "Inpaint",
    "Road",
    "UniformNoise",
    "aopc",
    "auc",
    "get_fills",
    "item_indices",
    "mean_std",
    "number_of_calls",
    "perturbed_inputs",
    "pixel_flipping",
    "region_relevance",
    "removal_order",
    "schedule_counts",
    "unit_step_auc",
    "token_flipping",
    "TokenFlippingResult",
    "REPLACEMENTS",
    "number_of_token_calls",
]
