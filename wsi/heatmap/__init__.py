"""Tumour heatmaps: per-tile scores of a model run, painted where the tiles are, for pathologists' viewers.

For each slide with complete ``scores/<run>`` in its store, ``heatmap`` writes to
``OUT/heatmaps/<run>/<slide_id>/``:

================  ==========================================================================================
file              what
================  ==========================================================================================
``overlay.png``   the store's thumbnail with the heatmap blended in (``heatmap.alpha``), a colour bar and the
                  slide's prediction in the title (layout: :mod:`wsi.heatmap.images`)
``heatmap.png``   the heatmap alone, RGBA on the thumbnail's pixel grid (same size as the thumbnail;
                  transparent where there is no tile)
``tiles.geojson`` one ``tile`` per tile with its measurements, classified where the tumour probability
                  reaches ``heatmap.threshold``, plus the tumour region outline (:mod:`wsi.heatmap.geojson`);
                  QuPath: File > Import objects
``heatmap.tif``   tiled pyramidal RGBA TIFF over the slide's full extent, MPP = slide MPP x
                  ``heatmap.downsample`` (:mod:`wsi.heatmap.tiff` says why)
``top_tiles.png`` the ``heatmap.top_k`` most and least attended tiles
``heatmap.json``  written last: parameters, a digest of the scores, the prediction, the files. A slide whose
                  ``heatmap.json`` matches the current parameters and scores is not redone.
================  ==========================================================================================

Every file is written under a temporary name and renamed into place. What is painted is ``heatmap.value``:
``evidence`` (the default: :func:`tumour_evidence`, the tile's probability of ``heatmap.tumour_class`` weighted
by its attention relative to the slide's most attended tile and by the slide's probability of that class),
``tumour`` (the tile's probability alone) or ``attention`` (where the model looked), normalised by rank within
the slide (``percentile``) or, for the probability-like values, shown as they are (``raw``); ``auto`` picks raw
for those and percentile for attention. Rank normalisation paints half of every slide, a normal one included,
in the top half of the colour scale, and attention concentrated on a few tumour tiles leaves the rest of its
ranks to noise (in the MIL quality study, fat ranked just below tumour though the tumour tiles held most of
the attention). A tile's probability alone is uncalibrated where the model did not look (fat on normal slides
reached 0.88): the evidence is 0 there, and on a normal slide, whose probability is low, everywhere.
The GeoJSON classifies the tiles whose painted value (or, for attention, tumour probability) reaches
``heatmap.threshold``.
For a slide of the run's own training cohort the heatmaps show its out-of-fold scores (``scores/<run>/oof_*``:
the fold model that held the slide out, never one that trained on it), and the overlay's title says so; the
ensemble's scores of such a slide are flattering. Other slides show the ensemble's scores.
Rasters and alignment rules are in :mod:`wsi.heatmap.raster`. A slide with fewer than two tiles gets valid,
empty outputs and a warning.

``high_res=True`` paints the scores of a finer, overlapping grid that ``wsi extract --high-res`` and
``wsi predict`` stored (:mod:`wsi.heatmap.high_res`) and writes the same files to
``OUT/heatmaps/<run>/<slide_id>/high_res/``. Like every stage here, heatmaps read the store only.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from .. import __version__, atomic
from ..config import StageConfig
from ..errors import ConfigError, StoreError
from ..layout import Layout
from ..runner import StageSummary, run_slides
from ..slide import TileSource
from ..store import OOD_WARNING, SlideStore, open_cohort
from .geojson import feature_collection
from .images import blend, save_overlay, save_tile_grid
from .raster import NORMALIZATIONS, TileValues, colour_table, normalise, render_rgba
from .scores import SlideScores, fine_scores, stored_scores
from .tiff import write_pyramid

__all__ = ["HeatmapConfig", "HeatmapParams", "SlideScores", "heatmap_dir", "heatmap_slide", "heatmaps",
           "stored_scores", "tumour_evidence"]

VALUES = ("evidence", "tumour", "attention")
OUTPUTS = ("overlay.png", "heatmap.png", "tiles.geojson", "heatmap.tif", "top_tiles.png")
STAGE = "heatmap"
_REGION_COLOUR = (220, 40, 40)  # QuPath colour of the tumour classification


@dataclass(frozen=True)
class HeatmapConfig(StageConfig):
    """The sections the heatmap stage reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = STAGE
    slide: dict
    heatmap: dict


