"""Relevance heatmaps as RGB images, overlays, grids and simple charts, saved with Pillow alone.

The colour map is diverging and centred on zero: white at 0, red for positive, blue for
negative relevance, and symmetric (the colour of ``-v`` is that of ``v`` with red and blue
swapped), so equal magnitudes look equally strong whatever their sign.

>>> heat = heatmap(relevance)                       # (B, 3, H, W) in [0, 1]
>>> save_png(heat[0], "heatmap.png")
>>> save_png(overlay(images, relevance)[0], "overlay.png")
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["COLOURS", "relevance_map", "scale_relevance", "colorize", "heatmap", "overlay", "mask_outline",
           "to_pil", "save_png", "image_grid", "line_chart", "bar_chart"]

#: stops of the positive half of the colour map, ``(value, (r, g, b))``; the negative half
#: mirrors them with red and blue swapped
COLOURS: tuple[tuple[float, tuple[float, float, float]], ...] = (
    (0.0, (1.0, 1.0, 1.0)),
    (0.5, (1.0, 0.45, 0.3)),
    (1.0, (0.7, 0.0, 0.0)),
)
#: line colours of the charts
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def relevance_map(relevance: Tensor) -> Tensor:
    """Sum over channels: ``(B, C, H, W)`` to ``(B, H, W)``; ``(B, H, W)`` and ``(H, W)`` pass (as a batch)."""
    if not isinstance(relevance, Tensor) or relevance.dim() not in (2, 3, 4):
        raise ValueError(f"relevance must be a (B, C, H, W), (B, H, W) or (H, W) tensor, got {_describe(relevance)}")
    if relevance.dim() == 4:
        return relevance.sum(1)
    return relevance if relevance.dim() == 3 else relevance.unsqueeze(0)


def scale_relevance(relevance: Tensor, *, percentile: float = 100.0, gamma: float = 1.0) -> Tensor:
    r"""Channel-summed relevance scaled per sample to ``[-1, 1]``, zero kept at zero.

    .. math:: v = \mathrm{sign}(r)\, \min(1, |r| / q)^{\gamma}

    where :math:`q` is the ``percentile`` of :math:`|r|` over the sample's pixels.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, H, W)`` or ``(H, W)``.
    percentile
        Magnitudes above this percentile of ``|r|`` are clipped (100: the maximum, no clipping).
    gamma
        Exponent on the magnitude; below 1 makes weak relevance more visible.

    Returns
    -------
    Tensor
        ``(B, H, W)`` float32 in ``[-1, 1]``.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma}")
    r = relevance_map(relevance).detach().float()
    magnitude = r.abs().flatten(1)
    limit = torch.quantile(magnitude, percentile / 100, dim=1) if percentile < 100 else magnitude.amax(1)
    limit = torch.where(limit > 0, limit, 1.0).view(-1, 1, 1)
    return r.sign() * (r.abs() / limit).clamp(max=1) ** gamma


def colorize(values: Tensor) -> Tensor:
    """Map values in ``[-1, 1]`` of shape ``(B, H, W)`` to RGB ``(B, 3, H, W)`` in ``[0, 1]``."""
    v = values.float().clamp(-1, 1)
    stops = torch.tensor([s for s, _ in COLOURS], device=v.device)
    colours = torch.tensor([c for _, c in COLOURS], device=v.device)
    magnitude = v.abs()
    upper = torch.searchsorted(stops, magnitude.contiguous(), right=False).clamp(1, len(stops) - 1)
    lo, hi = stops[upper - 1], stops[upper]
    weight = ((magnitude - lo) / (hi - lo)).unsqueeze(-1)
    rgb = colours[upper - 1] * (1 - weight) + colours[upper] * weight  # (B, H, W, 3)
    rgb = torch.where((v < 0).unsqueeze(-1), rgb.flip(-1), rgb)
    return rgb.permute(0, 3, 1, 2).contiguous()


