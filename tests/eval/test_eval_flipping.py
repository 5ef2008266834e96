"""pixel_flipping: closed-form curves, faithfulness ordering, invariance, streaming."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpx.eval import Road, number_of_calls, perturbed_inputs, pixel_flipping


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def linear_model(channels, height, width, classes=4, seed=0):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * height * width,
                                                                    classes))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(model[1].weight.shape, generator=seeded(seed)))
        model[1].bias.copy_(torch.randn(classes, generator=seeded(seed + 1)))
    return model.double().eval()


def small_cnn(classes=5):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(6, classes),
    ).double().eval()


def region_pixels(height, width, p):
    """Explicit python: the pixel list of every region, in raster order."""
    return [[(i, j) for i in range(top, min(top + p, height))
             for j in range(left, min(left + p, width))]
            for top in range(0, height, p) for left in range(0, width, p)]


def regions_in_order(relevance, p, order):
    """Region pixel lists sorted by summed relevance (ties in raster order; LRF reversed)."""
    regions = region_pixels(*relevance.shape[-2:], p)
    value = [sum(float(relevance[:, i, j].sum()) for i, j in pixels) for pixels in regions]
    morf = [regions[n] for n in sorted(range(len(regions)), key=lambda n: (-value[n], n))]
    return morf if order == "morf" else morf[::-1]


def closed_form_curve(weight, bias, x, target, ordered_regions, counts, value):
    """y_k = y_0 - sum over removed pixels and channels of w (x - value)."""
    curve = [float((weight[target] * x).sum() + bias[target])]
    for n in counts[1:]:
        removed = [pixel for region in ordered_regions[:n] for pixel in region]
        drop = sum(float((weight[target][:, i, j] * (x[:, i, j] - value)).sum())
                   for i, j in removed)
        curve.append(curve[0] - drop)
    return torch.tensor(curve, dtype=torch.float64)


@pytest.mark.parametrize("schedule, steps", [("linear", None), ([1, 3, 6, 12], None),
                                             ("quadratic", 3)])
def test_linear_model_curves_match_the_closed_form_for_every_order(schedule, steps):
    # 7 x 10 image, patch 3: a 3 x 4 grid whose last row and column hold smaller regions
    x = torch.rand(3, 2, 7, 10, generator=seeded(1), dtype=torch.float64)
    relevance = torch.randn(3, 2, 7, 10, generator=seeded(2))
    model = linear_model(2, 7, 10)
    weight, bias = model[1].weight.detach().view(4, 2, 7, 10), model[1].bias.detach()
    result = pixel_flipping(model, x, relevance, target=[0, 3, 1], patch_size=3, steps=steps,
                            schedule=schedule, order=("morf", "lrf", "random"), fill=0.7,
                            batch_size=5, generator=seeded())
    counts = result.counts.tolist()
    assert result.num_regions == 12 and counts[0] == 0
    for o, order in enumerate(result.orders):
        for b, target in enumerate([0, 3, 1]):
            if order == "random":  # the drawn permutation, read back from the ranks
                regions = region_pixels(7, 10, 3)
                ordered = [regions[i] for i in torch.argsort(result.ranks[o, b].flatten())]
            else:
                ordered = regions_in_order(relevance[b], 3, order)
            expected = closed_form_curve(weight, bias, x[b], target, ordered, counts, 0.7)
            torch.testing.assert_close(result.curves[o, b], expected, rtol=0, atol=1e-6)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(height=st.integers(2, 9), width=st.integers(2, 9), p=st.integers(1, 4),
       order=st.sampled_from(["morf", "lrf"]), batch_size=st.integers(1, 9))
def test_closed_form_for_any_size(height, width, p, order, batch_size):
    p = min(p, height, width)
    x = torch.rand(2, 1, height, width, generator=seeded(height), dtype=torch.float64)
    relevance = torch.randn(2, height, width, generator=seeded(width))
    model = linear_model(1, height, width, classes=2, seed=p)
    weight, bias = model[1].weight.detach().view(2, 1, height, width), model[1].bias.detach()
    result = pixel_flipping(model, x, relevance, target=1, patch_size=p, order=order,
                            fill=-1.0, batch_size=batch_size)
    for b in range(2):
        ordered = regions_in_order(relevance[b][None], p, order)
        expected = closed_form_curve(weight, bias, x[b], 1, ordered, result.counts.tolist(), -1.0)
        torch.testing.assert_close(result.curves[0, b], expected, rtol=0, atol=1e-6)


def contribution_setup():
    x = torch.rand(6, 3, 8, 8, generator=seeded(3), dtype=torch.float64)
    model = linear_model(3, 8, 8, classes=2, seed=4)
    relevance = model[1].weight.detach()[1].view(3, 8, 8) * x  # exact contribution w * x
    return model, x, relevance


def test_exact_contributions_order_morf_below_random_below_lrf():
    model, x, relevance = contribution_setup()
    options = dict(target=1, steps=16, order=("morf", "lrf", "random"), fill=0.0,
                   generator=seeded())
    result = pixel_flipping(model, x, relevance, **options)
    assert bool((result.auc("morf") < result.auc("random")).all())
    assert bool((result.auc("random") < result.auc("lrf")).all())
    assert bool((result.srg() > 0).all()) and bool((result.mrg() > 0).all())
    assert bool((result.lrg() > 0).all())
    flipped = pixel_flipping(model, x, -relevance, **options)
    torch.testing.assert_close(flipped.srg(), -result.srg(), rtol=0, atol=1e-12)


def test_results_do_not_depend_on_batch_size():
    model, x = small_cnn(), torch.rand(5, 3, 9, 8, generator=seeded(5), dtype=torch.float64)
    relevance = torch.randn(5, 3, 9, 8, generator=seeded(6))
    options = dict(patch_size=2, steps=6, order=("morf", "lrf", "random"))
    for fill in ["random", "inpaint", "road"]:
        curves = [pixel_flipping(model, x, relevance, fill=fill, batch_size=size,
                                 generator=seeded(), **options).curves
                  for size in (1, 7, 5 * (1 + 3 * 6))]  # the last: all items at once
        for other in curves[1:]:
            torch.testing.assert_close(other, curves[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fill", ["inpaint", Road(sigma=0.0), "blur", "mean", "constant"],
                         ids=str)
def test_a_sample_alone_in_a_batch_or_permuted_gives_the_same_curves(fill):
    model, x = small_cnn(), torch.rand(5, 3, 9, 8, generator=seeded(7), dtype=torch.float64)
    relevance = torch.randn(5, 3, 9, 8, generator=seeded(8))
    options = dict(patch_size=2, steps=8, order=("morf", "lrf"), fill=fill, batch_size=6)
    batch = pixel_flipping(model, x, relevance, **options)
    alone = pixel_flipping(model, x[2:3], relevance[2:3], **options)
    torch.testing.assert_close(alone.curves[:, 0], batch.curves[:, 2], rtol=0, atol=1e-12)
    permutation = torch.tensor([3, 0, 4, 2, 1])
    permuted = pixel_flipping(model, x[permutation], relevance[permutation], **options)
    torch.testing.assert_close(permuted.curves, batch.curves[:, permutation], rtol=0, atol=1e-12)


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.sizes, self.inference = model, [], []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        self.inference.append(torch.is_inference_mode_enabled())
        return self.model(x)


@pytest.mark.parametrize("batch_size", [1, 4, 13, 1000])
def test_items_stream_in_ceil_items_over_batch_size_calls(batch_size):
    model = CountingModel(small_cnn()).eval()
    x, relevance = torch.rand(3, 3, 8, 8, dtype=torch.float64), torch.randn(3, 8, 8)
    pixel_flipping(model, x, relevance, patch_size=2, steps=5, order=("morf", "random"),
                   batch_size=batch_size)
    items = 3 * (1 + 2 * 5)  # step 0 once per sample, shared by the orders
    assert len(model.sizes) == math.ceil(items / batch_size) == number_of_calls(3, 2, 5, batch_size)
    assert sum(model.sizes) == items and max(model.sizes) <= batch_size
    assert all(model.inference)


def test_curves_are_the_scores_of_the_perturbed_inputs():
    model, x = small_cnn(), torch.rand(4, 3, 9, 8, generator=seeded(9), dtype=torch.float64)
    relevance = torch.randn(4, 3, 9, 8, generator=seeded(10))
    options = dict(patch_size=2, steps=6, schedule="log", fill="random")
    result = pixel_flipping(model, x, relevance, order="random", batch_size=5, generator=seeded(),
                            **options)
    inputs, _ = perturbed_inputs(x, relevance, at=range(7), order="random", generator=seeded(),
                                 **options)
    with torch.no_grad():
        logits = model(inputs.flatten(0, 1)).view(7, 4, -1)
    expected = logits.gather(2, result.target.view(1, 4, 1).expand(7, 4, 1))[..., 0].T
    torch.testing.assert_close(result.curves[0], expected, rtol=0, atol=1e-12)


def test_default_target_is_the_clean_argmax_and_step_zero_is_shared():
    model, x = small_cnn(), torch.rand(5, 3, 8, 8, generator=seeded(11), dtype=torch.float64)
    result = pixel_flipping(model, x, torch.randn(5, 3, 8, 8), order=("lrf", "morf"),
                            batch_size=2)
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(result.target, logits.argmax(1))
    clean = logits.max(1).values
    assert torch.equal(result.curves[0, :, 0], clean) and torch.equal(result.curves[1, :, 0], clean)


def test_softmax_and_callable_scores():
    model, x = small_cnn(), torch.rand(2, 3, 8, 8, generator=seeded(12), dtype=torch.float64)
    relevance = torch.randn(2, 3, 8, 8)
    logits = pixel_flipping(model, x, relevance, target=[1, 2], steps=4, fill=0.0)
    probabilities = pixel_flipping(model, x, relevance, target=[1, 2], steps=4, fill=0.0,
                                   score="softmax")
    assert probabilities.score == "softmax"
    with torch.no_grad():
        expected = model(x).softmax(1)[[0, 1], [1, 2]]
    torch.testing.assert_close(probabilities.curves[0, :, 0], expected, rtol=0, atol=1e-12)

    def margin(output, target):
        return output.gather(1, target[:, None])[:, 0] - output.mean(1)

    custom = pixel_flipping(model, x, relevance, target=[1, 2], steps=4, fill=0.0, score=margin)
    assert custom.score == "margin"
    assert bool((custom.curves != logits.curves).all())


def test_inputs_are_not_modified_and_may_require_grad():
    model, x = small_cnn(), torch.rand(2, 3, 8, 8, dtype=torch.float64).requires_grad_()
    relevance = torch.randn(2, 3, 8, 8).requires_grad_()
    x_copy, relevance_copy = x.detach().clone(), relevance.detach().clone()
    for fill in ["inpaint", "road", "random", "blur"]:
        result = pixel_flipping(model, x, relevance, patch_size=2, steps=4, fill=fill,
                                order=("morf", "lrf"), normalizer=([0.5], [0.25]))
        assert not result.curves.requires_grad and not result.curves.is_inference()
    assert torch.equal(x.detach(), x_copy) and torch.equal(relevance.detach(), relevance_copy)


def test_progress_bar(capsys):
    model, x = small_cnn(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    pixel_flipping(model, x, torch.randn(2, 8, 8), steps=4, progress=True, batch_size=3)
    assert "pixel flipping" in capsys.readouterr().err
    pixel_flipping(model, x, torch.randn(2, 8, 8), steps=4, batch_size=3)
    assert "pixel flipping" not in capsys.readouterr().err


def test_result_masks_reproduce_the_removed_regions():
    model, x = small_cnn(), torch.rand(2, 3, 9, 8, dtype=torch.float64)
    relevance = torch.randn(2, 3, 9, 8)
    result = pixel_flipping(model, x, relevance, patch_size=3, steps=3, fill="mean")
    _, masks = perturbed_inputs(x, relevance, at=[2], patch_size=3, steps=3, fill="mean")
    assert torch.equal(result.masks(2), masks[0])
    assert result.fractions.tolist() == [0, 3 / 9, 6 / 9, 1]  # 3 x 3 regions, 3 per step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = small_cnn()
    x = torch.rand(3, 3, 16, 16, generator=seeded(13), dtype=torch.float64)
    relevance = torch.randn(3, 3, 16, 16)
    options = dict(patch_size=2, steps=8, target=0, order=("morf", "lrf"))
    for fill in ["inpaint", Road(sigma=0.0), "blur", "mean", 0.0]:
        cpu = pixel_flipping(model, x, relevance, fill=fill, **options)
        gpu = pixel_flipping(model.cuda(), x.cuda(), relevance.cuda(), fill=fill, **options)
        model.cpu()
        assert gpu.curves.device.type == "cuda"
        torch.testing.assert_close(gpu.curves.cpu(), cpu.curves, rtol=0, atol=1e-9)
    generator = torch.Generator("cuda").manual_seed(0)
    runs = [pixel_flipping(model.cuda(), x.cuda(), relevance.cuda(), fill=fill, order="random",
                           patch_size=2, steps=8, generator=generator.manual_seed(0))
            for fill in ("random", "road")]
    assert all(run.curves.device.type == "cuda" and run.curves.isfinite().all() for run in runs)
