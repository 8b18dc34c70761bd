"""The small base class every backend's reader fills in.

A reader knows a slide's pyramid (level sizes and downsamples, as OpenSlide reports them), its properties
(metadata keys prefixed with the reader's name, e.g. ``openslide.mpp-x``) and reads RGB regions by level-0
location. Which reader reads a slide is chosen in :mod:`wsi.slide.auto`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

import numpy as np


class SlideReader(ABC):
    """One backend's view of one slide. Subclasses give ``level_dimensions`` and ``level_downsamples`` (attributes
    or properties) and, when they read metadata too, ``properties``."""

    name: ClassVar[str]  # the reader's name, as stores record it (``slide.backend``, ``levels.pixel_backend``)
    properties: Mapping[str, str] = MappingProxyType({})  # readers of pixels only have no metadata
    level_dimensions: tuple
    level_downsamples: tuple

    @abstractmethod
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (height, width, 3) of ``level``, top-left at level-0 ``location``; white where nothing was
        scanned (past the edges, transparent pixels)."""

    @abstractmethod
    def close(self) -> None:
        """Release the files."""


class OpenSlideLike(SlideReader):
    """A reader over a library object with OpenSlide's API (``properties``, ``level_dimensions``,
    ``level_downsamples``, ``close``: OpenSlide itself and tiffslide, which copies it); subclasses open it as
    ``self._slide`` and read its regions."""

    _slide: object

    @property
    def properties(self):
        return self._slide.properties

    @property
    def level_dimensions(self) -> tuple:
        return self._slide.level_dimensions

    @property
    def level_downsamples(self) -> tuple:
        return self._slide.level_downsamples

    def close(self) -> None:
        self._slide.close()


def over_white(rgba: np.ndarray) -> np.ndarray:
    """Composite RGBA (non-premultiplied, as OpenSlide and tiffslide return it) over white, the colour of glass."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
