"""Regions, orders and schedules against explicit loops and hand-made cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lrpx.eval.order import (
    pixel_mask,
    region_relevance,
    removal_order,
    removal_rank,
    schedule_counts,
)


def regions_by_loops(relevance, p, reduce="sum"):
    """Region relevance with python loops over pixels (border regions smaller)."""
    rel = relevance.double()
    if rel.dim() == 4:
        rel = rel.sum(1)
    batch, height, width = rel.shape
    rows, cols = math.ceil(height / p), math.ceil(width / p)
    out = torch.zeros(batch, rows, cols, dtype=torch.float64)
    for b in range(batch):
        for i in range(rows):
            for j in range(cols):
                block = rel[b, i * p : (i + 1) * p, j * p : (j + 1) * p]
                out[b, i, j] = block.sum() if reduce == "sum" else block.mean()
    return out


@pytest.mark.parametrize("shape", [(2, 3, 7, 10), (1, 1, 8, 8), (2, 5, 9)])
@pytest.mark.parametrize("p", [1, 3, 4])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_region_relevance_matches_loops(shape, p, reduce):
    relevance = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    got = region_relevance(relevance, p, reduce=reduce)
    torch.testing.assert_close(got, regions_by_loops(relevance, p, reduce), rtol=1e-12, atol=1e-12)


def test_border_regions_are_smaller():
    # 5x5 image, patch 2: the region grid is 3x3; the corner region holds one pixel.
    relevance = torch.ones(1, 1, 5, 5)
    sums = region_relevance(relevance, 2)
    assert sums[0].tolist() == [[4, 4, 2], [4, 4, 2], [2, 2, 1]]
    assert torch.equal(region_relevance(relevance, 2, reduce="mean"), torch.ones(1, 3, 3).double())


def test_morf_sorts_decreasing_with_raster_ties_and_lrf_is_its_reverse():
    regions = torch.tensor([[[1.0, 3.0, 1.0], [3.0, 2.0, 1.0]]])
    morf = removal_order(regions, "morf")
    assert morf.tolist() == [[1, 3, 4, 0, 2, 5]]  # ties 3,3 and 1,1,1 in raster order
    assert removal_order(regions, "lrf").tolist() == [[5, 2, 0, 4, 3, 1]]


def test_random_order_is_a_seeded_permutation_per_sample():
    regions = torch.zeros(3, 4, 5)
    first = removal_order(regions, "random", generator=torch.Generator().manual_seed(0))
    again = removal_order(regions, "random", generator=torch.Generator().manual_seed(0))
    other = removal_order(regions, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(first.sort(dim=1).values, torch.arange(20).expand(3, 20))
    assert not torch.equal(first[0], first[1])  # one permutation per sample


def test_rank_is_the_inverse_permutation():
    order = torch.tensor([[2, 0, 3, 1]])
    assert removal_rank(order).tolist() == [[1, 3, 0, 2]]


def test_unknown_order_lists_the_valid_ones():
    with pytest.raises(ValueError, match="morf.*lrf.*random"):
        removal_order(torch.zeros(1, 2, 2), "best")


def test_pixel_mask_marks_the_first_regions():
    # 5x7 image, patch 3: grid 2x3; remove the two first regions of the order 5, 0, ...
    order = torch.tensor([[5, 0, 1, 2, 3, 4]])
    rank = removal_rank(order).view(1, 2, 3)
    mask = pixel_mask(rank, torch.tensor([2]), patch_size=3, size=(5, 7))
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[:3, :3] = True  # region 0
    expected[3:, 6:] = True  # region 5: the 2x1 bottom-right corner
    assert mask.shape == (1, 1, 5, 7) and torch.equal(mask[0, 0], expected)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(height=st.integers(1, 12), width=st.integers(1, 12), p=st.integers(1, 5),
       data=st.data())
def test_mask_removes_exactly_the_pixels_of_the_first_regions(height, width, p, data):
    p = min(p, height, width)
    relevance = torch.randn(1, height, width, generator=torch.Generator().manual_seed(height))
    rank = removal_rank(removal_order(region_relevance(relevance, p), "morf"))
    rows, cols = math.ceil(height / p), math.ceil(width / p)
    count = data.draw(st.integers(0, rows * cols))
    mask = pixel_mask(rank.view(1, rows, cols), torch.tensor([count]), patch_size=p,
                      size=(height, width))
    removed = {int(r) for r in torch.nonzero(rank[0] < count).flatten()}
    expected = torch.zeros(height, width, dtype=torch.bool)
    for region in removed:
        i, j = divmod(region, cols)
        expected[i * p : (i + 1) * p, j * p : (j + 1) * p] = True
    assert torch.equal(mask[0, 0], expected)


def test_linear_schedule_has_equal_steps():
    assert schedule_counts("linear", 12, 4) == [0, 3, 6, 9, 12]
    assert schedule_counts("linear", 10, 3) == [0, 3, 6, 10]
    assert schedule_counts("linear", 7) == list(range(8))  # default min(P, 20) steps


def test_quadratic_schedule_is_the_square_numbers():
    # 224 / 8 = 28 regions a side, 784 in all: step k removes 2k - 1 regions.
    counts = schedule_counts("quadratic", 784)
    assert counts == [k * k for k in range(29)]
    assert [b - a for a, b in zip(counts, counts[1:])][:4] == [1, 3, 5, 7]
    assert schedule_counts("quadratic", 35) == [0, 1, 4, 9, 16, 25, 35]  # capped at P
    assert schedule_counts("quadratic", 784, 5) == [0, 1, 4, 9, 16, 25]


def test_log_schedule_is_geometric_and_strictly_increasing():
    assert schedule_counts("log", 10000, 4) == [0, 10, 100, 1000, 10000]
    counts = schedule_counts("log", 50, 20)
    assert counts[-1] == 50 and all(b > a for a, b in zip(counts, counts[1:]))


def test_explicit_schedules():
    assert schedule_counts([2, 5, 9], 10) == [0, 2, 5, 9]
    assert schedule_counts([0, 2, 5], 10) == [0, 2, 5]
    assert schedule_counts([0.25, 0.5, 1.0], 8) == [0, 2, 4, 8]
    assert schedule_counts(torch.tensor([1, 3]), 4) == [0, 1, 3]


@pytest.mark.parametrize(
    "schedule, steps, match",
    [
        ("linear", 11, "steps"),
        ("quadratic", 5, "steps"),
        ("cubic", None, "linear.*quadratic.*log"),
        ([3, 2], None, "strictly increasing"),
        ([1, 11], None, "strictly increasing"),
        ([0.1, 0.12], None, "strictly increasing"),  # both round to 1 of 10
        ([1, 2], 3, "steps"),
    ],
)
def test_bad_schedules(schedule, steps, match):
    with pytest.raises(ValueError, match=match):
        schedule_counts(schedule, 10, steps)
