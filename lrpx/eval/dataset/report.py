"""The report of a data-set evaluation, rebuilt from whatever result parts exist:
``summary.json`` and ``summary.md`` (per method and metric the mean with a 95% bootstrap
confidence interval, and a paired comparison of every two methods), ``curves.png`` (mean
curves with confidence bands), ``bars.png`` (a bar per method and metric) and
``failures.csv``."""
from __future__ import annotations

import json
import math
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from .metrics import BETTER
from .stats import bootstrap_ci, paired_comparison
from .store import read_results, write_failures

__all__ = ["write_report", "summarize"]


def summarize(table) -> dict:
    """Statistics of the rows of ``table`` (a ``pyarrow.Table`` of result rows)."""
    rows = table.drop_columns(["curve"]).to_pylist()
    groups: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        groups[(r["metric"], r["fill"], r["order"], r["layer"])][r["method"]][r["index"]] = r["value"]
    scores, comparisons = [], []
    for (metric, fill, order, layer), by_method in sorted(groups.items()):
        key = {"metric": metric, "fill": fill, "order": order, "layer": layer,
               "better": BETTER.get((metric, order), "")}
        for method, values in sorted(by_method.items()):
            mean, low, high = bootstrap_ci(list(values.values()))
            scores.append({**key, "method": method, "n": len(values), "mean": mean, "ci_low": low, "ci_high": high})
        for a, b in combinations(sorted(by_method), 2):
            common = sorted(set(by_method[a]) & set(by_method[b]))
            test = paired_comparison([by_method[a][i] for i in common], [by_method[b][i] for i in common])
            comparisons.append({**key, "method_a": a, "method_b": b, **test})
    images = len({r["index"] for r in rows})
    return {"images": images, "rows": len(rows), "scores": scores, "comparisons": comparisons}


def write_report(out: str | Path) -> dict:
    """Write ``summary.json``, ``summary.md``, ``failures.csv`` and the figures into ``out``
    from its result parts; returns the summary."""
    out = Path(out)
    table, failures = read_results(out)
    summary = summarize(table)
    summary["failures"] = len(failures)
    manifest = out / "run.json"
    summary["run"] = json.loads(manifest.read_text())["settings"] if manifest.exists() else {}
    write_failures(out / "failures.csv", failures)
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=2))
    (out / "summary.md").write_text(markdown(summary))
    _figures(table, out)
    _bars(summary, out)
    return summary


def _finite(value):
    """NaN and inf as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _where(row: dict) -> str:
    parts = [row["metric"]] + [f"{k} {row[k]}" for k in ("order", "fill", "layer") if row[k]]
    return ", ".join(parts)


def markdown(summary: dict) -> str:
    """The summary as Markdown: a table of scores and one of paired comparisons."""
    from ...report import markdown_table

    lines = ["# lrpx data-set evaluation", "",
             f"{summary['images']} images evaluated, {summary.get('failures', 0)} could not be read. Mean over the "
             "images with its 95% bootstrap confidence interval; 'better' says which direction is better.", ""]
    score_rows = [[_where(s), s["better"], s["method"], s["n"], _interval(s)] for s in summary["scores"]]
    lines += markdown_table(["metric", "better", "method", "images", "mean [95% CI]"], score_rows)
    if summary["comparisons"]:
        lines += ["Paired comparisons on the images both methods scored: mean of A - B, two-sided Wilcoxon "
                  "signed-rank p-value, and the matched-pairs rank-biserial correlation r (1: A higher on every "
                  "image, -1: B higher on every image).", ""]
        rows = [[_where(c), c["method_a"], c["method_b"], c["n"], _number(c["mean_difference"]),
                 _number(c["p_value"], "{:.2g}"), _number(c["rank_biserial"], "{:+.2f}")] for c in summary["comparisons"]]
        lines += markdown_table(["metric", "A", "B", "images", "mean A - B", "p", "r"], rows)
    return "\n".join(lines)


def _interval(s: dict) -> str:
    if s["mean"] is None or not math.isfinite(s["mean"]):
        return "-"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _number(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None or not math.isfinite(value) else fmt.format(value)


def _figures(table, out: Path) -> None:
    """Mean curves with 95% bands (normal approximation) and bars with bootstrap intervals."""
    if table.num_rows == 0:
        return
    curves: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in table.filter(table.column("curve").is_valid()).to_pylist():
        curves[_where(r)][r["method"]].append(r["curve"])
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return _figures_pillow(curves, out)
    panels = list(curves.items())
    if panels:
        columns = min(3, len(panels))
        rows = -(-len(panels) // columns)
        fig = Figure(figsize=(5.2 * columns, 3.8 * rows), layout="constrained")
        for ax, (title, by_method) in zip(fig.subplots(rows, columns, squeeze=False).ravel(), panels):
            for method, values in sorted(by_method.items()):
                mean, band = _band(values)
                steps = np.linspace(0, 1, len(mean))
                ax.plot(steps, mean, label=method)
                ax.fill_between(steps, mean - band, mean + band, alpha=0.2)
            ax.set_title(title, fontsize="medium")
            ax.set_xlabel("share of regions")
            ax.legend(fontsize="small")
        fig.savefig(out / "curves.png", dpi=72)


def _bars(summary: dict, out: Path) -> None:
    """One panel per metric: a bar per method with its bootstrap interval (matplotlib only)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    panels: dict[str, list[dict]] = defaultdict(list)
    for s in summary["scores"]:
        if s["mean"] is not None and math.isfinite(s["mean"]):
            panels[_where(s) + (f" ({s['better']} is better)" if s["better"] else "")].append(s)
    if not panels:
        return
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(5.2 * columns, 3.4 * rows), layout="constrained")
    for ax, (title, scores) in zip(fig.subplots(rows, columns, squeeze=False).ravel(), panels.items()):
        means = [s["mean"] for s in scores]
        errors = [[s["mean"] - s["ci_low"] for s in scores], [s["ci_high"] - s["mean"] for s in scores]]
        ax.bar(range(len(scores)), means, yerr=errors, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(scores)), [s["method"] for s in scores], rotation=20, fontsize="small")
        ax.set_title(title, fontsize="medium")
    fig.savefig(out / "bars.png", dpi=72)


def _band(values: list) -> tuple[np.ndarray, np.ndarray]:
    length = min(len(v) for v in values)
    data = np.array([v[:length] for v in values], dtype=np.float64)
    sem = data.std(0, ddof=1) / math.sqrt(len(data)) if len(data) > 1 else np.zeros(length)
    return data.mean(0), 1.96 * sem


def _figures_pillow(curves, out: Path) -> None:
    from ... import image

    if not curves:
        return
    title, by_method = next(iter(curves.items()))
    series = {}
    for method, values in sorted(by_method.items()):
        mean, _ = _band(values)
        series[method] = (np.linspace(0, 1, len(mean)).tolist(), mean.tolist())
    image.save_png(image.line_chart(series, title=title, xlabel="share of regions", ylabel="score"),
                   out / "curves.png")
