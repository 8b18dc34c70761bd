"""The direct JPEG path: pixels of a pyramid of JPEG tiles decoded straight from the files.

Each tile's JPEG data is read with ``pread`` at its byte range and decoded by imagecodecs into the output. The
byte ranges come from the tile tags of an SVS/TIFF pyramid, or from the frames of a DICOM folder when that is
safe: every level OpenSlide reports is exactly one VOLUME instance of the series with those
TotalPixelMatrixColumns/Rows, TILED_FULL, JPEG Baseline (1.2.840.10008.1.2.4.50), 8-bit YBR_FULL_422, one
optical path and one focal plane (NumberOfFrames = tiles across x down), and each frame one fragment (the
Basic Offset Table, when filled in, must point at them).

The direct path is several times faster than OpenSlide's premultiplied-ARGB path (``bench/tiling.py`` measures
each) and gives identical pixels (tested for SVS and DICOM, at every level, across tile edges and in the padded
edge tiles) with one exception, OpenSlide's: where ``location / downsample`` is not a whole level pixel,
OpenSlide paints the level shifted by that fraction (interpolated), while the direct path and tiffslide start at
the level pixel ``int(location / downsample)``. The tiler's locations (:func:`wsi.slide.levels.level0_position`)
are whole level pixels at integer downsamples; at a fractional one (e.g. 15.95 for a level of 188 px from 3000)
they overshoot by less than one level-0 pixel, which OpenSlide turns into differences of 1-2 grey levels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dicom import DICOM_JPEG_BASELINE, DicomHeader, frame_ranges, image_type
from .base import SlideReader


@dataclass(frozen=True)
class JpegTileLevel:
    """One level of a pyramid of JPEG tiles: the file, each tile's byte range in it (row by row; a count of 0
    is a tile never written, left white), the tile grid, the shared JPEG tables (TIFF ``JPEGTables``) and the
    colour space of the JPEG data (``YCBCR`` or ``RGB``). Edge tiles are full tiles, cropped on reading."""

    path: Path
    offsets: np.ndarray
    counts: np.ndarray
    tile_w: int
    tile_h: int
    width: int
    height: int
    tables: bytes | None = None
    colorspace: str = "YCBCR"

    @property
    def across(self) -> int:
        return -(-self.width // self.tile_w)

    @property
    def down(self) -> int:
        return -(-self.height // self.tile_h)


class JpegTileReader(SlideReader):
    """Reads regions of a pyramid of JPEG tiles at known byte ranges by decoding the needed tiles straight into
    the output with imagecodecs: the decode floor plus one copy, with no per-call conversions. Thread-safe
    (``os.pread``, no shared file position). Locations follow tiffslide: level pixel = int(level-0 / downsample),
    with the downsamples OpenSlide reports (OpenSlide agrees where that division is whole; see the module
    docstring).

    The byte ranges come from TIFF tile tags (:meth:`from_tiff`) or from DICOM frames (:meth:`from_dicom`);
    both raise ValueError for a pyramid they cannot vouch for, and the caller keeps OpenSlide."""

    name = "jpeg-tiles"

    def __init__(self, levels: list[JpegTileLevel], level_downsamples: tuple[float, ...]):
        if len(levels) != len(level_downsamples):
            raise ValueError(f"{len(levels)} levels but {len(level_downsamples)} downsamples")
        self.levels = list(levels)
        self.level_downsamples = tuple(level_downsamples)
        self._fds: dict[Path, int] = {}
        try:
            for level in self.levels:
                if level.path not in self._fds:
                    self._fds[level.path] = os.open(level.path, os.O_RDONLY)
        except OSError:
            self.close()
            raise

    @classmethod
    def from_tiff(cls, path: Path, level_dimensions: tuple, level_downsamples: tuple) -> JpegTileReader:
        """The pages of a tiled, JPEG-compressed TIFF (SVS, generic) whose sizes are ``level_dimensions``;
        ValueError for anything else (other codecs, strips, planar data)."""
        import tifffile

        with tifffile.TiffFile(path) as tif:
            pages = {}
            for series in tif.series:
                for level in series.levels:
                    page = level.keyframe
                    pages.setdefault((page.imagewidth, page.imagelength), page)
            levels = []
            for dims in level_dimensions:
                page = pages.get(tuple(dims))
                if (page is None or page.compression != 7 or not page.is_tiled or page.samplesperpixel != 3
                        or page.planarconfig != 1 or page.photometric not in (2, 6) or page.bitspersample != 8):
                    raise ValueError(f"level {dims} is not a tiled 8-bit RGB/YCbCr JPEG page")
                levels.append(JpegTileLevel(
                    path=Path(path), offsets=np.asarray(page.dataoffsets, np.int64),
                    counts=np.asarray(page.databytecounts, np.int64), tile_w=page.tilewidth,
                    tile_h=page.tilelength, width=page.imagewidth, height=page.imagelength,
                    tables=page.jpegtables, colorspace="YCBCR" if page.photometric == 6 else "RGB"))
        return cls(levels, level_downsamples)

    @classmethod
    def from_dicom(cls, entry: Path, headers: list[DicomHeader], level_dimensions: tuple,
                   level_downsamples: tuple) -> JpegTileReader:
        """The DICOM WSI instances behind OpenSlide's levels, read frame by frame; ValueError unless it is safe.

        ``entry`` is the file OpenSlide opened, ``headers`` its folder's whole-slide files. Each level must be
        exactly one VOLUME instance of the entry's series with that TotalPixelMatrixColumns/Rows, organised
        TILED_FULL, in JPEG Baseline, 8-bit YBR_FULL_422, one optical path and one focal plane (NumberOfFrames
        = tiles across x down), each frame one fragment (see :func:`_dicom_frame_ranges`)."""
        series = next((h.dataset.SeriesInstanceUID for h in headers if h.path == entry), None)
        volumes = [h for h in headers
                   if h.dataset.SeriesInstanceUID == series and image_type(h.dataset)[2:3] == ["VOLUME"]]
        levels = []
        for dims in level_dimensions:
            matches = [h for h in volumes if (int(h.dataset.TotalPixelMatrixColumns),
                                              int(h.dataset.TotalPixelMatrixRows)) == tuple(dims)]
            if len(matches) != 1:
                raise ValueError(f"level {dims} is {len(matches)} VOLUME instances, not one")
            h = matches[0]
            d = h.dataset
            tile_w, tile_h = int(d.get("Columns", 0)), int(d.get("Rows", 0))
            width, height = dims
            checks = {
                "transfer syntax": (d.file_meta.get("TransferSyntaxUID"), DICOM_JPEG_BASELINE),
                "dimension organisation": (d.get("DimensionOrganizationType"), "TILED_FULL"),
                "photometric interpretation": (d.get("PhotometricInterpretation"), "YBR_FULL_422"),
                "samples per pixel": (d.get("SamplesPerPixel"), 3),
                "bits allocated": (d.get("BitsAllocated"), 8),
                "optical paths": (d.get("NumberOfOpticalPaths", 1), 1),
                "focal planes": (d.get("TotalPixelMatrixFocalPlanes", 1), 1),
                "frames": (int(d.get("NumberOfFrames", 0)),
                           -(-width // tile_w) * -(-height // tile_h) if tile_w and tile_h else -1),
            }
            for what, (found, wanted) in checks.items():
                if found != wanted:
                    raise ValueError(f"{h.path.name}: {what} {found!r}, not {wanted!r}")
            offsets, counts = frame_ranges(h.path, h.pixel_data_at, int(d.NumberOfFrames))
            levels.append(JpegTileLevel(path=h.path, offsets=offsets, counts=counts, tile_w=tile_w, tile_h=tile_h,
                                        width=width, height=height, tables=None, colorspace="YCBCR"))
        return cls(levels, level_downsamples)

    @property
    def level_dimensions(self) -> tuple:
        return tuple((level.width, level.height) for level in self.levels)

    def read_region(self, location, level: int, size) -> np.ndarray:
        import imagecodecs

        info = self.levels[level]
        fd = self._fds[info.path]
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image: white, as glass
        tw, th = info.tile_w, info.tile_h
        for ty in range(max(0, y0 // th), min(info.down, (y0 + h - 1) // th + 1)):
            for tx in range(max(0, x0 // tw), min(info.across, (x0 + w - 1) // tw + 1)):
                index = ty * info.across + tx
                count = int(info.counts[index])
                if count == 0:
                    continue
                blob = os.pread(fd, count, int(info.offsets[index]))
                tile = imagecodecs.jpeg_decode(blob, tables=info.tables, colorspace=info.colorspace,
                                               outcolorspace="RGB")
                # the tile's overlap with the requested box, in tile and in output coordinates
                ox, oy = tx * tw - x0, ty * th - y0
                sx, sy = max(0, -ox), max(0, -oy)
                ex = min(tw, w - ox, info.width - tx * tw)
                ey = min(th, h - oy, info.height - ty * th)
                if ex > sx and ey > sy:
                    out[oy + sy:oy + ey, ox + sx:ox + ex] = tile[sy:ey, sx:ex, :3]
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
