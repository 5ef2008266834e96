"""Figures of the concept atlas: a PNG per channel with its reference crops (Pillow, fast enough
for every channel of a wide layer), and the top concepts of one image's prediction (matplotlib,
the optional ``plot`` extra)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..image import heatmap, overlay
from .tables import KINDS, read_maxima

__all__ = ["require_matplotlib", "read_heatmaps", "reference_crops", "write_channel_figures", "concepts_figure"]


def require_matplotlib():
    """The ``matplotlib.figure.Figure`` class, or an ImportError that says how to install it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the atlas figures need matplotlib: pip install 'lrpx[plot]' (or pip install "
                          "matplotlib)") from None
    return Figure


def read_heatmaps(out: Path) -> dict[str, Tensor]:
    """The cropped conditional heatmaps of the reference images, ``{"channel/index": (h, w)}``."""
    from safetensors.torch import load_file

    found: dict[str, Tensor] = {}
    for part in sorted((Path(out) / "references" / "relevance").glob("part-*.safetensors")):
        found.update(load_file(str(part)))
    return found


def _pixels(x: Tensor, to_pixels: Callable | None) -> Tensor:
    """``(3, H, W)`` model input as pixels in ``[0, 1]``."""
    if to_pixels is not None:
        return to_pixels(x[None].float().cpu())[0]
    low, high = x.min(), x.max()
    return (x.float().cpu() - low) / (high - low if high > low else 1)


def reference_crops(rows: Sequence[dict], dataset, heatmaps: dict[str, Tensor],
                    to_pixels: Callable | None = None) -> list[tuple[Tensor, Tensor, dict]]:
    """For maxima rows: ``(image crop (3, h, w), heatmap overlay crop (3, h, w), row)``; the
    images are read from ``dataset`` by index."""
    crops = []
    for row in rows:
        _, image, _, _ = dataset[row["index"]]
        if image is None:
            continue
        t, left, b, right = row["top"], row["left"], row["bottom"], row["right"]
        pixels = _pixels(image, to_pixels)[:, t:b, left:right]
        heat = heatmaps.get(f"{row['channel']}/{row['index']}")
        if heat is None or heat.shape != pixels.shape[1:]:
            heat = torch.zeros(pixels.shape[1:])
        crops.append((pixels, overlay(pixels[None], heat.float()[None])[0], row))
    return crops


def write_channel_figures(out: Path, dataset, *, to_pixels: Callable | None = None, tile: int = 72) -> list[Path]:
    """``OUT/atlas/channel-CCCC.png`` per channel, drawn with Pillow: a row of reference crops by
    relevance and one by activation, each crop above its conditional heatmap (over a grey
    copy), captioned with the image's predicted class and the value it was ranked by."""
    from ..datasets import num_threads

    out = Path(out)
    rows = read_maxima(out)
    heatmaps = read_heatmaps(out)
    folder = out / "atlas"
    folder.mkdir(exist_ok=True)
    with num_threads(1):  # tensors of a few thousand pixels: threads cost more than they give
        return [_channel_figure(folder, channel, [r for r in rows if r["channel"] == channel], dataset, heatmaps,
                                to_pixels, tile) for channel in sorted({r["channel"] for r in rows})]


def _channel_figure(folder: Path, channel: int, mine: list[dict], dataset, heatmaps, to_pixels, tile: int) -> Path:
    from PIL import Image, ImageDraw

    from ..image import _font, to_pil

    font, pad, caption = _font(), 4, 24
    top = max(r["rank"] for r in mine)
    left = 78
    width, band = left + top * (tile + pad) + pad, 2 * tile + caption + 2 * pad
    canvas = Image.new("RGB", (width, 18 + len(KINDS) * band), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 3), f"{mine[0]['layer']}, channel {channel}", fill="black", font=font)
    for k, kind in enumerate(KINDS):
        y = 18 + k * band
        draw.text((pad, y + tile - 6), f"by {kind}", fill="black", font=font)
        ranked = sorted((r for r in mine if r["kind"] == kind), key=lambda r: r["rank"])
        for col, (pixels, lay, row) in enumerate(reference_crops(ranked, dataset, heatmaps, to_pixels)):
            x = left + pad + col * (tile + pad)
            canvas.paste(to_pil(_fit(pixels, tile)), (x, y))
            canvas.paste(to_pil(_fit(lay, tile)), (x, y + tile + 2))
            draw.text((x, y + 2 * tile + 3), f"{row['class_name'][:11]}", fill="black", font=font)
            draw.text((x, y + 2 * tile + 13), f"{row['value']:.3g}", fill="dimgray", font=font)
    path = folder / f"channel-{channel:04d}.png"
    canvas.save(path, format="PNG")
    return path


def _fit(image: Tensor, side: int) -> Tensor:
    """``(3, h, w)`` scaled to fit a ``side`` x ``side`` white square, aspect kept."""
    import torch.nn.functional as F

    h, w = image.shape[1:]
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0].clamp(0, 1)
    canvas = torch.ones(3, side, side)
    top, left = (side - size[0]) // 2, (side - size[1]) // 2
    canvas[:, top:top + size[0], left:left + size[1]] = resized
    return canvas


def concepts_figure(pixels: Tensor, relevance: Tensor, concepts: Sequence[dict], *, title: str = ""):
    """One image's top concepts: the image and its heatmap, then per concept its share of the
    layer's relevance, its conditional heatmap and its reference crops.

    ``concepts`` holds ``{"channel", "share", "heatmap" (H, W), "references": [(image crop,
    overlay crop, row), ...]}``. Returns a matplotlib Figure.
    """
    Figure = require_matplotlib()
    refs = max((len(c["references"]) for c in concepts), default=0)
    columns = max(2, 1 + refs)
    fig = Figure(figsize=(1.5 * columns + 0.3, 1.6 * (len(concepts) + 1) + 0.4))
    axes = fig.subplots(len(concepts) + 1, columns, squeeze=False)
    axes[0, 0].imshow(pixels.permute(1, 2, 0).numpy())
    axes[0, 0].set_title("input", fontsize=8)
    axes[0, 1].imshow(heatmap(relevance[None])[0].permute(1, 2, 0).numpy())
    axes[0, 1].set_title("heatmap", fontsize=8)
    for row, concept in enumerate(concepts, start=1):
        axes[row, 0].imshow(overlay(pixels[None], concept["heatmap"][None])[0].permute(1, 2, 0).numpy())
        axes[row, 0].set_title(f"channel {concept['channel']}: {100 * concept['share']:.1f}%", fontsize=8)
        for col, (_, lay, ref) in enumerate(concept["references"], start=1):
            axes[row, col].imshow(lay.permute(1, 2, 0).numpy())
            axes[row, col].set_title(f"ref {ref['rank']}: {ref['class_name']}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
