"""``slide.backend: auto``: which reader gives a slide's metadata, and which one its pixels.

Metadata (vendor, MPP, levels) comes from the first reader of :data:`METADATA_ORDER` that opens the slide.
OpenSlide comes first because it knows the most vendor formats; tiffslide is the fallback for TIFF-like files
OpenSlide refuses, wsidicom for DICOM folders. Naming a backend (``slide.backend``) uses only that one, for
metadata and pixels.

When OpenSlide gave the metadata, pixels come from the fastest reader that sees OpenSlide's very pyramid
(:func:`fast_pixel_reader`): the direct JPEG path (:mod:`.backends.jpeg`) for a pyramid of JPEG tiles, else tiffslide
for a TIFF, else OpenSlide. A DICOM slide the direct path refuses (TILED_SPARSE, other transfer syntaxes,
fragmented frames, several focal planes or optical paths) is read through OpenSlide, unless OpenSlide cannot
read or misreads one of its levels: then through wsidicom (:func:`dicom_pixel_reader`). OpenSlide 4.0.1 does
both on wsidicomizer's output for an SVS with ``add_missing_levels``: the added levels are YCbCr JPEG frames
tagged RGB, which OpenSlide decodes as RGB (glass comes out pink-grey) or fails on ("Dimensional mismatch
reading JPEG"), while wsidicom decodes them as the JPEG data say. The chooser sits beside ``backends/``, not in
it, because judging a reader's levels needs the level check (:mod:`.levels`), which needs an open slide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backends.base import SlideReader
from .backends.jpeg import JpegTileReader
from .backends.openslide import OpenSlideReader
from .backends.tiffslide import TiffSlideReader
from .backends.wsidicom import WsidicomReader
from .dicom import DicomHeader
from .levels import COLOUR_TOLERANCE, level0_position

#: The readers ``slide.backend`` may name, each opened from the slide's entry file (a DICOM slide: one ``.dcm``).
READERS: dict[str, type[SlideReader]] = {r.name: r for r in (OpenSlideReader, TiffSlideReader, WsidicomReader)}
#: The readers ``auto`` tries for metadata, in order, for a file and for a DICOM folder (see the module docstring).
METADATA_ORDER = {"file": ("openslide", "tiffslide"), "dicom": ("openslide", "wsidicom")}


def open_reader(name: str, entry: Path) -> SlideReader:
    """Open ``entry`` with reader ``name`` and touch its metadata: tiffslide opens lazily, so a damaged file only
    fails here."""
    reader = READERS[name](entry)
    try:
        dict(reader.properties)
        if not reader.level_dimensions or min(reader.level_dimensions[0]) <= 0:
            raise ValueError("no image levels")
    except Exception:
        reader.close()
        raise
    return reader


def pixel_reader(entry: Path, opened: SlideReader, dicom_headers: list[DicomHeader] | None) -> SlideReader:
    """The reader of ``auto``'s pixels once ``opened`` gave the metadata: a faster one for OpenSlide's pyramid
    where there is one, else ``opened`` itself."""
    return fast_pixel_reader(entry, opened, dicom_headers) if isinstance(opened, OpenSlideReader) else opened


def fast_pixel_reader(path: Path, opened: OpenSlideReader,
                      dicom_headers: list[DicomHeader] | None = None) -> SlideReader:
    """The fastest reader that sees OpenSlide's very pyramid: JPEG tiles decoded directly, else tiffslide
    (for DICOM: wsidicom where OpenSlide fails on or misreads a level), else OpenSlide itself. ``path`` is the
    file OpenSlide opened; ``dicom_headers`` its folder's whole-slide files when it is a DICOM slide."""
    dims = tuple(map(tuple, opened.level_dimensions))
    downsamples = tuple(float(d) for d in opened.level_downsamples)
    if dicom_headers is not None:
        try:
            return JpegTileReader.from_dicom(path, dicom_headers, dims, downsamples)
        # not a pyramid of whole JPEG frames that OpenSlide's levels map onto, or header values of the wrong type
        except (ValueError, TypeError, AttributeError, KeyError, OSError):
            return dicom_pixel_reader(path.parent, opened, dims)
    if path.suffix.lower() not in (".svs", ".tif", ".tiff"):
        return opened
    try:
        return JpegTileReader.from_tiff(path, dims, downsamples)
    except (ValueError, OSError):
        pass
    try:
        fast = TiffSlideReader(path)
        if tuple(map(tuple, fast.level_dimensions)) == dims:
            return fast
        fast.close()
    except Exception:  # tiffslide cannot read this variant: OpenSlide it is
        pass
    return opened


def dicom_pixel_reader(folder: Path, opened: OpenSlideReader, dims: tuple) -> SlideReader:
    """OpenSlide, or wsidicom where OpenSlide cannot read or misreads a level of a DICOM slide.

    Both readers read a 64-px box at the centre of every level and the box's level-0 footprint (wsidicom
    first: after an error an OpenSlide handle reads nothing more). wsidicom takes the pixels when it reads
    them all and OpenSlide fails, or when only OpenSlide's boxes differ from their footprints in mean colour
    (by more than :data:`wsi.slide.levels.COLOUR_TOLERANCE`). Two readers that merely differ do not say which is
    wrong: wsidicom reads only the first fragment of a frame split into several, which OpenSlide
    reassembles. OpenSlide stays otherwise, and the level check (:mod:`wsi.slide.levels`) keeps the tiler off any
    level that still disagrees with level 0."""
    import openslide

    try:
        reader = WsidicomReader(folder)
    except Exception:  # wsidicom's own error types for folders it does not understand
        return opened

    def consistent(read) -> bool:
        for level, (w, h) in enumerate(dims):
            ds = reader.level_downsamples[level]
            bw, bh = min(w, 64), min(h, 64)
            x, y = level0_position((w - bw) // 2, ds), level0_position((h - bh) // 2, ds)
            box = read((x, y), level, (bw, bh)).reshape(-1, 3).mean(axis=0)
            footprint = read((x, y), 0, (round(bw * ds), round(bh * ds))).reshape(-1, 3).mean(axis=0)
            if np.abs(box - footprint).max() > COLOUR_TOLERANCE:
                return False
        return True

    try:
        if reader.level_dimensions != dims:
            raise ValueError("wsidicom sees other levels than OpenSlide")
        wsidicom_consistent = consistent(reader.read_region)
    except Exception:  # wsidicom cannot read this slide (its own error types, PIL's for JPEG data)
        reader.close()
        return opened
    try:
        openslide_consistent = consistent(opened.read_region)
    except openslide.OpenSlideError:
        return reader
    if wsidicom_consistent and not openslide_consistent:
        return reader
    reader.close()
    return opened
