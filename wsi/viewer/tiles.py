"""Deep-zoom tiles of the original slide, read on demand, decoded in a thread pool and kept in a bounded cache.

The deep-zoom pyramid is OpenSeadragon's: level ``z`` of ``max_level + 1`` shows the slide at ``2 ** (z -
max_level)`` of level 0, cut into ``TILE_PX`` tiles (edge tiles are cut short, none overlap). A tile is read
through the backend the store was tiled with, from the coarsest pyramid level that is not coarser than it
(:func:`wsi.slide.choose_level`, among the levels the tiler's level check accepted for this slide, ``attrs
levels`` of the store), and box-averaged down to size.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from ..errors import SlideError, WsiError
from ..slide import Slide, choose_level, open_slide
from ..store import SlideStore

TILE_PX = 256
JPEG_QUALITY = 85


class TileOutOfRange(LookupError):
    """The deep-zoom address lies outside the slide's pyramid."""


@dataclass(frozen=True)
class DeepZoom:
    """The deep-zoom pyramid of a ``width`` x ``height`` level 0."""

    width: int
    height: int

    @property
    def max_level(self) -> int:
        return max(0, math.ceil(math.log2(max(self.width, self.height))))

    def downsample(self, level: int) -> int:
        return 2 ** (self.max_level - level)

    def region(self, level: int, col: int, row: int) -> tuple[int, int, int, int, int, int]:
        """(x, y, width, height) at level 0 and (width, height) of the tile's image; TileOutOfRange outside."""
        if not 0 <= level <= self.max_level or col < 0 or row < 0:
            raise TileOutOfRange(f"level {level} tile {col},{row}")
        ds = self.downsample(level)
        x, y = col * TILE_PX * ds, row * TILE_PX * ds
        if x >= self.width or y >= self.height:
            raise TileOutOfRange(f"level {level} tile {col},{row}")
        w, h = min(TILE_PX * ds, self.width - x), min(TILE_PX * ds, self.height - y)
        return x, y, w, h, max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds))


class SlideTiles:
    """One slide's tiles as JPEG bytes. The slide opens at the first request; a slide that cannot be opened
    keeps its error (``error``) and serves none."""

    def __init__(self, store: SlideStore):
        self.store = store
        self.zoom = DeepZoom(store.slide.width, store.slide.height)
        rejected = set(store.levels.rejected) if store.levels else set()
        self._usable = [lv for lv in range(store.slide.level_count) if lv not in rejected]
        self._slide: Slide | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def slide(self) -> Slide:
        with self._lock:
            if self._slide is None and self.error is None:
                try:
                    # the backend and MPP the tiles were cut with; ``auto`` for OpenSlide, which it tries first
                    # and pairs with the direct JPEG-tile reader (same pixels, several times faster)
                    backend = "auto" if self.store.slide.backend == "openslide" else self.store.slide.backend
                    self._slide = open_slide(self.store.slide.source_path, backend=backend,
                                             mpp_overrides={self.store.slide_id: self.store.slide.mpp_x})
                    if (self._slide.width, self._slide.height) != (self.store.slide.width, self.store.slide.height):
                        self._slide.close()
                        self._slide = None
                        raise SlideError(self.store.slide.source_path, "the file's size differs from the one "
                                         "the store was tiled from", "re-run `wsi tile` for this slide")
                except WsiError as e:
                    self.error = str(e)
            if self.error is not None:
                raise WsiError(None, self.error)
            return self._slide

    def render(self, level: int, col: int, row: int) -> bytes:
        x, y, w, h, out_w, out_h = self.zoom.region(level, col, row)
        slide = self.slide()
        ds = self.zoom.downsample(level)
        plan = choose_level(slide, slide.mpp_x * ds, levels=self._usable)
        level_ds = slide.level_downsamples[plan.level]
        pixels = slide.read_region(x, y, plan.level, max(1, math.ceil(w / level_ds)), max(1, math.ceil(h / level_ds)))
        image = Image.fromarray(pixels)
        if image.size != (out_w, out_h):
            image = image.resize((out_w, out_h), Image.Resampling.BOX)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def close(self) -> None:
        with self._lock:
            if self._slide is not None:
                self._slide.close()
                self._slide = None


class TileCache:
    """JPEG tiles by (slide id, level, col, row): at most ``max_bytes``, least recently used out first. Requests
    for a tile being decoded wait for that decode rather than starting another; decoding runs in a pool of
    ``workers`` threads, so a burst of requests never decodes more tiles at once than there are workers."""

    def __init__(self, max_bytes: int, workers: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        self._pending: dict[tuple, Future] = {}
        self._lock = threading.RLock()  # a decode that is already done runs its callback inside get()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tile-decode")

    def get(self, tiles: SlideTiles, level: int, col: int, row: int) -> bytes:
        key = (tiles.store.slide_id, level, col, row)
        with self._lock:
            if key in self._tiles:
                self._tiles.move_to_end(key)
                return self._tiles[key]
            future = self._pending.get(key)
            if future is None:
                future = self._pending[key] = self._pool.submit(tiles.render, level, col, row)
                future.add_done_callback(lambda f: self._store(key, f))
        return future.result()

    def _store(self, key: tuple, future: Future) -> None:
        with self._lock:
            self._pending.pop(key, None)
            if future.exception() is not None:
                return
            data = future.result()
            self._tiles[key] = data
            self.bytes += len(data)
            while self.bytes > self.max_bytes and self._tiles:
                _, old = self._tiles.popitem(last=False)
                self.bytes -= len(old)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
