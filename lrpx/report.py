"""Reports of evaluations: Markdown tables, and figures of curves and schedules (matplotlib
when it is installed, plain Pillow charts otherwise)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import image
from .eval.result import FlippingResult
from .eval.scores import mean_std

__all__ = ["markdown_table", "pm", "save_curves", "save_schedule"]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """The lines of a Markdown table with aligned columns (and a blank line after it)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return [fmt.format(*header), rule, *(fmt.format(*map(str, row)) for row in rows), ""]


def pm(stat: dict[str, float]) -> str:
    """``mean ± std`` of a ``{"mean": ..., "std": ...}`` summary, three decimals."""
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def save_curves(panels: dict[str, dict[str, tuple[FlippingResult, str]]], path: Path, *, columns: int = 1,
                ylabel: str = "target logit") -> Path:
    """Save mean perturbation curves, one panel per ``{title: {label: (result, order)}}`` entry.

    The legend gives each curve's AUC (mean ± std over the samples). Uses matplotlib
    (:mod:`lrpx.plot`) when it is installed, else plain Pillow charts.
    """
    try:
        import matplotlib  # noqa: F401  (the optional "plot" extra)
    except ImportError:
        return _save_curves_pillow(panels, path, columns, ylabel)
    from matplotlib.figure import Figure

    from .plot import plot_curves

    rows = -(-len(panels) // columns)
    fig = Figure(figsize=(6.4 * columns, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, curves) in zip(axes, panels.items()):
        for label, (result, order) in curves.items():
            plot_curves({label: result}, orders=(order,), band=False, ax=ax)
        ax.legend(fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.set_ylabel(ylabel)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.savefig(path, dpi=72)
    return Path(path)


def _save_curves_pillow(panels, path: Path, columns: int, ylabel: str) -> Path:
    from PIL import Image

    charts = []
    for title, curves in panels.items():
        series = {}
        for label, (result, order) in curves.items():
            auc, _ = mean_std(result.auc(order))
            series[f"{label} {order}: AUC {auc:.2f}".strip()] = (result.fractions.tolist(),
                                                                  result.curve(order).mean(0).tolist())
        charts.append(image.line_chart(series, title=title, xlabel="share of regions removed", ylabel=ylabel))
    width, height = charts[0].size
    rows = -(-len(charts) // columns)
    sheet = Image.new("RGB", (width * columns, height * rows), "white")
    for k, chart in enumerate(charts):
        sheet.paste(chart, ((k % columns) * width, (k // columns) * height))
    return image.save_png(sheet, path)


def save_schedule(result: FlippingResult, path: Path) -> Path:
    """Save the bar chart of regions removed per step (matplotlib if installed, else Pillow)."""
    try:
        from .plot import plot_schedule

        plot_schedule(result).savefig(path, dpi=72)
        return Path(path)
    except ImportError:
        title = f"{result.num_regions} regions of {result.patch_size}x{result.patch_size}"
        chart = image.bar_chart(result.removed_per_step.tolist(), title=title, xlabel="step",
                                ylabel="regions removed in the step")
        return image.save_png(chart, path)