def heatmap(relevance: Tensor, *, percentile: float = 100.0, gamma: float = 1.0) -> Tensor:
    """Relevance as RGB images: channel sum, per-sample scaling, diverging colours.

    Parameters
    ----------
    relevance
        ``(B, C, H, W)``, ``(B, H, W)`` or ``(H, W)``.
    percentile, gamma
        As for :func:`scale_relevance`.

    Returns
    -------
    Tensor
        ``(B, 3, H, W)`` float32 in ``[0, 1]``: white at 0, red positive, blue negative.
    """
    return colorize(scale_relevance(relevance, percentile=percentile, gamma=gamma))


def overlay(images: Tensor, relevance: Tensor, *, alpha: float = 0.8, percentile: float = 100.0,
            gamma: float = 1.0) -> Tensor:
    """Heatmap colours over a greyscale copy of the images, opaque in proportion to ``|relevance|``.

    Parameters
    ----------
    images
        ``(B, 3, H, W)`` or ``(B, 1, H, W)`` pixels in ``[0, 1]``.
    relevance
        Relevance of the same batch and size.
    alpha
        Opacity of the strongest relevance; zero relevance leaves the greyscale image.
    percentile, gamma
        As for :func:`scale_relevance`.

    Returns
    -------
    Tensor
        ``(B, 3, H, W)`` in ``[0, 1]``.
    """
    values = scale_relevance(relevance, percentile=percentile, gamma=gamma)
    if images.dim() != 4 or images.shape[0] != values.shape[0] or images.shape[-2:] != values.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and relevance {tuple(relevance.shape)} differ in batch or size")
    grey = images.detach().float().cpu().clamp(0, 1).mean(1, keepdim=True).expand(-1, 3, -1, -1)
    weight = alpha * values.abs().unsqueeze(1).cpu()
    return (1 - weight) * grey + weight * colorize(values).cpu()


def mask_outline(images: Tensor, masks: Tensor, *, colour: tuple[float, float, float] = (1.0, 0.85, 0.0)) -> Tensor:
    """Images ``(B, 3, H, W)`` with the border pixels of the ``(B, 1, H, W)`` bool masks painted ``colour``."""
    m = masks.float()
    eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    border = (m - eroded) > 0
    paint = torch.tensor(colour, dtype=images.dtype).view(1, 3, 1, 1)
    return torch.where(border, paint, images)


