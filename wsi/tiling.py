"""Slides to tiles: the tissue mask, the tile grid at a target MPP, and the per-slide store.

For each slide: open it (:mod:`wsi.slide`), read a thumbnail at ``tissue.mask_mpp`` in strips (never a whole
level), compute the tissue mask (:mod:`wsi.tissue`), lay the tile grid at ``tiling.target_mpp``
(:func:`wsi.slide.tile_grid`; its geometry is documented in :mod:`wsi.slide.tiles`), keep tiles whose tissue
share reaches ``tiling.min_tissue_fraction``, then stream the kept tiles (:class:`wsi.slide.TileSource`) into the
store (:mod:`wsi.store`) chunk by chunk and commit it.
The mask and the tiles are read only from levels that agree with level 0 (:mod:`wsi.slide.levels`). Slide quality
control (``tiling.qc``, :mod:`wsi.qc`) measures each tile's focus as it streams by and looks for folds and air
bubbles on the thumbnail; its flags go into the store (or, with ``exclude``, the flagged tiles stay out of it).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
from PIL import Image

from . import __version__
from . import qc as slide_qc
from .atomic import replacing
from .config import StageConfig
from .errors import ConfigError, SlideError
from .keys import qc_flag_bits
from .layout import Layout
from .runner import StageSummary, run_slides
from .slide import (
    LevelCheck,
    Slide,
    TileGrid,
    TileSource,
    expand_slide_paths,
    level0_position,
    load_mpp_overrides,
    mark_qc,
    open_slide,
    slide_id_from_path,
    source_stat,
    tile_grid,
)
from .store import (
    LevelCheckAttrs,
    QCAttrs,
    SlideAttrs,
    SlideStore,
    TileStoreWriter,
    TilingAttrs,
    is_complete,
    store_path,
)
from .tissue import TissueParams, qc_image, tissue_fractions, tissue_masks

_STRIP_BYTES = 64 << 20     # thumbnail strips: at most this much RGBA per backend call


@dataclass(frozen=True)
class TileConfig(StageConfig):
    """The sections the tile stage reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = "tile"
    slide: dict
    tissue: dict
    tiling: dict


# --------------------------------------------------------------------------------------------- thumbnail
def read_thumbnail(slide: Slide, mpp: float, levels: LevelCheck | None = None) -> tuple[np.ndarray, float]:
    """RGB thumbnail at ``mpp`` um/px, read in horizontal strips from the coarsest suitable level that agrees
    with level 0 (``levels`` keeps the verdicts; a fresh check when None) and area-averaged.

    A level that fails while it is read is rejected and the next finer one read instead; level 0 failing is
    a :class:`SlideError` naming the file and the level. Returns (rgb (h, w, 3), downsample = level-0 pixels
    per thumbnail pixel). Memory stays at one strip.
    """
    levels = levels if levels is not None else LevelCheck(slide)
    downsample = max(1.0, mpp / slide.mpp_x)
    out_w = max(1, int(round(slide.width / downsample)))
    out_h = max(1, int(round(slide.height / downsample)))
    while True:
        plan = levels.plan(slide.mpp_x * downsample, 0.0, "mask")
        try:
            return _read_strips(slide, plan.level, out_w, out_h), slide.width / out_w
        except SlideError as e:
            if plan.level == 0:
                raise SlideError(slide.path, f"no level decodes sensibly: {e.cause}", e.hint) from e
            levels.reject(plan.level, f"cannot be read: {e.cause}")


