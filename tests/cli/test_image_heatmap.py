"""Heatmap colours, scaling, overlays, grids and PNG files of ``lrpx.image``."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from lrpx import image


def _pixels(path) -> torch.Tensor:
    with Image.open(path) as img:
        raw = bytearray(img.convert("RGB").tobytes())
        return torch.frombuffer(raw, dtype=torch.uint8).double().view(img.height, img.width, 3)


def test_zero_is_white_positive_red_negative_blue():
    rgb = image.colorize(torch.tensor([[[0.0, 1.0, -1.0, 0.5, -0.5]]]))[0, :, 0].T  # (5 values, 3 channels)
    torch.testing.assert_close(rgb[0], torch.ones(3))
    for positive, negative in [(rgb[1], rgb[2]), (rgb[3], rgb[4])]:
        assert positive[0] > positive[1] and positive[0] > positive[2], "positive must be red"
        assert negative[2] > negative[0] and negative[2] > negative[1], "negative must be blue"
    torch.testing.assert_close(rgb[1], torch.tensor([0.7, 0.0, 0.0]))


def test_colour_map_is_symmetric_under_red_blue_swap():
    v = torch.linspace(0, 1, 101).view(1, 1, -1)
    positive, negative = image.colorize(v), image.colorize(-v)
    torch.testing.assert_close(negative, positive.flip(1))  # channels (r, g, b) -> (b, g, r)


def test_colour_saturates_monotonically_with_magnitude():
    rgb = image.colorize(torch.linspace(0, 1, 50).view(1, 1, -1))[0, :, 0]
    green, blue = rgb[1], rgb[2]
    assert (green.diff() <= 1e-7).all() and (blue.diff() <= 1e-7).all()
    assert green[0] == 1 and green[-1] == 0


def test_channels_are_summed_before_colouring():
    relevance = torch.zeros(1, 3, 2, 2)
    relevance[0, :, 0, 0] = torch.tensor([2.0, -1.0, 1.0])  # sum +2
    relevance[0, :, 1, 1] = torch.tensor([-1.0, -0.5, -0.5])  # sum -2
    relevance[0, :, 0, 1] = torch.tensor([1.0, -1.0, 0.0])  # sum 0
    heat = image.heatmap(relevance)[0]
    torch.testing.assert_close(heat[:, 0, 0], torch.tensor([0.7, 0.0, 0.0]))
    torch.testing.assert_close(heat[:, 1, 1], torch.tensor([0.0, 0.0, 0.7]))
    torch.testing.assert_close(heat[:, 0, 1], torch.ones(3))


def test_scaling_is_per_sample_and_keeps_zero():
    base = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(0))
    values = image.scale_relevance(torch.cat([base, 1000 * base]))
    torch.testing.assert_close(values[0], values[1])
    assert values.abs().max() == 1
    assert (values[0] == 0).eq(base[0] == 0).all()


def test_all_zero_relevance_is_white_not_nan():
    heat = image.heatmap(torch.zeros(2, 3, 4, 4))
    assert torch.isfinite(heat).all()
    torch.testing.assert_close(heat, torch.ones_like(heat))


def test_percentile_clipping_lifts_the_rest():
    relevance = torch.full((1, 10, 10), 1.0)
    relevance[0, 0, 0] = 1000.0  # one hot pixel
    assert image.scale_relevance(relevance)[0, 5, 5] == pytest.approx(0.001)
    assert image.scale_relevance(relevance, percentile=98)[0, 5, 5] == pytest.approx(1.0)


def test_gamma_below_one_strengthens_weak_relevance():
    relevance = torch.tensor([[[0.25, -0.25, 1.0]]])
    torch.testing.assert_close(image.scale_relevance(relevance, gamma=0.5)[0, 0], torch.tensor([0.5, -0.5, 1.0]))


@pytest.mark.parametrize("kwargs", [{"percentile": 0}, {"percentile": 101}, {"gamma": 0}])
def test_bad_scaling_arguments(kwargs):
    with pytest.raises(ValueError):
        image.scale_relevance(torch.ones(1, 2, 2), **kwargs)


def test_overlay_is_grey_where_relevance_is_zero_and_red_where_positive():
    images = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    relevance = torch.zeros(1, 1, 4, 4)
    relevance[0, 0, 0, 0] = 1.0
    out = image.overlay(images, relevance, alpha=1.0)
    grey = images.mean(1)
    torch.testing.assert_close(out[0, :, 3, 3], grey[0, 3, 3].expand(3))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.7, 0.0, 0.0]))


def test_mask_outline_paints_only_the_border():
    images = torch.zeros(1, 3, 7, 7)
    masks = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    masks[0, 0, 1:6, 1:6] = True
    out = image.mask_outline(images, masks)
    painted = (out != 0).any(1)[0]
    expected = masks[0, 0].clone()
    expected[2:5, 2:5] = False  # interior stays
    assert painted.eq(expected).all()


def test_png_round_trip_keeps_size_and_colours(tmp_path):
    heat = image.heatmap(torch.tensor([[[1.0, -1.0], [0.0, 0.5]]]))[0]
    path = image.save_png(heat, tmp_path / "h.png", scale=3)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (6, 6) and img.mode == "RGB"
    pixels = _pixels(path)
    assert pixels[0, 0].tolist() == [178.0, 0.0, 0.0]  # 0.7 * 255 rounded
    assert pixels[0, 5].tolist() == [0.0, 0.0, 178.0]
    assert pixels[5, 0].tolist() == [255.0, 255.0, 255.0]


def test_to_pil_rejects_bad_shapes():
    with pytest.raises(ValueError, match="image must be"):
        image.to_pil(torch.zeros(2, 4, 4))


def test_grid_has_the_size_of_its_tiles(tmp_path):
    tiles = [[torch.zeros(3, 8, 10), torch.ones(3, 8, 10)]] * 3
    grid = image.image_grid(tiles, scale=2, pad=4)
    assert grid.size == (4 + 2 * (20 + 4), 4 + 3 * (16 + 4))
    titled = image.image_grid(tiles, column_titles=["a", "b"], row_titles=["x", "y", "z"], scale=2, pad=4)
    assert titled.height == 20 + 4 + 3 * (16 + 4) and titled.width > grid.width


def test_charts_draw_something(tmp_path):
    chart = image.line_chart({"a": ([0, 0.5, 1], [3, 1, 0]), "b": ([0, 1], [0, 2])}, title="t")
    bars = image.bar_chart([1, 3, 5], title="b")
    for picture in (chart, bars):
        path = image.save_png(picture, tmp_path / "c.png")
        pixels = _pixels(path)
        assert pixels.shape == (420, 640, 3)
        coloured = (pixels.amax(2) - pixels.amin(2)) > 100  # lines and bars are saturated colours
        assert coloured.sum() > 100
