"""Open a whole-slide image, resolve its microns per pixel, check its levels and cut tiles from it.

Every room that reads a slide file reads it through this package: the tiler, the extractor for
coordinates-only stores, stain fitting, heatmaps and the viewer. Its modules:

=====================  ===================================================================================
``paths``              which files are slides; slide ids; a slide's size and date (DICOM: its folder's)
``mpp``                MPP from the file, the override table or the default; implausible values refused
``dicom``              DICOM WSI constants, the check that every file is whole, where JPEG frames lie
``backends/``          one reader per backend behind :class:`~.backends.base.SlideReader`: ``openslide``,
                       ``tiffslide``, ``jpeg`` (the direct JPEG path), ``wsidicom``
``auto``               the chooser for ``slide.backend: auto``: which reader gives the metadata, which one
                       the pixels
``slide``              :class:`Slide`: an open slide, its readers and resolved MPP
``opener``             :func:`open_slide`
``levels``             the read level for a target MPP; the check of each level against level 0
``tiles``              the tile grid, and :class:`TileSource`: tiles cut at the store's target MPP
=====================  ===================================================================================

:meth:`Slide.read_region` returns RGB uint8 with transparent (unscanned) pixels painted white.
"""

from .levels import COLOUR_TOLERANCE, LevelCheck, ReadPlan, choose_level, compare_with_level0, level0_position, mark_qc
from .mpp import load_mpp_overrides
from .opener import BACKENDS, open_slide
from .paths import (
    DICOM_SUFFIX,
    SLIDE_SUFFIXES,
    dicom_files,
    expand_slide_paths,
    is_dicom_folder,
    slide_id_from_path,
    source_stat,
)
from .slide import Slide
from .tiles import TileGeometry, TileGrid, TileSource, tile_grid

__all__ = ["BACKENDS", "COLOUR_TOLERANCE", "DICOM_SUFFIX", "SLIDE_SUFFIXES", "LevelCheck", "ReadPlan", "Slide",
           "TileGeometry", "TileGrid", "TileSource", "choose_level", "compare_with_level0", "dicom_files",
           "expand_slide_paths", "is_dicom_folder", "level0_position", "load_mpp_overrides", "mark_qc",
           "open_slide", "slide_id_from_path", "source_stat", "tile_grid"]
