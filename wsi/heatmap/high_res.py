"""High-resolution mode: re-score a finer, overlapping grid of tiles read from the slide.

The stored tiles sit on the tiler's grid, and each tile's score paints its whole square, so maps are blocky
at the tile size. For selected slides this mode lays a grid of tiles of the same size and resolution (so the
model sees what it was trained on) with a stride of ``(1 - heatmap.high_res_overlap)`` tiles, e.g. half a
tile at 0.5. The grid starts where the tiler's does, so it contains every stored position; it keeps the
positions that the tiler's own rule keeps (tissue share in the store's mask >= ``tiling.min_tissue_fraction``,
via :func:`wsi.tissue.tissue_fractions`). The tiles are read from the slide exactly as the tiler reads them
(:class:`wsi.slide.TileSource`), embedded with the run's encoder and scored as one bag by the run's fold
ensemble, or for a slide of the run's training cohort by the fold model that held it out; the painter then
averages the overlapping tiles, which is what smooths the map.

Nothing is written to the store: the cohort is neither retiled nor re-scored, and ``predictions.csv`` keeps
the slide's official prediction. The prediction shown on a high-res overlay is that of the fine bag.

Needs the slide file the store was made from (same size in bytes and pixels), ``OUT/models/<run>`` and the
encoder weights the run was trained on: ``extract.checkpoint``, else the local file or hub folder recorded in
the run's feature attrs, else timm's cache. When the run recorded the weights' sha256, other weights are an
error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, SlideError
from ..layout import Layout
from ..slide import TileGrid, TileSource, open_slide, source_stat
from ..store import SlideStore
from ..tissue import tissue_fractions
from . import HeatmapParams, SlideScores, out_of_fold_source


def _checkpoint(params: HeatmapParams, feature_attrs: dict) -> str | None:
    """The encoder weights to load: the configured file, else where the run's features came from."""
    if params.checkpoint:
        return params.checkpoint
    source = str(feature_attrs.get("weights_source") or "")
    if source.startswith("local-dir:"):
        return source[len("local-dir:"):]
    return source if source and Path(source).exists() else None


def load_models(model_dir: Path, params: HeatmapParams):
    """(fold ensemble, encoder) of the run in ``model_dir``, on the device the job's resources give it
    (``params.device``), not on whatever GPU happens to be visible."""
    from ..features import load_encoder
    from ..mil import load_ensemble

    device = params.device
    ensemble = load_ensemble(model_dir, device=device, precision=params.mil_precision)
    if ensemble.feature_attrs.get("stain"):
        raise ConfigError(model_dir, f"model run {ensemble.run} was trained on stain-normalised features "
                                     f"({ensemble.encoder}); high-res heatmaps do not normalise tiles yet",
                          "paint the heatmap from the stored scores (without --high-res)")
    encoder = load_encoder(ensemble.encoder, _checkpoint(params, ensemble.feature_attrs), device=device,
                           precision=params.encoder_precision)
    trained = ensemble.feature_attrs.get("weights_sha256")
    if trained and encoder.weights_sha256 and encoder.weights_sha256 != trained:
        raise ConfigError(encoder.weights_source, f"encoder weights {encoder.weights_sha256[:12]} are not those "
                                                  f"model run {ensemble.run} was trained on ({trained[:12]})",
                          "set extract.checkpoint to the weights the features were extracted with")
    return ensemble, encoder


def fine_grid(store: SlideStore, slide, overlap: float) -> np.ndarray:
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


def rescore(store: SlideStore, run: str, out_dir, params: HeatmapParams) -> SlideScores:
    """Scores of the fine grid of ``store``'s slide under model run ``run`` (see the module docstring)."""
    ensemble, encoder = load_models(Layout(out_dir).run_dir(run), params)
    source = Path(store.slide.source_path)
    size = source_stat(source)[0] if source.exists() else store.slide.source_size  # missing: open_slide says so
    if size != store.slide.source_size:
        raise SlideError(source, f"the file is {size} bytes, the store was tiled from "
                                 f"{store.slide.source_size}", "re-run `wsi tile` on it, then extract and predict")
    with open_slide(source, **params.slide) as slide:
        if (slide.width, slide.height) != (store.slide.width, store.slide.height):
            raise SlideError(source, f"level 0 is {slide.width} x {slide.height}, the store was tiled from "
                                     f"{store.slide.width} x {store.slide.height}", "re-run `wsi tile` on it")
        coords = fine_grid(store, slide, params.high_res_overlap)
        features = np.empty((len(coords), encoder.dim), np.float32)
        for lo, tiles in TileSource(slide, store.tiling).iter_tiles(coords):
            features[lo:lo + len(tiles)] = encoder.embed(tiles, params.batch_size)
    folds = ensemble.held_out_by.get(store.slide_id)
    if len(coords):
        attention, class_scores, probabilities = ensemble.score_bag(features, folds=folds)
    else:
        attention, class_scores = np.zeros(0, np.float32), np.zeros((0, len(ensemble.classes)), np.float32)
        probabilities = np.full(len(ensemble.classes), np.nan)
    classes = tuple(ensemble.classes)
    predicted = classes[int(np.argmax(probabilities))] if len(coords) else "none"
    return SlideScores(coords=coords, size=float(store.tiling.tile_px_level0), attention=attention,
                       class_scores=class_scores, classes=classes,
                       probabilities=tuple(float(p) for p in probabilities), predicted=predicted, store_tiles=False,
                       source="ensemble" if folds is None else out_of_fold_source(folds))
