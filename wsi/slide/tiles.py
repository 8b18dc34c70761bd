"""Tiles at a target MPP, cut from a slide: the grid, and :class:`TileSource`, which reads tiles exactly as the
tiler stores them.

Geometry (recorded in the store's ``tiling`` attrs, :class:`wsi.store.TilingAttrs`)
--------------------------------------------------------------------------------------
The read level is the coarsest one not coarser than the target (:func:`wsi.slide.levels.choose_level`) that
agrees with level 0 (:class:`wsi.slide.levels.LevelCheck`; a level that disagrees gives way to the next finer
one). One tile is ``s = round(tile_px * target_mpp / level_mpp)`` level pixels, area-averaged down to
``tile_px`` when ``s`` differs; so ``effective_mpp = level_mpp * s / tile_px``. Tiles step by
``s - round(overlap_px * s / tile_px)`` level pixels; level-0 coordinates are those level positions times the
level's downsample, rounded.

Speed
-----
Tiles that touch in a row are read with one backend call per run of up to ``_MAX_RUN_PX`` level pixels and
cut in memory, in a thread pool (OpenSlide and the JPEG decoders release the GIL). A tile's pixels depend
only on its own level box, so :meth:`TileSource.read_tiles` gives the same pixels whatever batch a tile is
read in: the tiler, the extractor (coordinates-only stores), stain fitting and heatmaps all read through it
and get the same tiles.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from ..errors import SlideError
from .levels import LevelCheck, level0_position
from .opener import open_slide
from .slide import Slide

_MAX_RUN_PX = 8192          # longest row run read in one backend call (level pixels)


# --------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class TileGrid:
    """Every tile position of a slide at the read level, before tissue filtering."""

    level: int
    level_downsample: float
    tile_level_px: int     # s: one tile's edge in read-level pixels
    stride_level_px: int   # step between neighbouring tiles in read-level pixels
    cols: int
    rows: int

    def coords(self) -> np.ndarray:
        """Level-0 (x, y) of every grid tile, row-major (the store's tile order)."""
        ys, xs = np.meshgrid(np.arange(self.rows), np.arange(self.cols), indexing="ij")
        lx, ly = xs.ravel() * self.stride_level_px, ys.ravel() * self.stride_level_px
        return np.stack([np.round(lx * self.level_downsample), np.round(ly * self.level_downsample)],
                        axis=1).astype(np.int64)


def tile_grid(slide: Slide, *, target_mpp: float, tile_px: int, overlap_px: int = 0,
              level_tolerance: float = 0.05, levels: LevelCheck | None = None) -> TileGrid:
    """The tile grid on the level :class:`~wsi.slide.levels.LevelCheck` allows (``levels``; a fresh check when None)."""
    if overlap_px >= tile_px:
        raise SlideError(slide.path, f"overlap_px {overlap_px} must be smaller than tile_px {tile_px}")
    levels = levels if levels is not None else LevelCheck(slide)
    plan = levels.plan(target_mpp, level_tolerance, "tiles")
    s = tile_px if plan.scale == 1.0 else int(round(tile_px * plan.scale))
    stride = s - int(round(overlap_px * s / tile_px))
    level_w, level_h = slide.level_dimensions[plan.level]
    cols = (level_w - s) // stride + 1 if level_w >= s else 0
    rows = (level_h - s) // stride + 1 if level_h >= s else 0
    return TileGrid(level=plan.level, level_downsample=float(slide.level_downsamples[plan.level]),
                    tile_level_px=s, stride_level_px=stride, cols=int(cols), rows=int(rows))


# --------------------------------------------------------------------------------------------- pixels
class TileGeometry(Protocol):
    """Where and how big the tiles are; a store's :class:`wsi.store.TilingAttrs` is one."""

    read_level: int
    read_downsample: float
    tile_px: int           # the tile's edge at the target MPP
    tile_px_level0: float  # its footprint at level 0


def _row_runs(level_xy: np.ndarray, s: int) -> list[tuple[int, int]]:
    """Split tile indices into runs read with one call: same row, near neighbours, bounded width."""
    runs, start = [], 0
    for i in range(1, len(level_xy) + 1):
        if (i == len(level_xy) or level_xy[i, 1] != level_xy[start, 1]
                or not 0 <= level_xy[i, 0] - level_xy[i - 1, 0] <= 2 * s
                or level_xy[i, 0] + s - level_xy[start, 0] > _MAX_RUN_PX):
            runs.append((start, i))
            start = i
    return runs


class TileSource:
    """The tiles of an open slide at level-0 corners, cut as :class:`TileGeometry` says: uint8 (n, tile_px,
    tile_px, 3), the very pixels the tiler stores."""

    def __init__(self, slide: Slide, geometry: TileGeometry):
        self.slide, self.geometry = slide, geometry

    @classmethod
    @contextmanager
    def open(cls, path, geometry: TileGeometry, **slide_config) -> Iterator[TileSource]:
        """The tiles of the slide at ``path``, opened with the ``slide:`` config section and closed after."""
        with open_slide(path, **slide_config) as slide:
            yield cls(slide, geometry)

    def _level_box(self, coords: np.ndarray) -> tuple[np.ndarray, int]:
        """Read-level top-left of each tile and the tile's edge in read-level pixels."""
        g = self.geometry
        s = int(round(g.tile_px_level0 / g.read_downsample))
        return np.round(coords / g.read_downsample).astype(np.int64), s

    def _read_run(self, level_xy: np.ndarray, s: int) -> np.ndarray:
        """One backend call for a run of tiles in a row, then each tile cut (and area-averaged) from it.

        With an integer factor the whole run is reduced at once (tiles start at multiples of the factor, so this
        is exactly the per-tile result); otherwise each tile's box is resampled on its own, so a tile's pixels
        never depend on its neighbours."""
        g = self.geometry
        x0, y0 = int(level_xy[0, 0]), int(level_xy[0, 1])
        width = int(level_xy[-1, 0]) + s - x0
        ds = g.read_downsample
        region = self.slide.read_region(level0_position(x0, ds), level0_position(y0, ds), g.read_level, width, s)
        t = g.tile_px
        offsets = level_xy[:, 0] - x0
        factor = s // t
        if s % t == 0 and (offsets % factor == 0).all():
            if factor > 1:  # OpenCV's area resize equals PIL's box reduce bit for bit here, ~8x faster
                region = cv2.resize(region, (region.shape[1] // factor, t), interpolation=cv2.INTER_AREA)
            return np.stack([region[:, o:o + t] for o in offsets // factor])
        tiles = np.empty((len(level_xy), t, t, 3), np.uint8)
        for i, o in enumerate(offsets):
            tiles[i] = np.asarray(Image.fromarray(region[:, o:o + s]).resize((t, t), Image.Resampling.BOX))
        return tiles

    def iter_tiles(self, coords: np.ndarray, *, threads: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first tile index, uint8 tiles) in order, reading row runs in a bounded thread pool."""
        level_xy, s = self._level_box(np.asarray(coords, np.int64).reshape(-1, 2))
        runs = _row_runs(level_xy, s)
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(threads) as pool:
            pending: deque = deque()
            for lo, hi in runs:
                pending.append((lo, pool.submit(self._read_run, level_xy[lo:hi], s)))
                if len(pending) >= 2 * threads:  # bound memory: a few runs in flight
                    lo_done, fut = pending.popleft()
                    yield lo_done, fut.result()
            while pending:
                lo_done, fut = pending.popleft()
                yield lo_done, fut.result()

    def read_tiles(self, coords: np.ndarray, *, threads: int | None = None) -> np.ndarray:
        """Tiles at ``coords`` (level-0) exactly as the tiler stores them: uint8 (n, tile_px, tile_px, 3)."""
        t = self.geometry.tile_px
        out = np.empty((len(coords), t, t, 3), np.uint8)
        for lo, tiles in self.iter_tiles(coords, threads=threads):
            out[lo:lo + len(tiles)] = tiles
        return out