@dataclass(frozen=True)
class HeatmapParams:
    """The ``heatmap:`` config section, checked, plus the ``slide:`` section to read tiles of coordinates-only
    stores."""

    downsample: float
    value: str
    normalize: str
    smooth_sigma: float
    threshold: float
    tumour_class: str | None
    top_k: int
    colormap: str
    alpha: float
    slide: dict          # the slide section: opening the slide for the tiles of coordinates-only stores and fine grids

    @classmethod
    def from_sections(cls, sections: HeatmapConfig) -> HeatmapParams:
        h = sections.heatmap
        if h["value"] not in VALUES:
            raise ConfigError(None, f"heatmap.value {h['value']!r} is not one of {VALUES}")
        normalize = h["normalize"]
        if normalize == "auto":
            normalize = "percentile" if h["value"] == "attention" else "raw"
        if normalize not in NORMALIZATIONS:
            raise ConfigError(None, f"heatmap.normalize {normalize!r} is not one of {('auto', *NORMALIZATIONS)}")
        if normalize == "raw" and h["value"] == "attention":
            raise ConfigError(None, "heatmap.normalize=raw shows probabilities as they are, but attention "
                                    "weights have no absolute scale", "use normalize=percentile or value=evidence")
        colour_table(h["colormap"])
        return cls(downsample=float(h["downsample"]), value=h["value"], normalize=normalize,
                   smooth_sigma=float(h["smooth_sigma"]), threshold=float(h["threshold"]),
                   tumour_class=h["tumour_class"], top_k=int(h["top_k"]), colormap=h["colormap"],
                   alpha=float(h["alpha"]), slide=dict(sections.slide))


def heatmap_dir(out_dir, run: str, slide_id: str) -> Path:
    """``OUT/heatmaps/<run>/<slide_id>`` (:meth:`wsi.layout.Layout.heatmap_dir`)."""
    return Layout(out_dir).heatmap_dir(run, slide_id)


def tumour_evidence(tile_probability: np.ndarray, attention: np.ndarray, slide_probability: float) -> np.ndarray:
    """What the default heatmap paints: each tile's tumour probability, times its attention relative to the slide's
    most attended tile, times the slide's tumour probability; 0-1.

    A tile's own probability alone is not calibrated where the model did not look: on the demo's normal slides the
    fat, which draws next to no attention, reached 0.6-0.88, and 5-49% of their tiles were above 0.5. Weighted by
    attention and by the slide's verdict, normal slides stay dark (max 0.01-0.05 on the demo) while tumour foci
    keep most of their probability (max 0.61-0.97)."""
    top = float(attention.max()) if attention.size else 0.0
    relative = attention / top if top > 0 else np.zeros_like(attention)
    return (np.asarray(tile_probability) * relative * float(slide_probability)).astype(np.float32)


def _mask(store: SlideStore) -> tuple[np.ndarray, float]:
    try:
        _, thumbnail, downsample = store.mask()
    except Exception as e:  # a store without mask/ (or a damaged one) is not a usable tile store
        raise StoreError(store.path, f"mask/thumbnail cannot be read ({type(e).__name__}: {e})",
                         "re-run `wsi tile` for this slide") from e
    return thumbnail, downsample


def _read_tiles(store: SlideStore, scores: SlideScores, indices: np.ndarray, params: HeatmapParams) -> np.ndarray:
    """Pixels of tiles ``indices``: from the store when it holds them, else read from the slide."""
    if scores.store_tiles and store.has_pixels:
        return np.stack([store.read_tiles(int(i), int(i) + 1)[0] for i in indices])
    with TileSource.open(store.slide.source_path, store.tiling, **params.slide) as tiles:
        return tiles.read_tiles(scores.coords[indices])


def _top_and_bottom(attention: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-attention, kind="stable")
    top = order[:k]
    bottom = order[::-1][: min(k, len(order) - len(top))]
    return top, bottom