def to_pil(image: Tensor, *, scale: int = 1) -> Image.Image:
    """A ``(3, H, W)`` or ``(H, W)`` tensor in ``[0, 1]`` as a Pillow RGB image, enlarged ``scale`` times."""
    shape_ok = isinstance(image, Tensor) and (image.dim() == 2 or (image.dim() == 3 and image.shape[0] in (1, 3)))
    if not shape_ok:
        raise ValueError(f"image must be a (3, H, W), (1, H, W) or (H, W) tensor, got {_describe(image)}")
    image = image.detach().float().cpu()
    image = (image if image.dim() == 3 else image.unsqueeze(0)).expand(3, -1, -1)
    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    pil = Image.frombytes("RGB", (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes())
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_png(image: Tensor | Image.Image, path: str | Path, *, scale: int = 1) -> Path:
    """Save a tensor (as for :func:`to_pil`) or a Pillow image as PNG; returns the path."""
    pil = image if isinstance(image, Image.Image) else to_pil(image, scale=scale)
    path = Path(path)
    pil.save(path, format="PNG", optimize=True)
    return path


def image_grid(rows: Sequence[Sequence[Tensor]], *, column_titles: Sequence[str] = (),
               row_titles: Sequence[str] = (), scale: int = 2, pad: int = 4) -> Image.Image:
    """Tile ``(3, H, W)`` images into a labelled grid (white background, titles in the default font).

    Parameters
    ----------
    rows
        Equal-sized images, row by row.
    column_titles, row_titles
        Text above each column and left of each row (optional).
    scale
        Enlargement of each image (nearest neighbour).
    pad
        Pixels between the tiles.
    """
    font = _font()
    height, width = (int(s) * scale for s in rows[0][0].shape[-2:])
    left = max((_text_width(t, font) for t in row_titles), default=0) + (2 * pad if row_titles else 0)
    top = 16 + pad if column_titles else 0
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (left + columns * (width + pad) + pad, top + len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles):
        draw.text((left + pad + j * (width + pad), pad), _fit(title, width, font), fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (height + pad)
        if i < len(row_titles):
            draw.text((pad, y + height // 2 - 6), row_titles[i], fill="black", font=font)
        for j, image in enumerate(row):
            canvas.paste(to_pil(image, scale=scale), (left + pad + j * (width + pad), y))
    return canvas


def line_chart(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, title: str = "",
               xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (640, 420)) -> Image.Image:
    """A line chart of ``{label: (x, y)}`` with a legend, drawn with Pillow."""
    font = _font()
    canvas, draw, frame = _axes(size, title, xlabel, ylabel, font)
    xs = [float(v) for x, _ in series.values() for v in x]
    ys = [float(v) for _, y in series.values() for v in y]
    project = _projection(frame, xs, ys, draw, font)
    for k, (label, (x, y)) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        points = [project(float(a), float(b)) for a, b in zip(x, y)]
        draw.line(points, fill=colour, width=2)
        legend_y = frame[1] + 6 + 14 * k
        draw.line([(frame[2] - 150, legend_y + 6), (frame[2] - 130, legend_y + 6)], fill=colour, width=3)
        draw.text((frame[2] - 126, legend_y), _fit(label, 124, font), fill="black", font=font)
    return canvas


def bar_chart(values: Sequence[float], *, labels: Sequence[str] | None = None, title: str = "",
              xlabel: str = "", ylabel: str = "", size: tuple[int, int] = (640, 420)) -> Image.Image:
    """A bar chart of ``values`` (bars at 1, 2, ... unless ``labels`` are given), drawn with Pillow."""
    font = _font()
    canvas, draw, frame = _axes(size, title, xlabel, ylabel, font)
    n = len(values)
    project = _projection(frame, [0.5, n + 0.5], [0.0, *map(float, values)], draw, font, xticks=False)
    for k, value in enumerate(values):
        x0, y0 = project(k + 0.6, float(value))
        x1, y1 = project(k + 1.4, 0.0)
        draw.rectangle([x0, y0, x1, y1], fill=PALETTE[0])
        text = labels[k] if labels else str(k + 1)
        if n <= 30 or k % (n // 15 + 1) == 0:
            draw.text((x0, frame[3] + 4), text, fill="black", font=font)
    return canvas


def _axes(size, title, xlabel, ylabel, font):
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    frame = (60, 30, size[0] - 15, size[1] - 45)  # left, top, right, bottom
    draw.rectangle(frame, outline="black")
    draw.text((frame[0], 8), title, fill="black", font=font)
    draw.text(((frame[0] + frame[2]) // 2 - _text_width(xlabel, font) // 2, size[1] - 18), xlabel, fill="black",
              font=font)
    draw.text((4, 12), ylabel, fill="black", font=font)
    return canvas, draw, frame


def _projection(frame, xs, ys, draw, font, xticks: bool = True):
    """Map data to pixels inside ``frame``; draws the y ticks (and x ticks)."""
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.5, y1 + 0.5) if y1 - y0 < 1e-12 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
    x1 = x1 if x1 > x0 else x0 + 1

    def project(x: float, y: float) -> tuple[float, float]:
        return (frame[0] + (x - x0) / (x1 - x0) * (frame[2] - frame[0]),
                frame[3] - (y - y0) / (y1 - y0) * (frame[3] - frame[1]))

    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        _, py = project(x0, y)
        draw.line([(frame[0] - 4, py), (frame[0], py)], fill="black")
        draw.text((4, py - 6), f"{y:.3g}", fill="black", font=font)
        if xticks:
            x = x0 + (x1 - x0) * k / 4
            px, _ = project(x, y0)
            draw.line([(px, frame[3]), (px, frame[3] + 4)], fill="black")
            draw.text((px - 8, frame[3] + 6), f"{x:.3g}", fill="black", font=font)
    return project


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _text_width(text: str, font) -> int:
    return int(font.getlength(text)) if hasattr(font, "getlength") else 6 * len(text)


def _fit(text: str, width: int, font) -> str:
    while text and _text_width(text, font) > width:
        text = text[:-1]
    return text


def _describe(value: object) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
