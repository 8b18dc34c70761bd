"""An open slide: its resolved MPP, its pyramid, and RGB regions read through its pixel reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SlideError
from .backends.base import SlideReader


@dataclass
class Slide:
    """An open slide (:func:`wsi.slide.open_slide`). ``reader`` gave the metadata and level geometry;
    ``pixels`` reads the regions (the same reader, or a faster one that sees the same pyramid);
    ``mpp_x``/``mpp_y`` are the resolved level-0 MPP."""

    path: Path
    slide_id: str
    reader: SlideReader
    pixels: SlideReader
    mpp_x: float
    mpp_y: float
    mpp_source: str
    vendor: str | None
    objective_power: float | None
    level_dimensions: tuple = field(default=())
    level_downsamples: tuple = field(default=())

    @property
    def backend(self) -> str:
        """The reader of the metadata (stores record it as ``slide.backend``)."""
        return self.reader.name

    @property
    def pixel_backend(self) -> str:
        """The reader of the pixels (``jpeg-tiles``, ``openslide``, ``tiffslide``, ``wsidicom``)."""
        return self.pixels.name

    @property
    def width(self) -> int:
        return int(self.level_dimensions[0][0])

    @property
    def height(self) -> int:
        return int(self.level_dimensions[0][1])

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        return self.mpp_x * float(self.level_downsamples[level])

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level``, top-left at level-0 ``(x, y)``; unscanned areas white."""
        try:
            return self.pixels.read_region((int(x), int(y)), level, (int(width), int(height)))
        except Exception as e:  # every backend raises its own types for damaged tiles
            raise SlideError(self.path, f"cannot read level {level} at ({x}, {y}) size {width}x{height}: "
                                        f"{type(e).__name__}: {e}", "the file may be truncated or corrupt") from e

    def close(self) -> None:
        if self.pixels is not self.reader:
            self.pixels.close()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
