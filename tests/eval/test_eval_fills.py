"""Fills: untouched pixels, replaced pixels, inpainting, ROAD against scipy, seeds."""

import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.sparse
import scipy.sparse.linalg
import torch

from lrpx.eval import perturbed_inputs
from lrpx.eval.fills import (
    GaussianBlur,
    Inpaint,
    Road,
    as_fill,
    solve_imputation,
)

FILLS = ["random", "inpaint", "road", "constant", "mean", "blur", 0.25,
         torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1), lambda x, mask: x + 1]


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def images(batch=3, channels=3, height=9, width=11, seed=0, dtype=torch.float32):
    x = torch.rand(batch, channels, height, width, generator=seeded(seed), dtype=dtype)
    relevance = torch.randn(batch, channels, height, width, generator=seeded(seed + 100))
    return x, relevance


def all_steps(x, relevance, fill, **kwargs):
    kwargs.setdefault("patch_size", 2)
    rows, cols = (math.ceil(size / kwargs["patch_size"]) for size in x.shape[2:])
    kwargs.setdefault("steps", rows * cols)
    at = range(kwargs["steps"] + 1)
    return perturbed_inputs(x, relevance, at=at, fill=fill, generator=seeded(), **kwargs)


@pytest.mark.parametrize("fill", FILLS, ids=lambda f: f if isinstance(f, str) else type(f).__name__)
def test_untouched_pixels_identical_and_removed_pixels_replaced_at_every_step(fill):
    x, relevance = images()
    inputs, masks = all_steps(x, relevance, fill)  # steps 0..30, the last removes everything
    masks = masks.expand_as(inputs)
    original = x.expand_as(inputs)
    assert torch.equal(inputs[~masks], original[~masks])  # bit-identical
    assert bool((inputs[masks] != original[masks]).all())  # every removed pixel replaced
    assert bool(masks[-1].all()) and not bool(masks[0].any())
    assert bool((masks[1:].sum((1, 2, 3, 4)) > masks[:-1].sum((1, 2, 3, 4))).all())


def test_caller_tensors_are_not_modified():
    x, relevance = images()
    x_copy, relevance_copy = x.clone(), relevance.clone()
    for fill in ["random", "inpaint", "road"]:
        all_steps(x, relevance, fill)
    assert torch.equal(x, x_copy) and torch.equal(relevance, relevance_copy)


def test_random_fill_is_uniform_in_the_per_sample_range_and_drawn_once():
    x, relevance = images(height=20, width=20)
    x[1] = x[1] * 4 - 1  # sample 1 spans [-1, 3]
    inputs, masks = all_steps(x, relevance, "random")
    for b in range(3):
        low, high = x[b].min(), x[b].max()
        values = inputs[-1, b]  # everything removed
        assert low <= values.min() and values.max() <= high
        assert abs(float(values.mean()) - float(low + high) / 2) < 0.05 * float(high - low)
    # a pixel keeps the value it got when it was first removed
    removed_both = masks[1:].expand_as(inputs[1:]) & masks[:-1].expand_as(inputs[:-1])
    assert torch.equal(inputs[1:][removed_both], inputs[:-1][removed_both])
    assert not torch.equal(inputs[-1, :, 0], inputs[-1, :, 1])  # per channel


def test_random_fill_respects_pixel_range_and_normalizer():
    x, relevance = images()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x_model = (x - m) / s
    inputs, masks = all_steps(x_model, relevance, "random", normalizer=(mean, std),
                              pixel_range=(0.0, 1.0))
    pixels = inputs * s + m
    removed = masks.expand_as(inputs)
    assert float(pixels[removed].min()) >= -1e-6 and float(pixels[removed].max()) <= 1 + 1e-6
    same, _ = all_steps(x_model, relevance, "random", pixel_range=(0.0, 1.0),
                        normalizer=(lambda t: t * s + m, lambda t: (t - m) / s))
    assert torch.equal(same, inputs)


def test_seeded_fills_are_reproducible_and_seeds_differ():
    x, relevance = images()
    for fill in ["random", "road"]:
        run = [perturbed_inputs(x, relevance, at=[5], patch_size=2, steps=10, fill=fill,
                                generator=seeded(seed))[0] for seed in (0, 0, 1)]
        assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])


def test_named_constant_is_the_midpoint_of_the_pixel_range_and_numbers_are_model_space():
    x, relevance = images()
    inputs, masks = all_steps(x, relevance, "constant", normalizer=([0.5], [2.0]),
                              pixel_range=(0.0, 1.0))
    # pixel 0.5 -> model (0.5 - 0.5) / 2 = 0
    assert bool((inputs[masks.expand_as(inputs)] == 0).all())
    inputs, masks = all_steps(x, relevance, -3.5, normalizer=([0.5], [2.0]))
    assert bool((inputs[masks.expand_as(inputs)] == -3.5).all())


