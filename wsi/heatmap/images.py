"""The PNG pictures of a slide's heatmap: the overlay on the thumbnail, and the top/bottom attended tiles.

The overlay is laid out pixel by pixel (no automatic layout that could stretch it): a title strip, the
thumbnail panel (the thumbnail scaled by a whole number, nearest neighbour, so its aspect ratio and pixel
grid are the thumbnail's), and a colour-bar strip. The panel's box is written into the PNG's ``Description``
text chunk as JSON (``{"panel": [x, y, width, height], "scale": s}``), so scripts can crop it.
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


def blend(thumbnail: np.ndarray, rgba: np.ndarray, alpha: float) -> np.ndarray:
    """The thumbnail with the heatmap colours laid over it at ``alpha`` x the heatmap's own coverage."""
    a = alpha * rgba[..., 3:4].astype(np.float32) / 255.0
    mixed = thumbnail.astype(np.float32) * (1.0 - a) + rgba[..., :3].astype(np.float32) * a
    return np.round(mixed).astype(np.uint8)


def panel_scale(width: int, height: int) -> int:
    """Whole-number zoom of the thumbnail in the overlay."""
    return max(1, min(math.ceil(_MIN_PANEL_PX / width), _MAX_PANEL_PX // height))


def save_overlay(path: Path, panel: np.ndarray, *, title: str, colormap: str, bar_label: str) -> None:
    """Write title + ``panel`` (already blended, RGB) zoomed by :func:`panel_scale` + colour bar to ``path``."""
    from matplotlib import colors, cm

    h, w = panel.shape[:2]
    s = panel_scale(w, h)
    zoomed = np.repeat(np.repeat(panel, s, axis=0), s, axis=1)
    width, height = w * s, _TITLE_PX + h * s + _BAR_PX
    fig = _figure(width, height)
    fig.figimage(zoomed, xo=0, yo=_BAR_PX, origin="upper")
    fig.text(0.5, 1.0 - _TITLE_PX / 2 / height, title, ha="center", va="center", fontsize=10, wrap=True)
    bar = fig.add_axes((0.08, 38 / height, 0.84, 12 / height))
    fig.colorbar(cm.ScalarMappable(colors.Normalize(0.0, 1.0), colormap), cax=bar, orientation="horizontal")
    bar.tick_params(labelsize=7, length=2, pad=1)
    bar.set_xlabel(bar_label, fontsize=8, labelpad=1)
    description = {"panel": [0, _TITLE_PX, w * s, h * s], "scale": s}
    fig.savefig(path, format="png", dpi=_DPI,
                metadata={"Title": title, "Description": json.dumps(description), "Software": "wsi heatmap"})


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
