"""lrpx.plot: figures are returned (never shown) and can be saved."""

import matplotlib
import pytest
import torch

from lrpx.eval import perturbed_inputs, pixel_flipping

matplotlib.use("Agg")
plot = pytest.importorskip("lrpx.plot")


@pytest.fixture(scope="module")
def evaluation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 10, 3)).eval()
    x, relevance = torch.rand(4, 3, 12, 10), torch.randn(4, 3, 12, 10)
    options = dict(patch_size=2, schedule="quadratic", fill="inpaint")
    result = pixel_flipping(model, x, relevance, order=("morf", "lrf", "random"), **options)
    return x, relevance, result, options


def test_curves_show_mean_band_and_auc_per_method_and_order(evaluation, tmp_path):
    from matplotlib.figure import Figure

    _, _, result, _ = evaluation
    fig = plot.plot_curves({"lrp": result, "noise": result}, orders=("morf", "lrf"))
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    mean, std = result.auc("morf").mean(), result.auc("morf").std(correction=0)
    assert labels[0] == f"lrp morf: AUC {mean:.3f} ± {std:.3f}" and len(labels) == 4
    line = ax.get_lines()[0]
    torch.testing.assert_close(torch.tensor(line.get_ydata()), result.curve("morf").mean(0))
    assert len(ax.collections) == 4  # one band per curve
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_schedule_bars_are_the_regions_removed_per_step(evaluation, tmp_path):
    _, _, result, _ = evaluation
    fig = plot.plot_schedule(result)
    heights = [patch.get_height() for patch in fig.axes[0].patches]
    assert heights == [1, 3, 5, 7, 9, 5]  # 30 regions: squares 1, 4, 9, 16, 25, then 30
    fig.savefig(tmp_path / "schedule.pdf")
    assert (tmp_path / "schedule.pdf").stat().st_size > 0


def test_perturbation_grid_has_input_heatmap_and_chosen_steps(evaluation, tmp_path):
    x, relevance, result, options = evaluation
    at = [1, 3, 6]
    inputs, masks = perturbed_inputs(x, relevance, at=at, **options)
    fig = plot.plot_perturbations(x, relevance, inputs, masks, samples=(0, 2),
                                  titles=[f"{float(result.fractions[k]):.0%}" for k in at],
                                  to_pixel=lambda t: t * 0.5 + 0.5)
    assert len(fig.axes) == 2 * 5
    assert [ax.get_title() for ax in fig.axes[:5]] == ["input", "relevance", "3%", "30%", "100%"]
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_plotting_uses_no_pyplot_state(evaluation):
    import matplotlib.pyplot as plt

    _, _, result, _ = evaluation
    before = plt.get_fignums()
    plot.plot_curves(result)
    plot.plot_schedule(result)
    assert plt.get_fignums() == before