def _write_json(path: Path, doc: dict) -> None:
    atomic.write_json(path, doc, indent=None, separators=(",", ":"))


def _params_doc(params: HeatmapParams, high_res: bool) -> dict:
    doc = dataclasses.asdict(params)
    doc["high_res"] = high_res
    return doc


def heatmap_slide(store: SlideStore, run: str, out_dir, params: HeatmapParams, *,
                  high_res: bool = False) -> dict[str, Path]:
    """Write one slide's heatmap files (see the module docstring); returns {file name: path}."""
    scores = fine_scores(store, run) if high_res else stored_scores(store, run)
    folder = heatmap_dir(out_dir, run, store.slide_id) / ("high_res" if high_res else "")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in OUTPUTS}
    slide = store.slide

    tumour_index = scores.class_index(params.tumour_class, run)
    tumour_name = str(scores.classes[tumour_index])
    tumour = scores.class_scores[:, tumour_index]
    n = len(scores.coords)
    note = None
    if n < 2:
        note = f"{n} tile(s): nothing to rank, the heatmaps are left empty"
        warnings.warn(f"{store.slide_id}: {note}", stacklevel=2)
    shown = n if n >= 2 else 0
    if params.value == "evidence":
        painted = tumour_evidence(tumour, scores.attention, scores.probabilities[tumour_index])
    else:
        painted = scores.attention if params.value == "attention" else tumour
    # what the GeoJSON classifies and the threshold applies to: a probability-like value
    classified = tumour if params.value == "attention" else painted
    tiles = TileValues(scores.coords[:shown], scores.size, normalise(painted[:shown], params.normalize))
    table = colour_table(params.colormap)

    # PNGs on the thumbnail's grid; smoothing keeps its level-0 width whatever the grid
    thumbnail, mask_ds = _mask(store)
    rgba = render_rgba(tiles, mask_ds, thumbnail.shape[1], thumbnail.shape[0], table,
                       params.smooth_sigma * params.downsample / mask_ds)
    from PIL import Image

    with atomic.replacing(paths["heatmap.png"]) as tmp:
        Image.fromarray(rgba, "RGBA").save(tmp, format="PNG")
    p_pred = dict(zip(scores.classes, scores.probabilities)).get(scores.predicted, float("nan"))
    title = (f"{store.slide_id}: predicted {scores.predicted} (p = {p_pred:.2f})  |  run {run}"
             + ("  |  high-res" if high_res else "") + (f"  |  {note}" if note else "")
             + ("" if scores.source == "ensemble" else
                f"\n{scores.source}: a training slide, scored by the fold models that did not train on it")
             + (f"\nWARNING: {OOD_WARNING} (OOD score {scores.ood_score:.2f})"
                if scores.ood_score is not None and scores.ood_score > 1 else ""))
    subject = {"attention": "attention", "tumour": f"{tumour_name} probability",
               "evidence": f"{tumour_name} evidence (tile probability x relative attention x slide probability)"
               }[params.value]
    bar_label = subject + (" (percentile within slide)" if params.normalize == "percentile" else "")
    with atomic.replacing(paths["overlay.png"]) as tmp:
        save_overlay(tmp, blend(thumbnail, rgba, params.alpha), title=title, colormap=params.colormap,
                     bar_label=bar_label)

    measurements = {"attention": scores.attention[:shown],
                    "attention percentile": normalise(scores.attention[:shown], "percentile")}
    for c, name in enumerate(scores.classes):
        measurements[f"{name} probability"] = scores.class_scores[:shown, c]
    if params.value == "evidence":
        measurements[f"{tumour_name} evidence"] = painted[:shown]
    measure = "evidence" if params.value == "evidence" else "probability"
    collection = feature_collection(scores.coords[:shown], scores.size, measurements,
                                    classified[:shown] >= params.threshold, tumour_name, _REGION_COLOUR,
                                    f"{tumour_name} region ({measure} >= {params.threshold:g})")
    _write_json(paths["tiles.geojson"], collection)

    description = {"wsi_version": __version__, "slide_id": store.slide_id, "run": run, "value": params.value,
                   "class": tumour_name, "normalize": params.normalize, "colormap": params.colormap,
                   "value_range": [0.0, 1.0], "downsample": params.downsample,
                   "slide_mpp": [slide.mpp_x, slide.mpp_y], "slide_size": [slide.width, slide.height]}
    with atomic.replacing(paths["heatmap.tif"]) as tmp:
        write_pyramid(tmp, tiles, width0=slide.width, height0=slide.height, mpp=(slide.mpp_x, slide.mpp_y),
                      downsample=params.downsample, sigma=params.smooth_sigma, table=table,
                      description=description)

    top, bottom = _top_and_bottom(scores.attention[:shown], params.top_k)
    percentile = measurements["attention percentile"]
    rows = []
    for heading, picked in (("highest attention", top), ("lowest attention", bottom)):
        pixels = _read_tiles(store, scores, picked, params) if len(picked) else np.zeros((0, 1, 1, 3), np.uint8)
        captions = [f"attention pct {percentile[i]:.2f}\n{tumour_name} p = {tumour[i]:.2f}" for i in picked]
        rows.append((heading, pixels, captions))
    with atomic.replacing(paths["top_tiles.png"]) as tmp:
        save_tile_grid(tmp, rows, title=title)

    _write_json(folder / "heatmap.json", {
        "wsi_version": __version__, "slide_id": store.slide_id, "run": run, "n_tiles": n, "note": note,
        "scores": scores.source, "ood_score": scores.ood_score,
        "params": _params_doc(params, high_res), "scores_sha256": scores.digest(), "predicted": scores.predicted,
        "probabilities": dict(zip(map(str, scores.classes), map(float, scores.probabilities))),
        "outputs": list(OUTPUTS)})
    return paths