def test_mean_fill_is_per_sample_and_channel():
    x, relevance = images()
    inputs, _ = all_steps(x, relevance, "mean")
    torch.testing.assert_close(inputs[-1], x.mean((2, 3), keepdim=True).expand_as(x))
    changed = x.clone()
    changed[1] += 5  # another sample must not matter
    other, _ = all_steps(changed, relevance, "mean")
    assert torch.equal(other[:, 0], inputs[:, 0])


def test_blur_matches_scipy_normalised_gaussian():
    x, relevance = images(height=13, width=17, dtype=torch.float64)
    sigma = 1.5
    blurred = GaussianBlur(sigma).prepare(x, low=None, high=None, generator=None)
    radius = math.ceil(3 * sigma)
    options = dict(sigma=(0, 0, sigma, sigma), mode="constant", truncate=radius / sigma)
    expected = scipy.ndimage.gaussian_filter(x.numpy(), **options)
    expected /= scipy.ndimage.gaussian_filter(np.ones_like(x.numpy()), **options)
    np.testing.assert_allclose(blurred.numpy(), expected, rtol=1e-10, atol=1e-12)


def ramp(batch, height, width):
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = 0.02 * cols + 0.01 * rows - 0.3
    return image.double().expand(batch, 3, height, width) * torch.tensor([1.0, -2.0, 0.5]).view(
        1, 3, 1, 1)


def patch_mask(batch, height, width, patch, share, seed=0):
    grid = torch.rand(batch, 1, height // patch, width // patch, generator=seeded(seed)) < share
    return grid.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


def bounds(batch):
    return {"low": torch.zeros(batch, 1, 1, 1), "high": torch.ones(batch, 1, 1, 1)}


def test_inpaint_reconstructs_a_linear_ramp():
    x = ramp(4, 32, 32)
    mask = patch_mask(4, 32, 32, 4, 0.6)
    interior = mask.clone()
    interior[..., :4, :] = interior[..., -4:, :] = False
    interior[..., :4] = interior[..., -4:] = False
    filled = Inpaint()(x, interior, None, **bounds(x.shape[0]))
    torch.testing.assert_close(filled, x, rtol=0, atol=1e-6)  # harmonic: exact inside
    filled = Inpaint()(x, mask, None, **bounds(x.shape[0]))  # holes on the border too
    error = (filled - x).abs()[mask.expand_as(x)]
    value_range = float(x.amax() - x.amin())
    assert float(error.mean()) < 0.02 * value_range


def test_inpaint_stays_in_the_range_of_the_known_pixels_and_ignores_removed_values():
    x, _ = images(batch=4, height=24, width=20, seed=3)
    mask = patch_mask(4, 24, 20, 4, 0.7)
    filled = Inpaint()(x, mask, None, **bounds(x.shape[0]))
    for b in range(4):
        for c in range(3):
            known = x[b, c][~mask[b, 0]]
            values = filled[b, c][mask[b, 0]]
            assert known.min() <= values.min() and values.max() <= known.max()
    scrambled = torch.where(mask, torch.full_like(x, 99.0), x)
    assert torch.equal(Inpaint()(scrambled, mask, None, **bounds(x.shape[0])), filled)


def test_inpaint_and_road_fall_back_to_the_range_midpoint_when_all_is_removed():
    x, _ = images(batch=2)
    mask = torch.ones(2, 1, 9, 11, dtype=torch.bool)
    low, high = torch.tensor([0.0, -2.0]).view(2, 1, 1, 1), torch.tensor([1.0, 4.0]).view(2, 1,
                                                                                          1, 1)
    for fill in [Inpaint(), Road(sigma=0.0)]:
        out = fill(x, mask, torch.zeros_like(x), low=low, high=high)
        assert bool((out[0] == 0.5).all()) and bool((out[1] == 1.0).all())


# Rong et al. 2022: 1/6 for the 4 edge neighbours, 1/12 for the 4 diagonal ones
WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def imputation_residual(image, mask):
    """Explicit loops: d_i u_i - sum_j w_ij u_j over in-image neighbours, on removed pixels."""
    channels, height, width = image.shape
    worst = 0.0
    for i, j in zip(*np.nonzero(mask)):
        for c in range(channels):
            total = 0.0
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    w = WEIGHTS[di + 1][dj + 1]
                    if w and 0 <= i + di < height and 0 <= j + dj < width:
                        total += w * (image[c, i, j] - image[c, i + di, j + dj])
            worst = max(worst, abs(total))
    return worst


def scipy_imputation(image, mask):
    """The same system assembled as a sparse matrix and solved directly."""
    height, width = mask.shape
    unknown = list(zip(*np.nonzero(mask)))
    index = {pixel: n for n, pixel in enumerate(unknown)}
    rows, cols, vals = [], [], []
    rhs = np.zeros((len(unknown), image.shape[0]))
    for n, (i, j) in enumerate(unknown):
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                w = WEIGHTS[di + 1][dj + 1]
                if not w or not (0 <= i + di < height and 0 <= j + dj < width):
                    continue
                rows.append(n), cols.append(n), vals.append(w)
                if (i + di, j + dj) in index:
                    rows.append(n), cols.append(index[i + di, j + dj]), vals.append(-w)
                else:
                    rhs[n] += w * image[:, i + di, j + dj]
    matrix = scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(len(unknown),) * 2)
    solution = image.copy()
    values = scipy.sparse.linalg.spsolve(matrix, rhs)
    for n, (i, j) in enumerate(unknown):
        solution[:, i, j] = values[n]
    return solution


