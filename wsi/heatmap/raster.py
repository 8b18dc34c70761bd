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

    Only tiles overlapping the window are touched, in batches of bounded size taken in row order, each
    accumulated over its own band of rows: memory follows the window and the batch, not the slide.
    """
    acc = np.zeros((height, width), np.float32)
    weight = np.zeros((height, width), np.float32)
    xs, ys = tiles.coords[:, 0].astype(np.float64), tiles.coords[:, 1].astype(np.float64)
    hit = ((xs < (x0 + width) * downsample) & (xs + tiles.size > x0 * downsample)
           & (ys < (y0 + height) * downsample) & (ys + tiles.size > y0 * downsample))
    index = np.flatnonzero(hit)
    index = index[np.argsort(ys[index], kind="stable")]
    span = math.ceil(tiles.size / downsample) + 1
    batch = max(1, _PAINT_BATCH // (span * span))
    values = np.asarray(tiles.values, np.float64)
    for lo in range(0, len(index), batch):
        part = index[lo:lo + batch]
        cols, wx = _axis_weights(xs[part], tiles.size, downsample, x0, width, span)
        rows, wy = _axis_weights(ys[part], tiles.size, downsample, y0, height, span)
        top, bottom = int(rows.min()), int(rows.max()) + 1
        w = (wy[:, :, None] * wx[:, None, :]).ravel()
        flat = ((rows - top)[:, :, None] * width + cols[:, None, :]).ravel()
        band = (bottom - top) * width
        acc[top:bottom] += np.bincount(flat, weights=w * np.repeat(values[part], span * span),
                                       minlength=band).reshape(bottom - top, width)
        weight[top:bottom] += np.bincount(flat, weights=w, minlength=band).reshape(bottom - top, width)
    return acc, weight


def render(tiles: TileValues, downsample: float, x0: int, y0: int, width: int, height: int,
           sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(value, coverage) float32 (height, width) for a window of the grid: value in [0, 1] (0 where no tile),
    coverage = covered share of each pixel, clipped to 1. ``sigma`` is the Gaussian in this grid's pixels."""
    halo = smoothing_radius(sigma)
    acc, weight = paint(tiles, downsample, x0 - halo, y0 - halo, width + 2 * halo, height + 2 * halo)
    inner = (slice(halo, halo + height), slice(halo, halo + width))
    coverage = np.minimum(weight[inner], 1.0)
    if not coverage.any():  # no tile here: skip the filtering (most windows of a sparse slide)
        return np.zeros((height, width), np.float32), coverage
    if halo:
        acc = ndimage.gaussian_filter(acc, sigma, mode="constant", truncate=_GAUSS_TRUNCATE)[inner]
        weight = ndimage.gaussian_filter(weight, sigma, mode="constant", truncate=_GAUSS_TRUNCATE)[inner]
    else:
        acc, weight = acc[inner], weight[inner]
    value = np.divide(acc, weight, out=np.zeros_like(acc), where=weight > 1e-6)
    value = np.where(coverage > 0, np.clip(value, 0.0, 1.0), 0.0)
    return value.astype(np.float32), coverage


def render_rgba(tiles: TileValues, downsample: float, width: int, height: int, table: np.ndarray,
                sigma: float = 0.0, band: int = 256) -> np.ndarray:
    """:func:`to_rgba` of :func:`render` over a whole grid, ``band`` rows at a time: the same pixels, with
    float temporaries of one band only."""
    rgba = np.empty((height, width, 4), np.uint8)
    for y in range(0, height, band):
        rows = min(band, height - y)
        rgba[y:y + rows] = to_rgba(*render(tiles, downsample, 0, y, width, rows, sigma), table)
    return rgba


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
    rgba = np.empty(value.shape + (4,), np.uint8)
    rgba[..., :3] = table[np.rint(np.clip(value, 0.0, 1.0) * 255).astype(np.uint8)]
    rgba[..., 3] = np.rint(np.clip(coverage, 0.0, 1.0) * 255).astype(np.uint8)
    return rgba