def _read_strips(slide: Slide, level: int, out_w: int, out_h: int) -> np.ndarray:
    """``level`` area-averaged to (out_h, out_w), read in strips of at most ``_STRIP_BYTES``."""
    level_w, level_h = slide.level_dimensions[level]
    rows_per_px = level_h / out_h  # level rows per thumbnail row
    strip_rows = max(1, int(_STRIP_BYTES // (4 * level_w * max(rows_per_px, 1.0))))
    thumb = np.empty((out_h, out_w, 3), np.uint8)
    level_ds = slide.level_downsamples[level]
    for r0 in range(0, out_h, strip_rows):
        r1 = min(out_h, r0 + strip_rows)
        y0, y1 = int(round(r0 * rows_per_px)), min(level_h, int(round(r1 * rows_per_px)))
        strip = slide.read_region(0, level0_position(y0, level_ds), level, level_w, max(1, y1 - y0))
        thumb[r0:r1] = np.asarray(Image.fromarray(strip).resize((out_w, r1 - r0), Image.Resampling.BOX))
    return thumb


# --------------------------------------------------------------------------------------------- one slide
def _tiling_attrs(slide: Slide, grid: TileGrid, t: dict, tissue: TissueParams) -> TilingAttrs:
    level_mpp = slide.level_mpp(grid.level)
    return TilingAttrs(
        target_mpp=float(t["target_mpp"]), tile_px=int(t["tile_px"]), overlap_px=int(t["overlap_px"]),
        read_level=grid.level, read_downsample=grid.level_downsample,
        tile_px_level0=grid.tile_level_px * grid.level_downsample,
        stride_px_level0=grid.stride_level_px * grid.level_downsample,
        effective_mpp=level_mpp * grid.tile_level_px / int(t["tile_px"]),
        min_tissue_fraction=float(t["min_tissue_fraction"]), store_pixels=bool(t["store_pixels"]),
        codec=t["codec"], quality=int(t["quality"]), chunk_tiles=int(t["chunk_tiles"]),
        tissue=tissue.to_dict(), wsi_version=__version__, qc=t.get("qc") or "off")  # YAML reads a bare off as false


def _slide_attrs(slide: Slide) -> SlideAttrs:
    size, mtime = source_stat(slide.path)
    return SlideAttrs(source_path=str(slide.path.resolve()), source_size=size, source_mtime=mtime,
                      backend=slide.backend, vendor=slide.vendor, width=slide.width, height=slide.height,
                      mpp_x=slide.mpp_x, mpp_y=slide.mpp_y, mpp_source=slide.mpp_source,
                      objective_power=slide.objective_power, level_count=slide.level_count,
                      level_downsamples=slide.level_downsamples)


def _level_check_attrs(slide: Slide, levels: LevelCheck) -> LevelCheckAttrs:
    (mask_wanted, mask_level), (tile_wanted, tile_level) = levels.chosen["mask"], levels.chosen["tiles"]
    return LevelCheckAttrs(pixel_backend=slide.pixel_backend, mask_level=mask_level, mask_level_wanted=mask_wanted,
                           tile_level=tile_level, tile_level_wanted=tile_wanted,
                           checked=tuple(v.to_dict() for _, v in sorted(levels.verdicts.items())),
                           summary=levels.summary())


def _up_to_date(path: Path, slide: Slide, tiling: TilingAttrs) -> bool:
    """A complete store made from this very file (or DICOM folder) with these very parameters needs no redo."""
    if not is_complete(path):
        return False
    store = SlideStore.open(path)
    same_source = (store.slide.source_size, store.slide.source_mtime) == source_stat(slide.path)
    return same_source and store.tiling == tiling


def tile_slide(out_dir, params: TileConfig, path, *, mpp_overrides: dict | None = None,
               progress: bool = False, qc_rows: list | None = None) -> SlideStore:
    """Tile one slide into ``<out>/stores/<slide_id>.zarr`` and write ``<out>/qc/<slide_id>.png``.

    A complete store made from the same file with the same parameters is returned as is. Raises a
    :class:`~wsi.errors.WsiError` naming the file for anything the lab must fix. With ``tiling.qc`` (``flag``,
    ``exclude``) the tiles are checked as they are read (:mod:`wsi.qc`): flags and scores go into the store, a
    row into ``OUT/qc.csv`` (appended to ``qc_rows`` instead when given, for the caller to record a batch at
    once), the flagged regions onto the QC image; a slide with no in-focus tissue fails.
    """
    def record(row: dict) -> None:
        if qc_rows is None:
            slide_qc.record_qc(out_dir, [row])
        else:
            qc_rows.append(row)

    slide_cfg = dict(params.slide)
    if mpp_overrides is not None:
        slide_cfg["mpp_overrides"] = mpp_overrides
    tissue = TissueParams.from_dict(params.tissue)
    t = params.tiling
    with open_slide(path, **slide_cfg) as slide:
        levels = LevelCheck(slide)
        grid = tile_grid(slide, target_mpp=t["target_mpp"], tile_px=t["tile_px"], overlap_px=t["overlap_px"],
                         level_tolerance=t["level_tolerance"], levels=levels)
        tiling = _tiling_attrs(slide, grid, t, tissue)
        final = store_path(out_dir, slide.slide_id)
        if _up_to_date(final, slide, tiling):
            store = SlideStore.open(final)
            if store.qc is not None:  # qc.csv keeps its row even if it was deleted since
                record(slide_qc.attrs_row(store.slide_id, store.qc))
            return store

        thumb, mask_ds = read_thumbnail(slide, tissue.mask_mpp, levels)
        masks = tissue_masks(thumb, mask_ds * slide.mpp_x, tissue)
        mask = masks.tissue
        qc_png = mark_qc(qc_image(thumb, mask, masks.rejected), levels)
        if tiling.qc == "off" or not mask.any():  # with QC it is written once, with the flags
            _write_png(Layout(out_dir).qc(slide.slide_id), qc_png)
        if not mask.any():
            inked = f" ({masks.ink.mean():.0%} of it is marker ink)" if masks.ink.any() else ""
            raise SlideError(slide.path, f"no tissue found on the slide{inked}",
                             "check the thumbnail in qc/; loosen tissue.saturation_min if tissue is very pale")
        coords = grid.coords()
        fractions = tissue_fractions(mask, mask_ds, coords, tiling.tile_px_level0)
        keep = fractions >= tiling.min_tissue_fraction
        if not keep.any():
            if tiling.qc != "off":
                _write_png(Layout(out_dir).qc(slide.slide_id), qc_png)
            raise SlideError(slide.path, f"no tile reaches min_tissue_fraction {tiling.min_tissue_fraction:g}",
                             "the tissue is smaller than one tile; lower tiling.min_tissue_fraction or tile_px")
        coords, fractions = coords[keep], fractions[keep]

        writer = TileStoreWriter.create(final, slide.slide_id, _slide_attrs(slide), tiling, coords=coords,
                                        tissue_fraction=fractions, levels=_level_check_attrs(slide, levels))
        # QC's folds and bubbles need only the thumbnail: found in a thread while the tiles are read (OpenCV
        # releases the GIL), off the tile path's critical path
        with ThreadPoolExecutor(1) as defects_pool, _opencv_serial():
            try:
                defects = None
                if tiling.qc != "off":
                    defects = defects_pool.submit(slide_qc.thumbnail_defects, thumb, mask, mask_ds * slide.mpp_x,
                                                  glass=masks.glass)
                writer.write_mask(mask, thumb, ink=masks.ink, downsample=mask_ds, mpp=mask_ds * slide.mpp_x)
                focus = None
                if tiling.store_pixels:
                    focus = _write_tiles(writer, slide, tiling, coords, progress=progress,
                                         measure=tiling.qc != "off")
                elif tiling.qc != "off":  # coordinates only: QC alone reads the tiles
                    focus = _measure_tiles(slide, tiling, coords)
                row = None
                if defects is not None:
                    row = _quality_control(writer, slide, tiling, out_dir, defects.result(), qc_png, mask_ds,
                                           coords, fractions, focus, record)
                store = writer.commit()
            except BaseException:
                writer.abort()
                raise
        if row is not None:
            record(row)
        return store


@contextmanager
def _opencv_serial():
    """OpenCV single-threaded while a slide's tiles stream: the stage's own threads (tiles read and written, QC's
    focus and its thumbnail step) keep the cores busy then, and OpenCV's pool would only add its hand-offs to the
    CPU the process costs. Its thread count is put back after."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


def _quality_control(writer: TileStoreWriter, slide: Slide, tiling: TilingAttrs, out_dir, defects,
                     qc_png: np.ndarray, mask_ds: float, coords: np.ndarray,
                     fractions: np.ndarray, focus: tuple[np.ndarray, np.ndarray], record) -> dict:
    """Flag the slide's tiles (:mod:`wsi.qc`) from their focus and the thumbnail's ``defects``, paint the flags
    onto the QC image, write them into the store (dropping the flagged tiles with ``tiling.qc: exclude``) and
    return the slide's ``qc.csv`` row. A slide with no in-focus tissue, or whose every tile is excluded, is a
    :class:`SlideError` (its ``qc.csv`` row passed to ``record`` first)."""
    mpp = mask_ds * slide.mpp_x
    shares = slide_qc.defect_shares(defects, mask_ds, coords, tiling.tile_px_level0)
    result = slide_qc.assess(*focus, *shares, fractions, coords, tiling.tile_px_level0)
    flags = {"blur": result.blur, "fold": result.fold, "bubble": result.bubble}
    _write_png(Layout(out_dir).qc(slide.slide_id),
               slide_qc.qc_overlay(qc_png, flags, mask_ds, coords, tiling.tile_px_level0, defects))
    summary = result.summary()
    if not result.in_focus:
        judged = (f"its sharpest judged tissue reaches {result.sharpness_ref:.2f} where in-focus tissue reaches "
                  f"{slide_qc.SHARPNESS_MIN:g}" if result.judged else "no tile shows structure enough to judge")
        cause = f"{slide_qc.NO_FOCUS} ({judged})"
        record(slide_qc.qc_row(slide.slide_id, tiling.qc, result, status="failed", cause=cause))
        raise SlideError(slide.path, cause, "rescan the slide; the QC image in qc/ shows the tiles judged blurred")
    flagged = result.flagged
    excluded = None
    keep = np.ones(len(coords), bool)
    if tiling.qc == "exclude":
        keep = ~flagged
        if not keep.any():
            cause = (f"QC excluded every tile (blur {summary['blur_pct']:.0f}%, fold {summary['fold_pct']:.0f}%, "
                     f"bubble {summary['bubble_pct']:.0f}% of the tissue)")
            record(slide_qc.qc_row(slide.slide_id, tiling.qc, result, status="failed", cause=cause))
            raise SlideError(slide.path, cause, "rescan the slide, or tile it with tiling.qc: flag")
        bits = qc_flag_bits(flags)
        excluded = {"coords": coords[flagged].astype(np.int64), "flags": bits[flagged].astype(np.uint8),
                    "focus": result.focus[flagged], "tissue_fraction": fractions[flagged].astype(np.float32)}
        if flagged.any():
            writer.keep_tiles(keep)
    attrs = QCAttrs(mode=tiling.qc, **{k: summary[k] for k in (
        "blur_pct", "fold_pct", "bubble_pct", "focus_median", "focus_p10", "judged_pct", "sharpness_ref", "tiles",
        "blur_tiles", "fold_tiles", "bubble_tiles")}, excluded_tiles=int((~keep).sum()),
        bubbles=tuple((round(x * mask_ds, 1), round(y * mask_ds, 1), round(r * mask_ds, 1))
                      for x, y, r in defects.circles),
        thresholds=slide_qc.thresholds(), wsi_version=__version__)
    writer.write_qc(attrs, {"focus": result.focus[keep], "blur": result.blur[keep], "fold": result.fold[keep],
                            "bubble": result.bubble[keep]}, excluded=excluded,
                    masks={"fold": defects.fold, "bubble": defects.bubble}, downsample=mask_ds, mpp=mpp)
    return slide_qc.attrs_row(slide.slide_id, attrs)


def _measure_tiles(slide: Slide, tiling: TilingAttrs, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """QC's focus features of tiles read only for it (coordinates-only stores)."""
    sharpness, structure = np.zeros(len(coords), np.float32), np.zeros(len(coords), np.float32)
    for lo, tiles in TileSource(slide, tiling).iter_tiles(coords):
        sharpness[lo:lo + len(tiles)], structure[lo:lo + len(tiles)] = slide_qc.focus_features(tiles)
    return sharpness, structure


def _write_tiles(writer: TileStoreWriter, slide: Slide, tiling: TilingAttrs, coords: np.ndarray,
                 *, progress: bool, measure: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """Stream tiles into whole chunks of the store as the row runs arrive, in order; with ``measure``, return
    QC's focus features of every tile (:func:`wsi.qc.focus_features`), taken on the way."""
    from tqdm import tqdm

    features = (np.zeros(len(coords), np.float32), np.zeros(len(coords), np.float32)) if measure else None
    measured: list = []  # (first tile, future of its run's focus features): OpenCV releases the GIL

    def measure_run(lo: int, tiles: np.ndarray) -> None:
        features[0][lo:lo + len(tiles)], features[1][lo:lo + len(tiles)] = slide_qc.focus_features(tiles)

    chunk, t = tiling.chunk_tiles, tiling.tile_px
    buffer = np.empty((chunk, t, t, 3), np.uint8)
    filled = written = 0
    bar = tqdm(total=len(coords), unit="tile", desc=slide.slide_id, disable=not progress, leave=False)
    with ThreadPoolExecutor(1) as write_pool, ThreadPoolExecutor(1) as qc_pool:  # compress + write one chunk
        write_future = None  # while the next is read; QC measures the tiles beside both
        for lo, tiles in TileSource(slide, tiling).iter_tiles(coords):
            if features is not None:
                measured.append(qc_pool.submit(measure_run, lo, tiles))
            while len(tiles):
                take = min(chunk - filled, len(tiles))
                buffer[filled:filled + take] = tiles[:take]
                filled, tiles = filled + take, tiles[take:]
                if filled == chunk:
                    if write_future is not None:
                        write_future.result()
                    write_future = write_pool.submit(writer.write_tiles, written, buffer)
                    buffer = np.empty_like(buffer)  # the writer owns the full one
                    written, filled = written + chunk, 0
            bar.update(written + filled - bar.n)
        if write_future is not None:
            write_future.result()
        if filled:
            writer.write_tiles(written, buffer[:filled])
        for future in measured:
            future.result()
    bar.close()
    return features


def _write_png(path: Path, rgb: np.ndarray) -> None:
    with replacing(path) as tmp:  # zlib level 1: a QC image is looked at, not archived; level 6 cost ~5x the CPU
        Image.fromarray(rgb).save(tmp, format="PNG", compress_level=1)


# --------------------------------------------------------------------------------------------- cohort
def tile_slides(out_dir, params: TileConfig, slides, *, progress: bool = True) -> StageSummary:
    """Tile every slide of ``slides`` (files, or folders of slides) through the stage runner
    (:func:`wsi.runner.run_slides`): a bad slide gets a one-line error and a ``failures.csv`` row, the rest go
    on; a done slide gets a line (tiles, MPP, seconds) on stdout as it ends. Each slide's status item has its
    source, tiles and seconds. Raises ConfigError when a path does not exist or names no slide.

    Two files with the same slide id fail together: their stores would overwrite each other.
    """
    slides = [Path(p) for p in slides]
    missing = [p for p in slides if not p.exists()]
    if missing:
        raise ConfigError(missing[0], "slide file or folder does not exist"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), "check the path")
    paths = expand_slide_paths(slides)
    if not paths:
        raise ConfigError(slides[0], "no slides found", "name slide files, or folders that hold them")
    files: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        files.setdefault(slide_id_from_path(path), []).append(path)
    overrides = load_mpp_overrides(params.slide.get("mpp_overrides"))

    def work(slide_id: str) -> dict:
        path, *twins = files[slide_id]
        if twins:
            raise SlideError(path, f"slide id '{slide_id}' is also the id of {', '.join(map(str, twins))}",
                             "rename one of them: each slide id names one store")
        start = time.perf_counter()
        store = tile_slide(out_dir, params, path, mpp_overrides=overrides, progress=progress, qc_rows=qc_rows)
        seconds = time.perf_counter() - start
        print(f"wsi tile: {slide_id}: {store.n_tiles} tiles, slide {store.slide.mpp_x:.3f} um/px, {seconds:.1f} s",
              flush=True)  # as each slide ends: a job tiles a batch of slides
        return {"n_tiles": store.n_tiles, "seconds": round(seconds, 2)}

    qc_rows: list[dict] = []  # recorded in qc.csv once per batch (each record rewrites the cohort's file)
    try:
        summary = run_slides(out_dir, "tile", {slide_id: found[0] for slide_id, found in files.items()}, work)
    finally:
        if qc_rows:
            slide_qc.record_qc(out_dir, qc_rows)
    for slide_id, found in files.items():
        tiled = summary.results.get(slide_id) or {"n_tiles": 0, "seconds": 0.0}
        summary.details[slide_id] = {"source": str(found[0]), **({"cause": None} if slide_id in summary.results
                                                                  else {}), **tiled}
    return summary
