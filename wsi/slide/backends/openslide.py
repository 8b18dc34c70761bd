"""OpenSlide 4: SVS, NDPI, MRXS, SCN, BIF, generic and OME TIFF, DICOM (handed one ``.dcm`` file of the folder,
it gathers the rest of the series itself). Knows the most vendor formats, so ``auto`` tries it first."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import OpenSlideLike, over_white


class OpenSlideReader(OpenSlideLike):
    name = "openslide"

    def __init__(self, entry: Path):
        import openslide

        self._slide = openslide.OpenSlide(str(entry))

    def read_region(self, location, level: int, size) -> np.ndarray:
        return over_white(np.asarray(self._slide.read_region(location, level, size)))
