r"""Twins of the layers torchvision's detection models add to a backbone.

* :class:`LRPFrozenBatchNorm2d`: the frozen BatchNorm of detection backbones, an affine map
  per channel (``convert`` folds it into the convolution before it where it can);
* :class:`LRPRoIAlign` and :class:`LRPMultiScaleRoIAlign`: RoIAlign is linear in the
  feature map for fixed boxes (bilinear sampling with non-negative weights, averaged per
  bin); relevance takes the ``Norm`` rule, :math:`R_x = x \odot J^\top (R / \mathrm{stab}(z))`.
  The boxes only select where to sample and receive no relevance;
* :class:`LRPConvTranspose2d`: a transposed convolution (Mask R-CNN's mask head), a weighted
  layer whose VJP is the convolution with the same weight;
* ``F.normalize`` (SSD's L2 norm of VGG features) is :class:`lrpx.layers.Normalize`, with the norm held
  constant, so that relevance passes each entry unchanged (``Pass``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import lrp_apply
from ..ops import DiagonalOps
from .base import Twin

__all__ = ["RoIAlignOps", "ConvTransposeOps", "LRPFrozenBatchNorm2d", "LRPRoIAlign", "LRPMultiScaleRoIAlign",
           "LRPConvTranspose2d", "DETECTION_TWINS", "DETECTION_KEPT", "roi_format"]

try:
    from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
    from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign, RoIAlign, roi_align
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.ops.poolers import _setup_scales
except ImportError:  # pragma: no cover - torchvision is a dependency
    FrozenBatchNorm2d = MultiScaleRoIAlign = RoIAlign = None


@dataclass(frozen=True, eq=False)
class RoIAlignOps:
    """RoIAlign of a feature map at fixed ``rois`` (``(K, 5)``: image index, x1, y1, x2, y2):
    a parameter-free linear map; VJP by torchvision's backward kernel."""

    rois: Tensor
    output_size: tuple[int, int]
    spatial_scale: float
    sampling_ratio: int
    aligned: bool
    kind: ClassVar[str] = "sum"
    channel_axis: int = 1

    def forward(self, input: Tensor, weight: None = None, bias: None = None) -> Tensor:
        return roi_align(input, self.rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def vjp(self, s: Tensor, weight: None, input: Tensor | torch.Size) -> Tensor:
        b, c, h, w = input.shape
        return torch.ops.torchvision._roi_align_backward(
            s.contiguous(), self.rois, self.spatial_scale, self.output_size[0], self.output_size[1], b, c, h, w,
            self.sampling_ratio, self.aligned)


def roi_format(boxes: list[Tensor]) -> Tensor:
    """Boxes per image as one ``(K, 5)`` tensor of rows ``(image index, x1, y1, x2, y2)``."""
    rows = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rows, dim=0)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]) if len(size) > 1 else int(size[0]))


class _SumTwin(Twin):
    lrp_kind = "sum"


class LRPRoIAlign(_SumTwin, RoIAlign if RoIAlign is not None else nn.Module):
    """torchvision's ``RoIAlign`` with the ``Norm`` rule on the features (boxes fixed)."""

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        rois = roi_format(rois) if isinstance(rois, (list, tuple)) else rois
        ops = RoIAlignOps(rois.detach(), _pair(self.output_size), float(self.spatial_scale),
                          int(self.sampling_ratio), bool(self.aligned))
        return lrp_apply(ops, self.rule, input)


class LRPMultiScaleRoIAlign(_SumTwin, MultiScaleRoIAlign if MultiScaleRoIAlign is not None else nn.Module):
    """torchvision's ``MultiScaleRoIAlign`` (box features from the FPN level each box maps to)
    with the ``Norm`` rule on each level's RoIAlign; every box row comes from one level, so the
    relevance of a row goes to that level's feature map only."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = roi_format([b.detach() for b in boxes])
        size = _pair(self.output_size)

        def pool(feature: Tensor, scale: float, at: Tensor) -> Tensor:
            ops = RoIAlignOps(at, size, float(scale), int(self.sampling_ratio), False)
            return lrp_apply(ops, self.rule, feature)

        if len(features) == 1:
            return pool(features[0], self.scales[0], rois)
        levels = self.map_levels(boxes)
        result = features[0].new_zeros((len(rois), features[0].shape[1]) + size)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            index = torch.where(levels == level)[0]
            result = result.index_put((index,), pool(feature, scale, rois[index]).to(result.dtype))
        return result


class LRPFrozenBatchNorm2d(Twin, FrozenBatchNorm2d if FrozenBatchNorm2d is not None else nn.Module):
    """torchvision's ``FrozenBatchNorm2d`` as the affine layer ``x * scale + shift`` with an
    LRP rule (a weighted layer, like an eval-mode BatchNorm)."""

    lrp_kind = "weighted"
    lrp_fusable = True

    def forward(self, input: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        ops = DiagonalOps(input_nonnegative=self.input_nonnegative)
        return lrp_apply(ops, self.rule, input, scale, shift, relu=self.fused_relu)


@dataclass(frozen=True)
class ConvTransposeOps:
    """``F.conv_transpose2d``; its VJP is ``F.conv2d`` of ``s`` with the same weight."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    kind: ClassVar[str] = "weighted"
    channel_axis: int = 1
    input_nonnegative: bool = False

    def forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv_transpose2d(input, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                                  self.dilation)

    def vjp(self, s: Tensor, weight: Tensor, input: Tensor | torch.Size) -> Tensor:
        return F.conv2d(s, weight, None, self.stride, self.padding, self.dilation, self.groups)


class LRPConvTranspose2d(Twin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (zero padding) whose backward applies its LRP rule."""

    lrp_kind = "weighted"
    lrp_fusable = True

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only, got {self.padding_mode!r}")
        extra = self._output_padding(input, output_size, list(self.stride), list(self.padding),
                                     list(self.kernel_size), 2, list(self.dilation))
        ops = ConvTransposeOps(tuple(self.stride), tuple(self.padding), tuple(extra), tuple(self.dilation),
                               self.groups, input_nonnegative=self.input_nonnegative)
        return lrp_apply(ops, self.rule, input, self.weight, self.bias, relu=self.fused_relu)


DETECTION_TWINS: dict[type[nn.Module], type[nn.Module]] = {nn.ConvTranspose2d: LRPConvTranspose2d}
#: detection layers kept as they are: anchors and default boxes (no relevance), the FPN's
#: extra max-pooled level (a subsampling: its gradient routes relevance)
DETECTION_KEPT: tuple[type[nn.Module], ...] = ()
if FrozenBatchNorm2d is not None:
    DETECTION_TWINS.update({FrozenBatchNorm2d: LRPFrozenBatchNorm2d, RoIAlign: LRPRoIAlign,
                            MultiScaleRoIAlign: LRPMultiScaleRoIAlign})
    DETECTION_KEPT = (AnchorGenerator, DefaultBoxGenerator, LastLevelMaxPool)

