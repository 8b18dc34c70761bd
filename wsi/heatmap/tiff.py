"""The heatmap as a tiled, pyramidal TIFF that lines up with the slide in viewers that overlay images.

Choices, and why
----------------
* **Base resolution = ``heatmap.downsample``, not level 0.** The heatmap has no detail finer than a tile, so
  painting it at the slide's full resolution would only multiply its size (a 100,000 px slide would give a
  10-gigapixel overlay). The base level's pixel covers ``downsample`` level-0 pixels and its resolution tags
  say so: MPP = slide MPP x downsample (stored as pixels per centimetre, which openslide and tiffslide turn
  into ``mpp-x``/``mpp-y``). The base covers the slide's full extent from its top-left corner (the last
  pixel may overhang by less than one), so a viewer that scales layers by MPP puts every heatmap pixel over
  the level-0 pixels it stands for.
* **8-bit RGBA, colormapped.** Viewers overlay colour images as they are; a bare score channel would show as
  grey. Alpha is the share of the pixel covered by scored tiles (0 = no tile: glass and background stay see-
  through); opacity is left to the viewer. The colormap, normalisation and value range are written as JSON in
  the ImageDescription of the base page, so values can be read back from colours.
* **Successive pages, reduced ones marked NewSubfileType=1.** openslide's generic-tiff reader takes the
  tiled pages of the main chain as levels (it does not follow SubIFDs); tifffile, hence tiffslide, groups the
  reduced pages into the levels of the first series. Each level halves the previous one, down to one tile.
* **Streamed.** Every 256 x 256 tile of every level is rendered from the tiles that overlap it (plus the
  smoothing halo) and handed to tifffile through a generator, so memory holds one tile, whatever the slide's
  size. Each level is painted directly at its own downsample (smoothing scaled with it), not shrunk from the
  level above, which would need that level in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from .raster import TileValues, grid_shape, render, to_rgba

TIFF_TILE_PX = 256


def pyramid_shapes(width0: int, height0: int, downsample: float) -> list[tuple[int, int, float]]:
    """(height, width, downsample) of each level, base first, halving until one tile holds the level."""
    levels = []
    ds = float(downsample)
    while True:
        h, w = grid_shape(width0, height0, ds)
        levels.append((h, w, ds))
        if max(h, w) <= TIFF_TILE_PX:
            return levels
        ds *= 2.0


def _level_tiles(tiles: TileValues, height: int, width: int, downsample: float, sigma: float,
                 table: np.ndarray):
    for y in range(0, height, TIFF_TILE_PX):
        for x in range(0, width, TIFF_TILE_PX):
            value, coverage = render(tiles, downsample, x, y, TIFF_TILE_PX, TIFF_TILE_PX, sigma)
            yield to_rgba(value, coverage, table)


def write_pyramid(path: Path, tiles: TileValues, *, width0: int, height0: int, mpp: tuple[float, float],
                  downsample: float, sigma: float, table: np.ndarray, description: dict) -> list[tuple[int, int]]:
    """Write the pyramid to ``path`` (the caller renames it into place); returns the (width, height) of each
    level. ``sigma`` is the smoothing in base-level pixels."""
    levels = pyramid_shapes(width0, height0, downsample)
    base_bytes = levels[0][0] * levels[0][1] * 4
    with tifffile.TiffWriter(path, bigtiff=base_bytes * 4 // 3 > 2**31) as tif:
        for k, (h, w, ds) in enumerate(levels):
            scale = ds / downsample
            tif.write(
                _level_tiles(tiles, h, w, ds, sigma / scale, table),
                shape=(h, w, 4), dtype=np.uint8, tile=(TIFF_TILE_PX, TIFF_TILE_PX),
                photometric="rgb", extrasamples=["unassalpha"], compression="zlib",
                resolution=(1e4 / (mpp[0] * ds), 1e4 / (mpp[1] * ds)), resolutionunit="CENTIMETER",
                subfiletype=0 if k == 0 else 1, metadata=None,
                description=json.dumps(description) if k == 0 else None,
                software="wsi heatmap",
            )
    return [(w, h) for h, w, _ in levels]