def test_road_solves_its_linear_system_and_matches_scipy():
    x, _ = images(batch=2, height=12, width=13, seed=5, dtype=torch.float64)
    mask = torch.rand(2, 1, 12, 13, generator=seeded(7)) < 0.45
    mask[1, 0, :6] = True  # a large hole touching the border
    out = Road(sigma=0.0, tol=1e-10)(x, mask, torch.zeros_like(x), **bounds(2))
    for b in range(2):
        filled = torch.where(mask[b], out[b], x[b]).numpy()
        assert imputation_residual(filled, mask[b, 0].numpy()) <= 1e-5
        expected = scipy_imputation(x[b].numpy(), mask[b, 0].numpy())
        np.testing.assert_allclose(filled, expected, rtol=0, atol=1e-8)


def test_road_float32_residual():
    x, _ = images(batch=1, height=16, width=16, seed=2)
    mask = patch_mask(1, 16, 16, 2, 0.5)
    out = Road(sigma=0.0)(x, mask, torch.zeros_like(x), **bounds(x.shape[0]))
    filled = torch.where(mask[0], out[0], x[0]).double().numpy()
    assert imputation_residual(filled, mask[0, 0].numpy()) <= 1e-5


def test_road_noise_is_the_seeded_draw_scaled_by_the_pixel_range():
    x, _ = images(batch=2, height=40, width=40, dtype=torch.float64)
    mask = patch_mask(2, 40, 40, 4, 0.5)
    low, high = torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 10.0]).view(2, 1, 1, 1)
    road = Road(sigma=0.05, tol=1e-12)
    noise = road.prepare(x, low=low, high=high, generator=seeded())
    noisy = road(x, mask, noise, low=low, high=high)
    clean = Road(sigma=0.0, tol=1e-12)(x, mask, noise, low=low, high=high)
    for b, scale in enumerate([0.05, 0.5]):
        difference = (noisy[b] - clean[b])[mask[b].expand(3, -1, -1)]
        assert abs(float(difference.std()) / scale - 1) < 0.1
        assert abs(float(difference.mean())) < 0.1 * scale


def test_road_ignores_the_values_of_removed_pixels():
    x, _ = images(batch=2, dtype=torch.float64)
    mask = patch_mask(2, 8, 10, 2, 0.5)
    x = x[..., :8, :10]
    road = Road(sigma=0.0, tol=1e-12)
    out = road(x, mask, torch.zeros_like(x), **bounds(x.shape[0]))
    scrambled = torch.where(mask, torch.full_like(x, -7.0), x)
    again = road(scrambled, mask, torch.zeros_like(x), **bounds(x.shape[0]))
    torch.testing.assert_close(again[mask.expand_as(x)], out[mask.expand_as(x)], rtol=0,
                               atol=1e-9)


def test_solve_imputation_handles_items_independently():
    x, _ = images(batch=3, height=10, width=10, dtype=torch.float64)
    unknown = patch_mask(3, 10, 10, 2, 0.5).double()
    together = solve_imputation(x, unknown, torch.zeros_like(x), tol=1e-6)
    for b in range(3):
        alone = solve_imputation(x[b:b + 1], unknown[b:b + 1], torch.zeros_like(x[:1]), tol=1e-6)
        torch.testing.assert_close(alone[0], together[b], rtol=0, atol=1e-12)


def test_unknown_fill_lists_the_valid_names():
    with pytest.raises(ValueError, match="blur.*constant.*inpaint.*mean.*random.*road"):
        as_fill("telea")
    with pytest.raises(TypeError, match="fill"):
        as_fill(object())
