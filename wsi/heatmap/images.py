"""The PNG pictures of a slide's heatmap: the overlay on the thumbnail, and the top/bottom attended tiles.

The overlay is assembled pixel by pixel (no automatic layout that could stretch it): a title strip, the
thumbnail panel (the thumbnail scaled by a whole number, nearest neighbour, so its aspect ratio and pixel
grid are the thumbnail's) and a colour-bar strip. Only the two strips are drawn by matplotlib; the panel,
often millions of pixels, never goes through its resampling. The panel's box is written into the PNG's
``Description`` text chunk as JSON (``{"panel": [x, y, width, height], "scale": s}``), so scripts can crop it.
Figures are built on ``matplotlib.figure.Figure`` directly: no pyplot, no global figure state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

_TITLE_PX = 40          # title strip above the panel
_BAR_PX = 64            # colour-bar strip below the panel (bar, ticks, label)
_MIN_PANEL_PX = 600     # small thumbnails are scaled up to about this width so the text fits
_MAX_PANEL_PX = 4000    # ... but never beyond this height
_DPI = 100
_CELL_PX = 160          # one tile in the top/bottom grid
_LABEL_PX = 30          # caption under each tile
_ROW_TITLE_PX = 22


def _figure(width_px: int, height_px: int):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)


def _pixels(fig) -> np.ndarray:
    """The figure drawn as RGB uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def blend(thumbnail: np.ndarray, rgba: np.ndarray, alpha: float, band: int = 256) -> np.ndarray:
    """The thumbnail with the heatmap colours laid over it at ``alpha`` x the heatmap's own coverage
    (integer arithmetic, ``band`` rows at a time to keep the temporaries small)."""
    out = np.empty(thumbnail.shape, np.uint8)
    for y in range(0, thumbnail.shape[0], band):
        rows = slice(y, y + band)
        a = np.rint(alpha * rgba[rows, :, 3:4]).astype(np.uint16)  # 0..255
        mixed = thumbnail[rows].astype(np.uint16) * (255 - a) + rgba[rows, :, :3].astype(np.uint16) * a
        out[rows] = (mixed + 127) // 255
    return out


def panel_scale(width: int, height: int) -> int:
    """Whole-number zoom of the thumbnail in the overlay."""
    return max(1, min(math.ceil(_MIN_PANEL_PX / width), _MAX_PANEL_PX // height))


def save_overlay(path: Path, panel: np.ndarray, *, title: str, colormap: str, bar_label: str) -> None:
    """Write title + ``panel`` (already blended, RGB) zoomed by :func:`panel_scale` + colour bar to ``path``."""
    from matplotlib import cm, colors
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    h, w = panel.shape[:2]
    s = panel_scale(w, h)
    width = w * s
    head = _figure(width, _TITLE_PX)
    head.text(0.5, 0.5, title, ha="center", va="center", fontsize=10)
    foot = _figure(width, _BAR_PX)
    bar = foot.add_axes((0.08, 38 / _BAR_PX, 0.84, 12 / _BAR_PX))
    foot.colorbar(cm.ScalarMappable(colors.Normalize(0.0, 1.0), colormap), cax=bar, orientation="horizontal")
    bar.tick_params(labelsize=7, length=2, pad=1)
    bar.set_xlabel(bar_label, fontsize=8, labelpad=1)
    zoomed = np.repeat(np.repeat(panel, s, axis=0), s, axis=1) if s > 1 else panel
    info = PngInfo()
    info.add_text("Title", title)
    info.add_text("Description", json.dumps({"panel": [0, _TITLE_PX, width, h * s], "scale": s}))
    info.add_text("Software", "wsi heatmap")
    image = np.concatenate([_pixels(head), zoomed, _pixels(foot)], axis=0)
    Image.fromarray(image).save(path, format="PNG", pnginfo=info)


def save_tile_grid(path: Path, rows: list[tuple[str, np.ndarray, list[str]]], *, title: str) -> None:
    """One row of tiles per ``(heading, tiles (n, T, T, 3), captions)``, under ``title``."""
    columns = max([len(tiles) for _, tiles, _ in rows] + [1])
    row_px = _ROW_TITLE_PX + _CELL_PX + _LABEL_PX
    width, height = columns * (_CELL_PX + 8) + 8, _TITLE_PX + len(rows) * row_px
    fig = _figure(width, height)
    fig.text(0.5, 1.0 - _TITLE_PX / 2 / height, title, ha="center", va="center", fontsize=10)
    for r, (heading, tiles, captions) in enumerate(rows):
        top = _TITLE_PX + r * row_px
        fig.text(8 / width, 1.0 - (top + _ROW_TITLE_PX / 2) / height, heading, ha="left", va="center",
                 fontsize=9, weight="bold")
        if len(tiles) == 0:
            fig.text(8 / width, 1.0 - (top + _ROW_TITLE_PX + _CELL_PX / 2) / height, "no tiles", fontsize=9)
        for c, (tile, caption) in enumerate(zip(tiles, captions)):
            left = 8 + c * (_CELL_PX + 8)
            bottom = height - (top + _ROW_TITLE_PX + _CELL_PX)
            ax = fig.add_axes((left / width, bottom / height, _CELL_PX / width, _CELL_PX / height))
            ax.imshow(tile, interpolation="antialiased")
            ax.set_axis_off()
            fig.text((left + _CELL_PX / 2) / width, (bottom - 3) / height, caption, ha="center", va="top",
                     fontsize=7)
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Title": title, "Software": "wsi heatmap"})
