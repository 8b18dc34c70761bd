"""Heatmap benchmark: time and memory per slide for 20,000 tiles, and proof that the TIFF is streamed.

    python bench/heatmap.py [--tiles 20000] [--downsample 32]

Builds (under bench/out/heatmap/) a store of a 0.25 um/px slide whose tissue is an ellipse holding ``--tiles``
tiles of 512 level-0 px (256 px at 0.5 um/px), with scores of a made-up run, then measures in this one run:

* ``heatmap_slide`` as the CLI runs it (every output), in a fresh subprocess so its peak RSS is its own, next
  to the same subprocess's RSS just after reading the store's scores (the floor every stage pays);
* each output alone (thumbnail-grid render + PNGs, GeoJSON, pyramidal TIFF, top-k grid), as shares of the
  total;
* the TIFF writer's peak traced allocation against the size its base level would have as one RGBA array and
  against the slide's level 0 as one RGBA array, at ``--downsample`` and at a quarter of it (a 16x larger base).

Machines here are noisy and shared: compare the ratios within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUN = "bench_run"
TILE0 = 512          # tile footprint at level 0
TILE_PX = 256        # stored tile edge


def make_store(out: Path, n_tiles: int):
    """An elliptical tissue region with about ``n_tiles`` tiles; scores high in one lobe."""
    from wsi.store import ScoreAttrs, SlideAttrs, SlideStore, TileStoreWriter, TilingAttrs, store_path

    path = store_path(out, "bench")
    if path.exists():
        store = SlideStore.open(path)
        if store.n_tiles >= 0.95 * n_tiles and store.has_scores(RUN):
            return store
    radius = np.sqrt(n_tiles / np.pi) * 1.0  # tiles along the ellipse's half axes (a = 1.3 r, b = r / 1.3)
    cols, rows = int(2.8 * radius) + 4, int(1.7 * radius) + 4
    r, c = np.mgrid[0:rows, 0:cols]
    keep = (((c - cols / 2) / (1.3 * radius)) ** 2 + ((r - rows / 2) / (radius / 1.3)) ** 2) <= 1
    coords = np.stack([c[keep] * TILE0, r[keep] * TILE0], axis=1).astype(np.int64)
    width, height = cols * TILE0, rows * TILE0
    slide = SlideAttrs(source_path="bench.svs", source_size=1, source_mtime=0.0, backend="openslide",
                       vendor="aperio", width=width, height=height, mpp_x=0.25, mpp_y=0.25, mpp_source="file",
                       objective_power=40.0, level_count=1, level_downsamples=(1.0,))
    tiling = TilingAttrs(target_mpp=0.5, tile_px=TILE_PX, overlap_px=0, read_level=0, read_downsample=2.0,
                         tile_px_level0=float(TILE0), stride_px_level0=float(TILE0), effective_mpp=0.5,
                         min_tissue_fraction=0.25, store_pixels=True, codec="lossless", quality=90,
                         chunk_tiles=32, tissue={}, wsi_version="bench")
    writer = TileStoreWriter.create(path, "bench", slide, tiling, coords=coords,
                                    tissue_fraction=np.ones(len(coords)))
    mask_ds = 32.0  # 8 um/px thumbnail, as tissue.mask_mpp gives at 0.25 um/px
    th, tw = int(np.ceil(height / mask_ds)), int(np.ceil(width / mask_ds))
    rng = np.random.default_rng(0)
    thumb = np.full((th, tw, 3), 235, np.uint8)
    for x, y in coords:
        thumb[y // 32:(y + TILE0) // 32, x // 32:(x + TILE0) // 32] = (200, 120, 170)
    writer.write_mask(thumb[..., 0] < 230, thumb, downsample=mask_ds, mpp=mask_ds * 0.25)
    # pixels only in the chunks the top/bottom grid reads (unwritten chunks read as zeros)
    lobe = np.hypot(coords[:, 0] - width * 0.35, coords[:, 1] - height * 0.5) < width * 0.12
    attention = np.where(lobe, 5.0, 1.0) * rng.uniform(0.5, 1.5, len(coords))
    order = np.argsort(-attention)
    for i in np.unique(np.concatenate([order[:8], order[-8:]]) // 32):
        lo, hi = i * 32, min(len(coords), i * 32 + 32)
        writer.write_tiles(lo, rng.integers(0, 255, (hi - lo, TILE_PX, TILE_PX, 3), dtype=np.uint8))
    store = writer.commit()
    tumour = np.clip(np.where(lobe, 0.8, 0.15) + rng.normal(0, 0.05, len(coords)), 0, 1)
    store.write_scores(RUN, attention / attention.sum(), np.stack([1 - tumour, tumour], 1),
                       ScoreAttrs(run=RUN, model="abmil", encoder="bench", classes=("normal", "tumour"),
                                  probabilities=(0.2, 0.8), predicted="tumour"))
    return store


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(out: Path, downsample: float) -> None:
    """One whole slide, as the CLI does it; prints JSON with seconds and peak RSS."""
    from wsi.config import load_config
    from wsi.heatmap import HeatmapConfig, HeatmapParams, heatmap_slide, stored_scores
    from wsi.store import SlideStore, store_path

    store = SlideStore.open(store_path(out, "bench"))
    stored_scores(store, RUN)
    store.mask()
    floor = _rss_mb()
    config = load_config(overrides={"heatmap": {"downsample": downsample}})
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(config))
    t = time.perf_counter()
    paths = heatmap_slide(store, RUN, out, params)
    print(json.dumps({"seconds": time.perf_counter() - t, "rss_floor_mb": floor, "rss_peak_mb": _rss_mb(),
                      "bytes": {k: p.stat().st_size for k, p in paths.items()}}))


def parts(out: Path, downsample: float) -> dict:
    """Seconds of each output alone, through the same functions heatmap_slide calls."""
    from wsi.config import load_config
    from wsi.heatmap import HeatmapConfig, HeatmapParams, stored_scores
    from wsi.heatmap.geojson import feature_collection
    from wsi.heatmap.images import blend, save_overlay
    from wsi.heatmap.raster import TileValues, colour_table, normalise, render_rgba
    from wsi.heatmap.tiff import write_pyramid
    from wsi.store import SlideStore, store_path

    store = SlideStore.open(store_path(out, "bench"))
    config = load_config(overrides={"heatmap": {"downsample": downsample}})
    params = HeatmapParams.from_sections(HeatmapConfig.from_config(config))
    scores = stored_scores(store, RUN)
    table = colour_table(params.colormap)
    tiles = TileValues(scores.coords, scores.size, normalise(scores.attention, "percentile"))
    _, thumb, mask_ds = store.mask()
    scratch = out / "parts"
    scratch.mkdir(exist_ok=True)
    seconds = {}

    t = time.perf_counter()
    rgba = render_rgba(tiles, mask_ds, thumb.shape[1], thumb.shape[0], table,
                       params.smooth_sigma * params.downsample / mask_ds)
    save_overlay(scratch / "overlay.png", blend(thumb, rgba, params.alpha), title="bench", colormap="viridis",
                 bar_label="attention")
    seconds["thumbnail render + overlay.png"] = time.perf_counter() - t

    t = time.perf_counter()
    tumour = scores.class_scores[:, 1]
    doc = feature_collection(scores.coords, scores.size, {"attention": scores.attention,
                                                          "tumour probability": tumour},
                             tumour >= 0.5, "tumour", (220, 40, 40), "tumour region")
    (scratch / "tiles.geojson").write_text(json.dumps(doc, separators=(",", ":")))
    seconds["tiles.geojson"] = time.perf_counter() - t

    t = time.perf_counter()
    write_pyramid(scratch / "heatmap.tif", tiles, width0=store.slide.width, height0=store.slide.height,
                  mpp=(0.25, 0.25), downsample=params.downsample, sigma=params.smooth_sigma, table=table,
                  description={})
    seconds["heatmap.tif"] = time.perf_counter() - t
    return seconds


def tiff_memory(out: Path, downsample: float) -> dict:
    """Peak traced allocation while writing the pyramid, next to the base level and level 0 as RGBA arrays."""
    from wsi.heatmap import stored_scores
    from wsi.heatmap.raster import TileValues, colour_table, normalise
    from wsi.heatmap.tiff import pyramid_shapes, write_pyramid
    from wsi.store import SlideStore, store_path

    store = SlideStore.open(store_path(out, "bench"))
    scores = stored_scores(store, RUN)
    tiles = TileValues(scores.coords, scores.size, normalise(scores.attention, "percentile"))
    w0, h0 = store.slide.width, store.slide.height
    h, w, _ = pyramid_shapes(w0, h0, downsample)[0]
    tracemalloc.start()
    t = time.perf_counter()
    write_pyramid(out / "parts" / f"ds{downsample:g}.tif", tiles, width0=w0, height0=h0, mpp=(0.25, 0.25),
                  downsample=downsample, sigma=1.0, table=colour_table("viridis"), description={})
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"downsample": downsample, "seconds": seconds, "peak_mb": peak / 2**20,
            "base_rgba_mb": h * w * 4 / 2**20, "level0_rgba_mb": h0 * w0 * 4 / 2**20, "base": (w, h)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=20000)
    ap.add_argument("--downsample", type=float, default=32.0)
    ap.add_argument("--out", type=Path, default=HERE / "out" / "heatmap")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.out, args.downsample)
        return

    t = time.perf_counter()
    store = make_store(args.out, args.tiles)
    print(f"store: {store.n_tiles} tiles, slide {store.slide.width} x {store.slide.height} px "
          f"(made/opened in {time.perf_counter() - t:.1f} s)")
    shutil.rmtree(args.out / "heatmaps", ignore_errors=True)
    result = subprocess.run([sys.executable, __file__, "--child", "--out", str(args.out),
                             "--downsample", str(args.downsample)], capture_output=True, text=True, check=True)
    whole = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\nheatmap_slide, all outputs, downsample {args.downsample:g}: {whole['seconds']:.2f} s per slide "
          f"({store.n_tiles / whole['seconds']:.0f} tiles/s); peak RSS {whole['rss_peak_mb']:.0f} MB, "
          f"{whole['rss_peak_mb'] / whole['rss_floor_mb']:.2f}x the RSS after reading scores + mask "
          f"({whole['rss_floor_mb']:.0f} MB)")
    print("  files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in whole["bytes"].items()))

    seconds = parts(args.out, args.downsample)
    total = sum(seconds.values())
    print("\neach output alone (share of their sum):")
    for k, v in seconds.items():
        print(f"  {k:32s} {v:6.2f} s  {v / total:5.1%}")

    print("\npyramidal TIFF memory (streamed tile by tile):")
    for ds in (args.downsample, args.downsample / 4):
        m = tiff_memory(args.out, ds)
        print(f"  downsample {ds:>4g}: base {m['base'][0]} x {m['base'][1]}, {m['seconds']:.1f} s, peak traced "
              f"{m['peak_mb']:.1f} MB = {m['peak_mb'] / m['base_rgba_mb']:.3f}x the base level as one RGBA array "
              f"({m['base_rgba_mb']:.0f} MB), {m['peak_mb'] / m['level0_rgba_mb']:.5f}x level 0 "
              f"({m['level0_rgba_mb'] / 1024:.1f} GB)")


if __name__ == "__main__":
    main()
