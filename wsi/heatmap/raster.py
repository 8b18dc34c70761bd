"""Per-tile values painted into rasters on pixel grids aligned with level 0 of the slide.

A grid of downsample ``d`` has pixel (row ``r``, column ``c``) covering level-0 ``x`` in ``[c*d, (c+1)*d)`` and
``y`` in ``[r*d, (r+1)*d)``, so grid (0, 0) sits on the slide's top-left corner at every downsample. A tile
adds its value to each pixel it overlaps, weighted by the share of the pixel it covers (area weighting: a tile
edge falling inside a pixel counts in proportion), and overlapping tiles are averaged with those weights.
The covered share of each pixel (``coverage``, clipped to 1) becomes the transparency of the heatmap, so
pixels no tile touches stay transparent and tile edges are drawn where the tiles really end.

Smoothing is a normalised convolution: the weighted sum and the weights are blurred by the same Gaussian and
divided, so values spread between tiles but never leak into pixels without tiles (those stay transparent),
and the transparency keeps the tiles' sharp outline. Rendering a window with a halo of the kernel's radius
gives exactly the pixels a whole-raster render would, which is what lets the pyramidal TIFF be written one
tile at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

from ..errors import ConfigError

NORMALIZATIONS = ("percentile", "raw")
_GAUSS_TRUNCATE = 4.0  # scipy's default: the kernel reaches 4 sigma
_PAINT_BATCH = 1 << 20  # (tile, pixel) pairs painted per step: bounds memory whatever the downsample


@dataclass(frozen=True)
class TileValues:
    """Tiles to paint: level-0 top-left corners (N, 2), one square footprint at level 0, a value each."""

    coords: np.ndarray
    size: float
    values: np.ndarray

    def __post_init__(self):
        if self.coords.shape != (len(self.values), 2):
            raise ValueError(f"TileValues: {self.coords.shape} coords for {len(self.values)} values")


def grid_shape(width0: int, height0: int, downsample: float) -> tuple[int, int]:
    """(height, width) of the grid of ``downsample`` that covers a level-0 extent (the last pixel may overhang)."""
    return max(1, math.ceil(height0 / downsample)), max(1, math.ceil(width0 / downsample))


def normalise(values: np.ndarray, mode: str) -> np.ndarray:
    """Per-tile values in [0, 1]: ``percentile`` = rank within the slide (ties share their mean rank), ``raw`` =
    the value itself (a probability), clipped."""
    values = np.asarray(values, np.float64)
    if mode == "percentile":
        if len(values) < 2:
            return np.zeros(len(values))
        return (stats.rankdata(values, method="average") - 1.0) / (len(values) - 1.0)
    if mode == "raw":
        return np.clip(values, 0.0, 1.0)
    raise ConfigError(None, f"heatmap.normalize {mode!r} is not one of {NORMALIZATIONS}")


def smoothing_radius(sigma: float) -> int:
    """Pixels a Gaussian of ``sigma`` reaches (scipy's kernel radius); 0 when there is no smoothing."""
    return int(_GAUSS_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def _axis_weights(start: np.ndarray, size: float, downsample: float, origin: int, n: int, span: int):
    """For each tile, the ``span`` grid pixels from its first one and the share of each the tile covers."""
    lo = start / downsample - origin
    hi = (start + size) / downsample - origin
    first = np.floor(lo).astype(np.int64)
    pix = first[:, None] + np.arange(span)[None, :]
    share = np.minimum(pix + 1, hi[:, None]) - np.maximum(pix, lo[:, None])
    share = np.where((pix >= 0) & (pix < n), np.clip(share, 0.0, 1.0), 0.0)
    return np.clip(pix, 0, n - 1), share


def paint(tiles: TileValues, downsample: float, x0: int, y0: int, width: int, height: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted (sum of value x weight, sum of weight) over grid pixels ``[x0, x0+width) x [y0, y0+height)``.

    Only tiles overlapping the window are touched, so memory follows the window, not the slide.
    """
    acc = np.zeros(height * width, np.float64)
    weight = np.zeros(height * width, np.float64)
    xs, ys = tiles.coords[:, 0].astype(np.float64), tiles.coords[:, 1].astype(np.float64)
    hit = ((xs < (x0 + width) * downsample) & (xs + tiles.size > x0 * downsample)
           & (ys < (y0 + height) * downsample) & (ys + tiles.size > y0 * downsample))
    index = np.flatnonzero(hit)
    span = int(math.ceil(tiles.size / downsample)) + 1
    batch = max(1, _PAINT_BATCH // (span * span))
    for lo in range(0, len(index), batch):
        part = index[lo:lo + batch]
        cols, wx = _axis_weights(xs[part], tiles.size, downsample, x0, width, span)
        rows, wy = _axis_weights(ys[part], tiles.size, downsample, y0, height, span)
        w = (wy[:, :, None] * wx[:, None, :]).ravel()
        flat = (rows[:, :, None] * width + cols[:, None, :]).ravel()
        v = np.repeat(np.asarray(tiles.values, np.float64)[part], span * span)
        acc += np.bincount(flat, weights=w * v, minlength=acc.size)
        weight += np.bincount(flat, weights=w, minlength=weight.size)
    return acc.reshape(height, width), weight.reshape(height, width)


def render(tiles: TileValues, downsample: float, x0: int, y0: int, width: int, height: int,
           sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(value, coverage) float32 (height, width) for a window of the grid: value in [0, 1] (0 where no tile),
    coverage = covered share of each pixel, clipped to 1. ``sigma`` is the Gaussian in this grid's pixels."""
    halo = smoothing_radius(sigma)
    acc, weight = paint(tiles, downsample, x0 - halo, y0 - halo, width + 2 * halo, height + 2 * halo)
    coverage = np.clip(weight[halo:halo + height, halo:halo + width], 0.0, 1.0)
    if halo:
        acc = ndimage.gaussian_filter(acc, sigma, mode="constant", truncate=_GAUSS_TRUNCATE)
        weight = ndimage.gaussian_filter(weight, sigma, mode="constant", truncate=_GAUSS_TRUNCATE)
        acc, weight = acc[halo:halo + height, halo:halo + width], weight[halo:halo + height, halo:halo + width]
    value = np.divide(acc, weight, out=np.zeros_like(acc), where=weight > 1e-12)
    value = np.where(coverage > 0, np.clip(value, 0.0, 1.0), 0.0)
    return value.astype(np.float32), coverage.astype(np.float32)


def colour_table(name: str) -> np.ndarray:
    """The matplotlib colormap ``name`` as a (256, 3) uint8 lookup table."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ConfigError(None, f"heatmap.colormap {name!r} is not a matplotlib colormap",
                          "use a perceptually uniform one: viridis, magma, inferno, plasma, cividis") from None
    return np.round(cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def to_rgba(value: np.ndarray, coverage: np.ndarray, table: np.ndarray) -> np.ndarray:
    """uint8 RGBA: colour from ``table`` by value, alpha from coverage (0 = no tile there)."""
    index = np.clip(np.round(value * 255), 0, 255).astype(np.intp)
    rgba = np.empty(value.shape + (4,), np.uint8)
    rgba[..., :3] = table[index]
    rgba[..., 3] = np.round(np.clip(coverage, 0.0, 1.0) * 255).astype(np.uint8)
    return rgba

