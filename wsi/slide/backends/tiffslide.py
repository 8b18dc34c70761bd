"""tiffslide (pure Python over tifffile): TIFF-like files OpenSlide refuses, and the fast reader of TIFF pyramids
whose tiles the direct JPEG path cannot decode. Opens lazily: a damaged file fails when its metadata is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import OpenSlideLike, over_white


class TiffSlideReader(OpenSlideLike):
    name = "tiffslide"

    def __init__(self, entry: Path):
        import tiffslide

        self._slide = tiffslide.TiffSlide(str(entry))

    def read_region(self, location, level: int, size) -> np.ndarray:
        rgb = np.asarray(self._slide.read_region(location, level, size, as_array=True))
        return over_white(rgb) if rgb.shape[2] == 4 else rgb
