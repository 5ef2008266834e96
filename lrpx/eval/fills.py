"""Fills: the values that replace removed pixels.

Every fill works on a batch ``x`` of shape ``(N, C, H, W)`` and a removal mask of shape
``(N, 1, H, W)`` (``True`` = removed). A fill first draws or computes its per-sample state once
(:meth:`Fill.prepare`, on the whole batch of original images), then gives the replacement values
for any chunk of items (:meth:`Fill.__call__`). Fills with ``static = True`` ignore the mask, so
their state *is* the replacement image. Fills with ``pixel_space = True`` receive ``x`` in pixel
space and return pixel values; the caller maps them with the ``(to_pixel, from_pixel)`` pair.

``low`` and ``high`` are the per-sample pixel range, shaped ``(N, 1, 1, 1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .draws import rand


class Fill:
    """Base class of fills; subclasses override :meth:`prepare` and/or :meth:`__call__`."""

    name = "fill"
    static = False
    pixel_space = True

    def prepare(
        self, x: Tensor, *, low: Tensor, high: Tensor, generator: torch.Generator | None
    ) -> Tensor | None:
        """Per-sample state, computed once from the original images ``x`` (``(B, ...)``)."""
        return None

    def __call__(
        self, x: Tensor, mask: Tensor, state: Tensor | None, *, low: Tensor, high: Tensor
    ) -> Tensor:
        """Replacement values for the items ``x`` with removal ``mask``, shape of ``x``."""
        return state

    def __repr__(self) -> str:
        return self.name


class UniformNoise(Fill):
    r"""Uniform noise in the pixel range, per pixel and channel, drawn once per sample.

    .. math:: \tilde x_{cij} \sim \mathcal U[\mathrm{low}, \mathrm{high}]
    """

    name = "random"
    static = True

    def prepare(self, x, *, low, high, generator):
        draws = rand(x.shape, generator, device=x.device, dtype=x.dtype)
        return low + (high - low) * draws


class Constant(Fill):
    """A constant value.

    Parameters
    ----------
    value
        A number or a tensor broadcastable to ``(B, C, H, W)``, in **model-input** space (so
        ``0.0`` is zero after normalisation). ``None`` (the named fill ``"constant"``) is the
        midpoint ``(low + high) / 2`` of the pixel range (grey), in pixel space.
    """

    name = "constant"
    static = True

    def __init__(self, value: float | Tensor | None = None):
        self.value = value
        self.pixel_space = value is None

    def prepare(self, x, *, low, high, generator):
        value = (low + high) / 2 if self.value is None else self.value
        return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand(x.shape)

    def __repr__(self) -> str:
        return "constant" if self.value is None else f"constant({self.value})"


class ChannelMean(Fill):
    """The per-sample, per-channel mean of the original image."""

    name = "mean"
    static = True

    def prepare(self, x, *, low, high, generator):
        return x.mean(dim=(2, 3), keepdim=True).expand(x.shape)


class GaussianBlur(Fill):
    r"""A Gaussian blur of the original image (normalised at the borders).

    Parameters
    ----------
    sigma
        Standard deviation in pixels; the kernel reaches :math:`\lceil 3\sigma \rceil`.
    """

    name = "blur"
    static = True

    def __init__(self, sigma: float = 5.0):
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma

    def prepare(self, x, *, low, high, generator):
        radius = math.ceil(3 * self.sigma)
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(taps**2) / (2 * self.sigma**2))
        blurred = _separable(x, kernel)
        return blurred / _separable(torch.ones_like(x[:1, :1]), kernel)


def _separable(x: Tensor, kernel: Tensor) -> Tensor:
    batch, channels, height, width = x.shape
    flat = x.reshape(batch * channels, 1, height, width)
    radius = kernel.numel() // 2
    flat = F.conv2d(flat, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    flat = F.conv2d(flat, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return flat.view(batch, channels, height, width)


class Inpaint(Fill):
    """Smooth inpainting from the known pixels, batched on any device.

    A coarse-to-fine harmonic fill: known pixels are averaged down a 2x pyramid (push), and from
    the coarsest level up each level starts from the bilinear upsampling of the one below and
    runs ``iterations`` Jacobi sweeps of the 8-neighbour average with the known pixels held
    fixed (pull). The result is a convex combination of known pixels, so every value lies in
    the per-channel range of the known pixels (clamped against rounding), and a linear ramp
    is reconstructed exactly inside the image; holes that touch the image border get a zero
    normal derivative there. With no known pixel left (100% removed) the fill is the midpoint
    of the pixel range.

    Parameters
    ----------
    iterations
        Jacobi sweeps per pyramid level.
    """

    name = "inpaint"

    def __init__(self, iterations: int = 24):
        self.iterations = iterations

    def __call__(self, x, mask, state, *, low, high):
        known = (~mask).to(x.dtype)
        filled = _harmonic(x * known, known, self.iterations)
        filled = _clamp_to_known(filled, x, mask)
        return _fallback_when_empty(filled, mask, low, high)


def _neighbour_sum(u: Tensor) -> Tensor:
    """Weighted sum of the in-image 8 neighbours of every pixel (zero outside the image).

    The weights of noisy linear imputation (Rong et al. 2022): 1/6 on the 4 edge neighbours,
    1/12 on the 4 diagonal ones. On the CPU as shifted slices (no thread-pool round trip per
    call); elsewhere as ``4/3`` of the binomial blur ``[1, 2, 1] x [1, 2, 1] / 16`` minus its
    centre ``1/4``, the blur being two 2x2 average poolings (few kernel launches, and no TF32
    rounding as a convolution would have).
    """
    padded = F.pad(u, (1, 1, 1, 1))
    if u.device.type == "cpu":
        left_right = padded[..., :, :-2] + padded[..., :, 2:]
        up_down = padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1]
        diagonals = left_right[..., :-2, :] + left_right[..., 2:, :]
        return (left_right[..., 1:-1, :] + up_down) / 6 + diagonals / 12
    blur = F.avg_pool2d(F.avg_pool2d(padded, 2, stride=1), 2, stride=1)
    return torch.add(blur, u, alpha=-0.25) * (4 / 3)


def _neighbour_weight_sum(like: Tensor) -> Tensor:
    """``d_i``: the summed weights of the in-image neighbours, ``(1, 1, H, W)``."""
    return _neighbour_sum(torch.ones_like(like[:1, :1]))


def _harmonic(values: Tensor, weight: Tensor, iterations: int) -> Tensor:
    """Coarse-to-fine Jacobi fill; ``values`` are weighted sums, ``weight`` known shares."""
    height, width = values.shape[-2:]
    fixed = weight > 0
    data = values / weight.clamp_min(torch.finfo(values.dtype).tiny)
    if height == 1 and width == 1:
        return data
    pad = (0, width % 2, 0, height % 2)
    coarse = _harmonic(
        F.avg_pool2d(F.pad(values, pad), 2), F.avg_pool2d(F.pad(weight, pad), 2), iterations
    )
    up = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)
    u = torch.where(fixed, data, up[..., :height, :width])
    step = (~fixed).to(u.dtype) / _neighbour_weight_sum(u)  # data is 0 where not fixed
    for _ in range(iterations):
        u = torch.addcmul(data, step, _neighbour_sum(u))
    return u


def _clamp_to_known(filled: Tensor, x: Tensor, mask: Tensor) -> Tensor:
    big = torch.finfo(x.dtype).max
    lower = torch.where(mask, big, x).amin(dim=(2, 3), keepdim=True)
    upper = torch.where(mask, -big, x).amax(dim=(2, 3), keepdim=True)
    return torch.minimum(torch.maximum(filled, lower), upper)


def _fallback_when_empty(filled: Tensor, mask: Tensor, low: Tensor, high: Tensor) -> Tensor:
    empty = mask.flatten(1).all(dim=1).view(-1, 1, 1, 1)
    return torch.where(empty, (low + high) / 2, filled)


class Road(Fill):
    r"""Noisy linear imputation (ROAD; Rong et al. 2022).

    Each removed pixel is the weighted mean of its in-image 8 neighbours (weight 1/6 on edges,
    1/12 on diagonals), all removed pixels jointly; then Gaussian noise is added:

    .. math:: d_i \tilde x_i - \sum_{j \in N(i)} w_{ij} \tilde x_j = 0, \qquad
              \hat x_i = \tilde x_i + \sigma (\mathrm{high} - \mathrm{low})\, \varepsilon_i

    with :math:`d_i = \sum_{j \in N(i)} w_{ij}` and known :math:`\tilde x_j = x_j`. The system
    (a Dirichlet graph Laplacian, symmetric positive definite) is solved per item with
    Jacobi-preconditioned conjugate gradients over convolution mat-vecs, started from
    :class:`Inpaint`. The noise :math:`\varepsilon \sim \mathcal N(0, 1)` is drawn once per
    sample and pixel. With no known pixel left the fill is the midpoint of the pixel range.

    Parameters
    ----------
    sigma
        Noise standard deviation as a share of the pixel range ``high - low``.
    tol
        Relative residual ``||r|| <= tol ||b||`` at which an item stops.
    max_iter
        Most conjugate-gradient iterations.
    """

    name = "road"

    def __init__(self, sigma: float = 0.01, tol: float = 1e-6, max_iter: int = 2000):
        self.sigma, self.tol, self.max_iter = sigma, tol, max_iter

    def prepare(self, x, *, low, high, generator):
        return rand(x.shape, generator, device=x.device, dtype=x.dtype, normal=True)

    def __call__(self, x, mask, state, *, low, high):
        empty = mask.flatten(1).all(dim=1).view(-1, 1, 1, 1)
        unknown = (mask & ~empty).to(x.dtype)
        start = Inpaint(iterations=8)(x, mask, None, low=low, high=high)
        solved = solve_imputation(x, unknown, start, tol=self.tol, max_iter=self.max_iter)
        noisy = solved + self.sigma * (high - low) * state
        return _fallback_when_empty(noisy, mask, low, high)


def imputation_operator(v: Tensor, unknown: Tensor, degree: Tensor) -> Tensor:
    """Mat-vec of the imputation system restricted to the ``unknown`` pixels."""
    return unknown * (degree * v - _neighbour_sum(unknown * v))


def solve_imputation(
    x: Tensor, unknown: Tensor, start: Tensor, *, tol: float = 1e-6, max_iter: int = 2000
) -> Tensor:
    """Solve the linear-imputation system per item with preconditioned conjugate gradients.

    Parameters
    ----------
    x
        ``(N, C, H, W)`` images; their known pixels are the boundary values.
    unknown
        ``(N, 1, H, W)`` float, 1 on the pixels to impute.
    start
        Initial guess for the unknown pixels.
    tol, max_iter
        Stop an item at ``||r|| <= tol ||b||``; at most ``max_iter`` iterations.

    Returns
    -------
    Tensor
        ``x`` with its unknown pixels replaced by the solution.
    """
    degree = _neighbour_weight_sum(x)
    tiny = torch.finfo(x.dtype).tiny
    rhs = unknown * _neighbour_sum((1 - unknown) * x)
    u = unknown * start
    residual = rhs - imputation_operator(u, unknown, degree)
    z = residual / degree
    direction, rz = z, _dot(residual, z)
    limit = tol * _dot(rhs, rhs).sqrt()
    active = _dot(residual, residual).sqrt() > limit
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        applied = imputation_operator(direction, unknown, degree)
        curvature = _dot(direction, applied)
        alpha = torch.where(active & (curvature > 0), rz / curvature.clamp_min(tiny), 0)
        u = u + alpha * direction
        residual = residual - alpha * applied
        active = active & (_dot(residual, residual).sqrt() > limit)
        z = residual / degree
        rz_new = _dot(residual, z)
        beta = torch.where(active, rz_new / rz.clamp_min(tiny), 0)
        direction = torch.where(active, z + beta * direction, direction)
        rz = torch.where(active, rz_new, rz)
    return torch.where(unknown > 0, u, x)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=(1, 2, 3), keepdim=True)


class FunctionFill(Fill):
    """A user function ``fill(x, mask) -> values`` in model-input space, called per chunk."""

    pixel_space = False

    def __init__(self, function: Callable[[Tensor, Tensor], Tensor]):
        self.function = function
        self.name = getattr(function, "__name__", type(function).__name__)

    def __call__(self, x, mask, state, *, low, high):
        return self.function(x, mask)


FILLS: dict[str, type[Fill]] = {
    "random": UniformNoise,
    "inpaint": Inpaint,
    "road": Road,
    "constant": Constant,
    "mean": ChannelMean,
    "blur": GaussianBlur,
}


def get_fills() -> dict[str, type[Fill]]:
    """A copy of the named fills."""
    return dict(FILLS)


def as_fill(fill: str | float | Tensor | Fill | Callable[[Tensor, Tensor], Tensor]) -> Fill:
    """Resolve the ``fill`` argument of :func:`~lrpx.eval.pixel_flipping` to a :class:`Fill`."""
    if isinstance(fill, Fill):
        return fill
    if isinstance(fill, str):
        if fill not in FILLS:
            raise ValueError(
                f"fill must be one of {sorted(FILLS)}, a number, a tensor or a callable; "
                f"got {fill!r}"
            )
        return FILLS[fill]()
    if isinstance(fill, (int, float, Tensor)) and not isinstance(fill, bool):
        return Constant(fill)
    if callable(fill):
        return FunctionFill(fill)
    raise TypeError(f"fill must be a name, a number, a tensor or a callable, got {type(fill)}")
