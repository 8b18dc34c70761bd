"""wsidicom (imi-bigpicture's reader of the DICOM WSI standard, pure Python): DICOM folders only. ``auto`` reads
with it where OpenSlide cannot read or misreads a level of a DICOM slide (:mod:`wsi.slide.auto`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import SlideReader


class WsidicomReader(SlideReader):
    """A DICOM WSI folder read by wsidicom: metadata (``level_dimensions``, ``level_downsamples``,
    ``properties`` with ``wsidicom.mpp-x/-y`` and ``wsidicom.vendor``) and RGB regions by level-0 location,
    white past the level's edges, as :class:`JpegTileReader` reads them (level pixel = int(level-0 /
    downsample), with OpenSlide's downsamples: level 0's size over the level's, averaged over x and y).
    Thread-safe (wsidicom locks its file reads). Its first optical path and focal plane are read. Handed one
    ``.dcm`` file, it reads the file's folder."""

    name = "wsidicom"

    def __init__(self, entry: Path):
        from wsidicom import WsiDicom
        from wsidicom.errors import WsiDicomNoResolutionError

        self._wsi = WsiDicom.open(entry.parent if entry.is_file() else entry)
        try:
            levels = list(self._wsi.levels.levels)
            (w0, h0) = base = (levels[0].size.width, levels[0].size.height)
            self.level_dimensions = (base,) + tuple((lv.size.width, lv.size.height) for lv in levels[1:])
            self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)
            self._pyramid_index = [lv.level for lv in levels]  # wsidicom's own level numbers (log2 of the scale)
            self.properties = {"wsidicom.vendor": "dicom"}
            try:
                mpp = self._wsi.mpp
                self.properties.update({"wsidicom.mpp-x": str(mpp.width), "wsidicom.mpp-y": str(mpp.height)})
            except WsiDicomNoResolutionError:
                pass
        except Exception:
            self._wsi.close()
            raise

    def read_region(self, location, level: int, size) -> np.ndarray:
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] / ds), int(location[1] / ds)
        w, h = size
        out = np.full((h, w, 3), 255, np.uint8)  # outside the image: white, as glass
        lw, lh = self.level_dimensions[level]
        cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(lw, x0 + w), min(lh, y0 + h)
        if cx1 > cx0 and cy1 > cy0:  # wsidicom refuses regions past the level's edges
            image = self._wsi.read_region((cx0, cy0), self._pyramid_index[level], (cx1 - cx0, cy1 - cy0))
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = np.asarray(image.convert("RGB"))
        return out

    def close(self) -> None:
        self._wsi.close()
