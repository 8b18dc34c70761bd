"""Features of a finer, overlapping grid of tiles, for high-resolution heatmaps (``wsi extract --high-res``).

The stored tiles sit on the tiler's grid, and each tile's score paints its whole square, so maps are blocky
at the tile size. For selected slides this lays a grid of tiles of the same size and resolution (so the model
sees what it was trained on) with a stride of ``(1 - heatmap.high_res_overlap)`` tiles, e.g. half a tile at
0.5. The grid starts where the tiler's does, so it contains every stored position; it keeps the positions
that the tiler's own rule keeps (tissue share in the store's mask >= ``tiling.min_tissue_fraction``, via
:func:`wsi.tissue.tissue_fractions`). The tiles are read from the slide exactly as the tiler reads them
(:class:`wsi.slide.TileSource`) and embedded with the encoder of the slide's stored features; the grid and its
features go to the store (``fine/``, :mod:`wsi.store`). ``wsi predict`` then scores them as one bag, and
``wsi heatmap --high-res`` paints those scores, averaging the overlapping tiles, which is what smooths the map.

Needs the slide file the store was made from (same size in bytes and pixels), the slide's stored features of
the configured encoder (``wsi extract`` first) and their weights: ``extract.checkpoint``, else the local file or
hub folder recorded in the features' attrs, else timm's cache; other weights than the stored features' are an
error. The tiles are embedded here, in this process, on the device ``resources.heatmap.gpu`` gives (as
high-res heatmaps did before the stages met only in the store). Stain-normalised feature sets are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..config import StageConfig
from ..errors import ConfigError, SlideError, StoreError
from ..keys import feature_set_of
from ..layout import Layout
from ..runner import StageSummary, run_slides
from ..slide import Slide, TileGrid, TileSource, source_stat
from ..store import FeatureAttrs, SlideStore
from ..tissue import tissue_fractions
from .encoders import Encoder, load_encoder


@dataclass(frozen=True)
class FineGridConfig(StageConfig):
    """The sections ``wsi extract --high-res`` reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = "fine_grid"
    slide: dict
    extract: dict
    heatmap: dict
    resources: dict       # {"heatmap": ...}: whether heatmap jobs hold a GPU


@dataclass(frozen=True)
class FineGridParams:
    """What the fine grid and its embedding read from their sections."""

    encoder: str          # the feature set: extract.encoder (stain-normalised sets are refused)
    overlap: float        # heatmap.high_res_overlap
    checkpoint: str | None
    batch_size: int
    precision: str
    device: str           # "cuda" when resources.heatmap.gpu gives the job a GPU
    slide: dict           # the slide: section, to open the slide files

    @classmethod
    def from_sections(cls, sections: FineGridConfig) -> FineGridParams:
        extract = sections.extract
        if feature_set_of(extract) != extract["encoder"]:
            raise ConfigError(None, f"extract.stain {extract['stain']}: high-res grids do not normalise tiles yet",
                              "paint the heatmap from the stored scores (without --high-res)")
        return cls(encoder=extract["encoder"], overlap=float(sections.heatmap["high_res_overlap"]),
                   checkpoint=extract["checkpoint"], batch_size=int(extract["batch_size"]),
                   precision=extract["precision"], slide=dict(sections.slide),
                   device="cuda" if sections.resources["heatmap"]["gpu"] else "cpu")


def fine_grid(store: SlideStore, slide: Slide, overlap: float) -> np.ndarray:
    """Level-0 corners of the overlapping grid, on the read level's pixel grid, kept by the tissue rule."""
    t = store.tiling
    edge = round(t.tile_px_level0 / t.read_downsample)  # one tile in read-level pixels, as the tiler reads
    stride = max(1, round(edge * (1.0 - overlap)))
    level_w, level_h = slide.level_dimensions[t.read_level]
    grid = TileGrid(level=t.read_level, level_downsample=t.read_downsample, tile_level_px=edge,
                    stride_level_px=stride, cols=max(0, (level_w - edge) // stride + 1),
                    rows=max(0, (level_h - edge) // stride + 1))
    coords = grid.coords()
    tissue, _, downsample = store.mask()
    return coords[tissue_fractions(tissue, downsample, coords, t.tile_px_level0) >= t.min_tissue_fraction]


def _checkpoint(params: FineGridParams, stored: FeatureAttrs) -> str | None:
    """The encoder weights to load: the configured file, else where the slide's stored features came from."""
    if params.checkpoint:
        return params.checkpoint
    source = str(stored.weights_source or "")
    if source.startswith("local-dir:"):
        return source[len("local-dir:"):]
    return source if source and Path(source).exists() else None


def _embed_fine_grid(store: SlideStore, params: FineGridParams, encoders: dict[str | None, Encoder]) -> None:
    """The fine grid of ``store``'s slide and its features, into the store (see the module docstring)."""
    if not store.has_features(params.encoder):
        raise StoreError(store.path, f"no complete features of {params.encoder} to match",
                         f"run `wsi extract --encoder {params.encoder}` first")
    stored = store.feature_attrs(params.encoder)
    checkpoint = _checkpoint(params, stored)
    if checkpoint not in encoders:
        encoders[checkpoint] = load_encoder(params.encoder, checkpoint, device=params.device,
                                            precision=params.precision)
    encoder = encoders[checkpoint]
    if stored.weights_sha256 and encoder.weights_sha256 and encoder.weights_sha256 != stored.weights_sha256:
        raise ConfigError(encoder.weights_source, f"encoder weights {encoder.weights_sha256[:12]} are not those "
                                                  f"the slide's features were extracted with "
                                                  f"({stored.weights_sha256[:12]}), which its model run was "
                                                  "trained on", "set extract.checkpoint to those weights")
    source = Path(store.slide.source_path)
    size = source_stat(source)[0] if source.exists() else store.slide.source_size  # missing: opening says so
    if size != store.slide.source_size:
        raise SlideError(source, f"the file is {size} bytes, the store was tiled from "
                                 f"{store.slide.source_size}", "re-run `wsi tile` on it, then extract and predict")
    with TileSource.open(source, store.tiling, **params.slide) as tiles:
        slide = tiles.slide
        if (slide.width, slide.height) != (store.slide.width, store.slide.height):
            raise SlideError(source, f"level 0 is {slide.width} x {slide.height}, the store was tiled from "
                                     f"{store.slide.width} x {store.slide.height}", "re-run `wsi tile` on it")
        coords = fine_grid(store, slide, params.overlap)
        features = np.empty((len(coords), encoder.dim), np.float32)
        for lo, batch in tiles.iter_tiles(coords):
            features[lo:lo + len(batch)] = encoder.embed(batch, params.batch_size)
    store.write_fine_features(params.encoder, coords, params.overlap, features, encoder.attrs)


def extract_fine_grids(out_dir, sections: FineGridConfig, slide_ids: list[str]) -> StageSummary:
    """The fine grid and its features of each of ``slide_ids`` (stage ``extract``: a slide that fails gets a
    ``failures.csv`` row, the others go on). Raises ConfigError when no slide is named."""
    if not slide_ids:
        raise ConfigError(None, "--high-res needs the slides whose finer grid to extract", "name their slide ids")
    params = FineGridParams.from_sections(sections)
    layout = Layout(out_dir)
    encoders: dict[str | None, Encoder] = {}  # loaded once per weights file

    def work(slide_id: str) -> None:
        _embed_fine_grid(SlideStore.open(layout.store(slide_id)), params, encoders)

    return run_slides(out_dir, "extract", {slide_id: layout.store(slide_id) for slide_id in slide_ids}, work)