def _up_to_date(store: SlideStore, run: str, out_dir, params: HeatmapParams, high_res: bool) -> bool:
    """The slide's ``heatmap.json`` is there, for these parameters and these very scores, with every file."""
    folder = heatmap_dir(out_dir, run, store.slide_id) / ("high_res" if high_res else "")
    try:
        done = json.loads((folder / "heatmap.json").read_text())
    except (OSError, ValueError):
        return False
    scores = fine_scores(store, run) if high_res else stored_scores(store, run)
    return (done.get("params") == json.loads(json.dumps(_params_doc(params, high_res)))
            and done.get("scores_sha256") == scores.digest()
            and all((folder / name).exists() for name in OUTPUTS))


def heatmaps(out_dir, sections: HeatmapConfig, run: str, *, slide_ids: list[str] | None = None,
             high_res: bool = False, progress: bool = True) -> StageSummary:
    """Heatmaps of every slide with scores of ``run`` (or of ``slide_ids``); see the module docstring.

    A slide that fails gets one ``failures.csv`` row (stage ``heatmap``) and a line on stderr; the others go
    on; one that failed an earlier stage is skipped. Slides already done with the same parameters and scores
    are not redone, and count as done. Raises StoreError when no slide at all has scores for ``run``.
    """
    from tqdm import tqdm

    params = HeatmapParams.from_sections(sections)
    layout = Layout(out_dir)
    if slide_ids is None:
        slide_ids = [s.slide_id for s in open_cohort(out_dir) if s.has_scores(run)]
        if not slide_ids:
            raise StoreError(layout.stores_dir, f"no complete store has scores of model run {run!r}",
                             f"run `wsi predict --model {layout.run_dir(run)}` first")
    bar = tqdm(total=len(slide_ids), unit="slide", desc=STAGE, disable=not progress)

    def is_done(slide_id: str) -> bool:
        bar.update()
        return _up_to_date(SlideStore.open(layout.store(slide_id)), run, out_dir, params, high_res)

    def work(slide_id: str) -> None:
        heatmap_slide(SlideStore.open(layout.store(slide_id)), run, out_dir, params, high_res=high_res)

    ran = run_slides(out_dir, STAGE, {slide_id: layout.store(slide_id) for slide_id in slide_ids}, work,
                     is_done=is_done)
    bar.close()
    up_to_date = [s for s, why in ran.skipped.items() if why == "up to date"]
    ran.done += up_to_date
    for slide_id in up_to_date:
        del ran.skipped[slide_id]
    return ran
