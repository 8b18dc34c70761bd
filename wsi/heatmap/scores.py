"""The scores a heatmap paints, read from the store: the stored tiles' (:func:`stored_scores`), or in
high-resolution mode those of a finer, overlapping grid of tiles (:func:`fine_scores`).

The stored tiles sit on the tiler's grid, and each tile's score paints its whole square, so maps are blocky
at the tile size. ``wsi extract --high-res`` lays a finer grid of tiles of the same size over selected slides
and stores its features (:mod:`wsi.features.fine_grid`); ``wsi predict`` scores them as one bag by the run's
fold ensemble, or for a slide of the run's training cohort by the fold models that held it out, into
``scores/<run>/fine_*``. The painter averages the overlapping tiles, which is what smooths the map.

``predictions.csv`` keeps the slide's official prediction; the prediction shown on a high-res overlay is that
of the fine bag.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, StoreError, WsiError
from ..store import SlideStore


@dataclass(frozen=True)
class SlideScores:
    """Per-tile scores of one slide under one model run, and the slide's prediction.

    ``store_tiles`` is true when row ``i`` is tile ``i`` of the store (so its pixels can come from there)."""

    coords: np.ndarray          # int64 (N, 2) level-0 top-left corners
    size: float                 # tile footprint at level 0
    attention: np.ndarray       # float32 (N,)
    class_scores: np.ndarray    # float32 (N, C)
    classes: tuple
    probabilities: tuple
    predicted: str
    store_tiles: bool
    source: str = "ensemble"    # or "out-of-fold (folds ...)": scored by the fold models that held it out
    ood_score: float | None = None  # predict's out-of-distribution score (above 1: unlike the training slides)

    def class_index(self, name: str | None, run: str) -> int:
        """Index of the tumour class: ``name``, or the last class when ``name`` is None."""
        if name is None:
            return len(self.classes) - 1
        if name not in self.classes:
            raise ConfigError(None, f"heatmap.tumour_class {name!r} is not a class of model run {run} "
                                    f"(classes: {', '.join(map(str, self.classes))})")
        return self.classes.index(name)

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.coords, self.attention, self.class_scores):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps([self.size, list(self.classes), self.predicted, self.source]).encode())
        return h.hexdigest()


def stored_scores(store: SlideStore, run: str) -> SlideScores:
    """The store's ``scores/<run>`` with its tile geometry: the out-of-fold scores of a slide of the run's
    training cohort, else the ensemble's; damaged or non-finite scores are a StoreError."""
    try:
        attrs = store.scores(run)[2]
        out_of_fold = attrs.oof_folds is not None
        attention, class_scores, _ = store.scores(run, out_of_fold=out_of_fold)
    except WsiError:
        raise
    except Exception as e:  # zarr/numcodecs raise their own types for damaged chunks
        raise StoreError(store.path, f"scores/{run} cannot be read ({type(e).__name__}: {e})",
                         f"re-run `wsi predict` for {store.slide_id}") from e
    if not (np.isfinite(attention).all() and np.isfinite(class_scores).all()):
        raise StoreError(store.path, f"scores/{run} hold non-finite values", "re-run `wsi predict`")
    if class_scores.shape[1] != len(attrs.classes):
        raise StoreError(store.path, f"scores/{run} have {class_scores.shape[1]} class columns for "
                                     f"{len(attrs.classes)} classes", "re-run `wsi predict`")
    return SlideScores(coords=store.coords, size=float(store.tiling.tile_px_level0), attention=attention,
                       class_scores=class_scores, classes=tuple(attrs.classes),
                       probabilities=tuple(attrs.oof_probabilities if out_of_fold else attrs.probabilities),
                       predicted=attrs.oof_predicted if out_of_fold else attrs.predicted, store_tiles=True,
                       source=out_of_fold_source(attrs.oof_folds) if out_of_fold else "ensemble",
                       ood_score=attrs.ood_score)


def out_of_fold_source(folds) -> str:
    """How a heatmap card names scores of the fold models that held the slide out."""
    return f"out-of-fold (fold {folds[0]})" if len(folds) == 1 else f"out-of-fold (folds {', '.join(map(str, folds))})"




def fine_scores(store: SlideStore, run: str) -> SlideScores:
    """The fine grid's scores of ``run`` in ``store`` (``scores/<run>/fine_*``, ``fine/coords``); a StoreError
    naming the commands when the slide has none."""
    attention, class_scores, attrs = store.scores(run, fine=True)
    if attrs.fine_predicted is None:
        raise StoreError(store.path, f"fine-grid scores of model run {run} lack their prediction",
                         "re-run `wsi predict` with the run")
    probabilities = attrs.fine_probabilities or (float("nan"),) * len(attrs.classes)  # an empty grid: no call
    return SlideScores(coords=store.fine_coords(), size=float(store.tiling.tile_px_level0), attention=attention,
                       class_scores=class_scores, classes=tuple(attrs.classes),
                       probabilities=tuple(float(p) for p in probabilities), predicted=attrs.fine_predicted,
                       store_tiles=False,
                       source="ensemble" if attrs.fine_folds is None else out_of_fold_source(attrs.fine_folds))
