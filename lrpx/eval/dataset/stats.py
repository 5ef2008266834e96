r"""Statistics of per-image scores: means with bootstrap confidence intervals, and paired
comparisons of two methods on the same images.

* :func:`bootstrap_ci`: the percentile bootstrap (Efron and Tibshirani 1993) of the mean,
  ``resamples`` resamples of the images with replacement from a seeded generator.
* :func:`paired_comparison`: the Wilcoxon signed-rank test (Wilcoxon 1945, two-sided, by
  :func:`scipy.stats.wilcoxon`) of the per-image differences, and its effect size, the
  matched-pairs rank-biserial correlation (Kerby 2014)
  :math:`r = (W^+ - W^-) / (W^+ + W^-)` in ``[-1, 1]``, where :math:`W^\pm` are the rank
  sums of the positive and negative differences (zero differences dropped): ``r = 1`` when
  the first method scores higher on every image.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "paired_comparison"]


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile-bootstrap confidence interval at
    ``level``; one value gives a zero-width interval, none gives NaNs."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return mean, float(low), float(high)


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Compare the paired scores ``a`` and ``b`` (one pair per image).

    Returns ``{"n", "mean_difference", "p_value", "rank_biserial"}``: the number of pairs, the
    mean of ``a - b``, the two-sided Wilcoxon signed-rank p-value (NaN when every difference is
    zero or there are fewer than two pairs) and the rank-biserial effect size.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    result = {"n": int(d.size), "mean_difference": float(d.mean()) if d.size else math.nan,
              "p_value": math.nan, "rank_biserial": math.nan}
    nonzero = d[d != 0]
    if nonzero.size == 0:
        if d.size:
            result["rank_biserial"] = 0.0
        return result
    ranks = stats.rankdata(np.abs(nonzero))
    plus, minus = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    result["rank_biserial"] = float((plus - minus) / (plus + minus))
    if d.size >= 2:
        result["p_value"] = float(stats.wilcoxon(x[keep], y[keep]).pvalue)
    return result
