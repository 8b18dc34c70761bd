"""Slide quality control benchmark: blur, folds and air bubbles found by :mod:`wsi.qc`, scored against truth by
construction, on the generator's slides and on real images; the cost of QC against a whole ``wsi tile``.

    python bench/qc.py [--tier generator real clean nofocus cost] [--families 5] [--slides 4] [--fresh]
                       [--seed-base N] [--dev] [--repeats 5] [--against CHECKOUT]
                       [--solid-mucin] [--thumbnail-only]

The design below was written into bench/RESULTS.md ("Slide quality control") before the first run; nothing in
``wsi/qc.py`` was tuned on these seeds (development used ``--dev``: seeds 9400+ of the same designs).

**generator** (families of ``--slides`` slides; family f uses seeds 8600 + 100 f on; ``--fresh`` adds one family
from a seed drawn at run time with ``secrets``): 8,000 x 6,000 px slides at 0.5 um/px (4 x 3 mm) drawn by
:func:`wsi_synth.write_synthetic_slide` with the four site profiles in turn (stain vectors, strengths, scanner
cast, JPEG quality 65-90), solid high-grade tumour on every other slide, mucin on every third, haemorrhage on
the odd ones, 0-2 lymphoid aggregates, tumour foci, fat in the main pieces; and defects from
:func:`wsi_synth.defects.draw_defects` over the main pieces: one blur region (sigma drawn from 0.5-3 um, Gaussian
and disk kernels in turn), a focus stripe (0 -> 3 um along its length) on every other slide, one fold
(80-250 um wide) and one bubble (120-350 um radius). The 8 um/px thumbnail and the tiles (256 px at 0.5 um/px) are
rendered as the writer renders those levels and pass through JPEG at the site's quality, as in a slide file;
the tissue mask, the kept tiles (tissue share >= 0.25), the focus features and the thumbnail defects come from the
functions ``wsi tile`` calls. Truth per tile (on a 4 um/px grid): the median blur sigma over its tissue, the
shares of its footprint in a fold and in a bubble, and its tissue class shares.

**real**: defects composited onto the real images of ``tests/data`` (:func:`wsi_synth.defects.composite`; the image
over its glass colour is the specimen): ``cmu_small_region.svs`` (0.499 um/px) and ``slide.jpeg`` (prostate,
about 0.5 um/px judged from its nuclei) at full resolution, each with two blur regions of known kernels (sigma
0.5-3 um, Gaussian or disk), one fold (60-150 um wide) and one bubble (80-200 um radius), JPEG q85; the tiles are
256 px, the thumbnail their 16x area average; and ``tma_spots.jpeg`` (dense dark tumour cores) and the needle
core of ``slide_with_ink.jpeg`` at 8 um/px, whose thumbnails take a fold and a bubble each (no tile pixels:
folds and bubbles only; 16-px blocks stand for tiles). Tissue truth: the mask of the clean image.

**clean** (added 2026-12-08): the four real images as they are, with no defect, as read and JPEG-coded at q95,
q85 and q75; every flag there is a false flag on clean tissue (the real tier scores composites only, and a gland
lumen of the needle core was seen read as a bubble at three of those codings).

**nofocus**: whole slides out of focus must fail (``no in-focus tissue``), sharp ones must not, through
``wsi.tiling.tile_slides``: 3,000 x 2,000 px slides at 0.5 um/px blurred everywhere (sigma 1.5, 2, 3 um,
Gaussian and disk) and the same scenes sharp.

**cost**: one 12,000 x 9,000 px slide at 0.5 um/px (``small``, 368 tiles: a biopsy) and, with ``--cost-slides``,
the same scene on a whole slide's 18 x 13.5 mm at 20x (``full20``, 36,000 x 27,000 px, 2,994 tiles) and at 40x
(``full40``, 72,000 x 54,000 px at 0.25 um/px, tiled at 0.5 um/px); whole ``python -m wsi.cli tile`` processes with
``tiling.qc`` off and flag (on the small slide also exclude, and coordinates-only off / flag), alternated,
``--repeats`` of each; the ratio of medians is the added cost, measured in one run. The process's fixed costs
(Python and its imports: about 0.4 CPU-s) weigh less on a whole slide, so the ratio grows with the slide.
``--against CHECKOUT`` adds that checkout's QC off and flag to every round, and the two checkouts' added CPU
(median flag - median off) side by side; paired by round, the flag CPU this checkout saves (median and sd of the
rounds), beside the same pairing of the two ``off`` processes (QC's code does not run there: what the machine
alone makes pairs differ, so a saving under about its sd / sqrt(rounds) cannot be told from noise).

Figures: blur AUROC (tiles with sigma >= 1.5 um against sharp tiles, the detector 1 - focus score, a tile not
judged counting as sharp), blur recall by sigma, false flags (any flag) on sharp tiles overall and on dense
tumour, fat and mucin (>= half the tile), fold recall (>= half the tile in a fold) and false fold flags (tiles
with no fold), bubble recall (>= half in a bubble) and false bubble flags; per family, then min and mean.
Added beside them (second run, qc2; the first definitions are kept and still the headline): the blur AUROC over
the tiles the detector scored (a tile it leaves unscored, NaN, neither positive nor negative) with the share of
positives left unscored, and the fold recall over fold tiles under 10% fat. Added (third, sharpff, 2026-12-07): every
rate pooled over the families or seeds (numerators and denominators summed) with its Wilson 95% interval: a family's
few tiles of a class (10-75) cannot tell 1% from 3%, a pool of families can. ``--solid-mucin`` (added 2026-12-07)
draws solid tumour and mucin on every generator slide, where a tumour sheet may lie beside mucin of its hue;
``--thumbnail-only`` renders no tiles (folds and bubbles alone, ten times faster; no blur or any-flag figures).
Added (fourth, sharpff2, 2026-12-08): the blur flags among the flags on sharp, clean dense tumour, fat and mucin
tiles (``false_blur_<class>``; the rest of each class's flags are fold and bubble flags, ``fold_false_<class>``
counting fold flags on every tile of the class without a fold).
A generator slide whose scene cannot be laid out (no room for a hard case) is skipped with a one-line note, and
its family is scored on the rest (added 2026-12-07: seed 439600 had stopped the whole tier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MPP = 0.5
TILE = 256
THUMB_DS = 16  # 8 um/px, tissue.mask_mpp
TRUTH_DS = 8  # per-tile truth on a 4 um/px grid
FAMILY_BASE, FAMILY_STEP, DEV_BASE = 8600, 100, 9400
SITES = ("A", "B", "C", "D")


# ---------------------------------------------------------------------------------------------- generator
def cohort(seed_base: int, n: int, solid_mucin: bool = False) -> list[tuple[str, dict, dict]]:
    """(name, write_synthetic_slide kwargs, draw_defects kwargs) for ``n`` slides from ``seed_base``; with
    ``solid_mucin`` every slide holds solid tumour and mucin (otherwise one slide in six holds both)."""
    from wsi_synth import SITE_PROFILES, HardCases

    rng = np.random.default_rng(seed_base)
    out = []
    for i in range(n):
        hard = HardCases(solid_tumours=int(solid_mucin or i % 2 == 0), mucin=int(solid_mucin or i % 3 == 0),
                         haemorrhage=int(i % 2 == 1))
        kwargs = dict(width=8000, height=6000, mpp=MPP, seed=seed_base + i, tumour_tiles=int(rng.integers(1, 4)),
                      lymphoid_aggregates=int(rng.integers(0, 3)), hard=hard, site=SITE_PROFILES[SITES[i % 4]])
        defects = dict(blur=1, stripes=int(i % 2 == 0), folds=1, bubbles=1, sigma_um=(0.5, 3.0),
                       kernels=("gaussian",) if i % 2 == 0 else ("disk",))
        out.append((f"s{seed_base + i}", kwargs, defects))
    return out


def jpeg(rgb: np.ndarray, quality: int = 85) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=quality,
                                                             outcolorspace="YCBCR", subsampling="420"))


def generated(name: str, kwargs: dict, defect_kwargs: dict, tiles: bool = True) -> dict:
    """Render one slide's thumbnail and kept tiles (``tiles``; else the thumbnail alone: folds and bubbles, no
    focus), run QC as ``wsi tile`` does, and gather per-tile truth."""
    from wsi_synth import defects as demo_defects
    from wsi_synth import write_synthetic_slide

    quality = kwargs["site"].jpeg_quality
    plain = write_synthetic_slide(Path(f"{name}.svs"), write=False, **kwargs)
    rng = np.random.default_rng([kwargs["seed"], 0xDEF])
    defects = demo_defects.draw_defects(plain.tissue_boxes, plain.width, plain.height, MPP, rng, **defect_kwargs)
    slide = write_synthetic_slide(Path(f"{name}.svs"), write=False, defects=defects, **kwargs)
    thumb = jpeg(slide.render_level(THUMB_DS, 0, 0, math.ceil(slide.width / THUMB_DS),
                                    math.ceil(slide.height / THUMB_DS)), quality)
    truth = slide.truth_masks(TRUTH_DS)
    cols, rows = slide.width // TILE, slide.height // TILE

    def render(x: int, y: int) -> np.ndarray:
        return jpeg(slide.render_level(1, x, y, TILE, TILE), quality)

    return run_qc(name, thumb, THUMB_DS, cols, rows, render if tiles else None, truth, TRUTH_DS)


def run_qc(name: str, thumb: np.ndarray, thumb_ds: float, cols: int, rows: int, render, truth: dict,
           truth_ds: float, tissue_fn=None) -> dict:
    """QC of one image as the tiler runs it: mask, kept tiles, focus of the tiles ``render(x, y)`` gives (None:
    thumbnail-only), thumbnail defects, flags; with per-tile truth from ``truth`` (masks on a ``truth_ds`` grid)."""
    from wsi import qc
    from wsi.tissue import TissueParams, tissue_fractions, tissue_masks

    params = TissueParams.default()
    mpp = thumb_ds * MPP
    start = time.perf_counter()
    mask = tissue_masks(thumb, mpp, params).tissue if tissue_fn is None else tissue_fn(thumb)
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    coords = np.stack([xs.ravel() * TILE, ys.ravel() * TILE], axis=1).astype(np.int64)
    fractions = tissue_fractions(mask, thumb_ds, coords, TILE)
    keep = fractions >= 0.25
    coords, fractions = coords[keep], fractions[keep]
    defects = qc.thumbnail_defects(thumb, mask, mpp, glass_field_um=params.glass_field_um)
    shares = qc.defect_shares(defects, thumb_ds, coords, TILE)
    if render is not None:
        sharp, struct = qc.focus_features(np.stack([render(int(x), int(y)) for x, y in coords]))
    else:  # thumbnail only: no focus (every tile judged sharp and left unflagged)
        sharp, struct = np.full(len(coords), 5.0, np.float32), np.full(len(coords), 100.0, np.float32)
    result = qc.assess(sharp, struct, *shares, fractions, coords, TILE)
    seconds = time.perf_counter() - start
    tt = tile_truth(truth, truth_ds, coords)
    return {"name": name, "seconds": seconds, "focus": result.focus, "blur": result.blur, "fold": result.fold,
            "bubble": result.bubble, "in_focus": result.in_focus, "truth": tt, "has_tiles": render is not None}


def tile_truth(truth: dict, ds: float, coords: np.ndarray) -> dict:
    """Per tile: ``sigma`` (median blur um over its tissue pixels), shares of ``fold``, ``bubble`` and of the
    tissue classes."""
    side = int(round(TILE / ds))
    out = {k: np.zeros(len(coords), np.float32) for k in ("sigma", "sigma_max", "fold", "bubble", "tumour", "fat",
                                                          "mucin", "tissue")}
    blur = truth.get("blur_um")
    for i, (x, y) in enumerate(coords):
        r0, c0 = int(round(y / ds)), int(round(x / ds))
        box = (slice(r0, r0 + side), slice(c0, c0 + side))
        tissue = truth["tissue"][box]
        for k in ("fold", "bubble", "tumour", "fat", "mucin", "tissue"):
            if k in truth:
                out[k][i] = truth[k][box].mean() if truth[k][box].size else 0
        if blur is not None and blur[box].size:
            b = blur[box]
            out["sigma"][i] = float(np.median(b[tissue])) if tissue.any() else float(np.median(b))
            out["sigma_max"][i] = float(b.max())
    return out


# ---------------------------------------------------------------------------------------------- real images
def real_images() -> list[tuple[str, np.ndarray, float]]:
    """(name, RGB, um/px) of the real images."""
    from PIL import Image

    from wsi.slide import open_slide

    with open_slide(DATA / "cmu_small_region.svs") as s:
        cmu, um = s.read_region(0, 0, 0, s.width, s.height), s.mpp_x
    prostate = np.asarray(Image.open(DATA / "slide.jpeg").convert("RGB"))
    tma = np.asarray(Image.open(DATA / "tma_spots.jpeg").convert("RGB"))
    core = np.asarray(Image.open(DATA / "slide_with_ink.jpeg").convert("RGB"))[:, :3400]
    return [("cmu", cmu, um), ("prostate", prostate, 0.5), ("tma", tma, 8.0), ("needle", core, 8.0)]


def real_case(name: str, rgb: np.ndarray, um: float, seed: int | None, quality: int | None = 85) -> dict:
    """One composite of a real image, QC'd; see the module docstring. ``seed`` None: the image with no defect
    (the clean tier); ``quality`` None: not re-coded."""
    import cv2

    from wsi.tissue import TissueParams, tissue_masks
    from wsi_synth import defects as dd

    rng = np.random.default_rng(seed)
    params = TissueParams.default()
    full = um < 2
    h, w = rgb.shape[:2]
    px = 1 / um
    if full:
        small = cv2.resize(rgb, (w // THUMB_DS, h // THUMB_DS), interpolation=cv2.INTER_AREA)
        tissue_small = tissue_masks(small, um * THUMB_DS, params).tissue
        tissue = cv2.resize(tissue_small.view(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).view(bool)
    else:
        tissue = tissue_masks(rgb, um, params).tissue
    ys, xs = np.nonzero(cv2.erode(tissue.view(np.uint8), np.ones((5, 5), np.uint8)))

    def spot():
        i = int(rng.integers(len(xs)))
        return float(xs[i]), float(ys[i])

    defects = []
    if seed is not None:
        if full:
            for k in range(2):
                cx, cy = spot()
                defects.append(dd.BlurRegion(cx, cy, rng.uniform(150, 300) * px, rng.uniform(150, 300) * px,
                                             rng.uniform(0, math.pi), rng.uniform(0.5, 3.0) * px,
                                             kernel=("gaussian", "disk")[(seed + k) % 2], ramp=20 * px,
                                             seed=int(rng.integers(1, 2 ** 31))))
        cx, cy = spot()
        defects.append(dd.Fold(cx, cy, rng.uniform(0, math.pi), rng.uniform(300, 800) * px, rng.uniform(60, 150) * px,
                               line_width=rng.uniform(2, 4) * px if full else 1.0, line_density=rng.uniform(1.0, 2.0)))
        cx, cy = spot()
        defects.append(dd.Bubble(cx, cy, rng.uniform(80, 200) * px, rim=max(rng.uniform(10, 20) * px, 1.0),
                                 rim_density=rng.uniform(0.45, 0.7), magnify=rng.uniform(1.03, 1.12),
                                 sigma=rng.uniform(1.5, 4) * px, contrast=rng.uniform(0.6, 0.85)))
    image = dd.composite(rgb, defects) if defects else rgb
    image = image if quality is None else jpeg(image, quality)
    truth = {"tissue": tissue, **dd.composite_truth(tissue, defects)}
    truth["blur_um"] = truth.pop("blur_sigma") * um
    if full:
        thumb = cv2.resize(image, (w // THUMB_DS, h // THUMB_DS), interpolation=cv2.INTER_AREA)
        return run_qc(f"{name}:{seed}:{quality}", thumb, THUMB_DS, w // TILE, h // TILE,
                      lambda x, y: image[y:y + TILE, x:x + TILE], truth, 1.0)
    # an 8 um/px image is its own thumbnail; tiles of 256 px at 0.5 um/px are 16 of its pixels
    return run_qc(f"{name}:{seed}:{quality}", image, THUMB_DS, w // 16, h // 16, None, truth, THUMB_DS)


# ---------------------------------------------------------------------------------------------- scoring
def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    values = np.concatenate([pos, neg])
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for v in np.unique(values):  # ties share their mean rank
        tied = values == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def score(cases: list[dict]) -> dict:
    """The figures of a list of QC'd images (see the module docstring)."""
    cat = {k: np.concatenate([c["truth"][k] for c in cases]) for k in cases[0]["truth"]}
    flags = {k: np.concatenate([c[k] for c in cases]) for k in ("blur", "fold", "bubble")}
    focus = np.concatenate([c["focus"] for c in cases])
    tiles = np.concatenate([np.full(len(c["focus"]), c["has_tiles"]) for c in cases])
    anyflag = flags["blur"] | flags["fold"] | flags["bubble"]
    clean = (cat["sigma_max"] == 0) & (cat["fold"] == 0) & (cat["bubble"] == 0)
    out = {"tiles": int(len(focus))}

    def rate(num, den):
        return (float(num.sum()) / float(den.sum()), int(num.sum()), int(den.sum())) if den.sum() else None

    if tiles.any():
        detector = 1 - np.nan_to_num(focus, nan=1.0)
        pos = tiles & (cat["sigma"] >= 1.5) & (cat["fold"] == 0) & (cat["bubble"] == 0)
        neg = tiles & clean
        out["blur_auroc"] = auroc(detector[pos], detector[neg])
        scored = ~np.isnan(focus)  # second definition (added 2026-12-06, qc2): only the tiles the detector scored
        out["blur_auroc_scored"] = auroc(detector[pos & scored], detector[neg & scored])
        out["blur_unscored_positives"] = rate(pos & ~scored, pos)
        out["blur_recall_1.5"] = rate(flags["blur"] & pos, pos)
        for lo, hi in ((0.5, 1.0), (1.0, 1.5), (1.5, 2.0), (2.0, 3.1)):
            band = tiles & (cat["sigma"] >= lo) & (cat["sigma"] < hi) & (cat["fold"] == 0) & (cat["bubble"] == 0)
            out[f"blur_recall_{lo}-{hi}"] = rate(flags["blur"] & band, band)
        out["false_flags_sharp"] = rate(anyflag & neg, neg)
        out["false_blur_sharp"] = rate(flags["blur"] & neg, neg)
        for k in ("tumour", "fat", "mucin"):
            sel = neg & (cat[k] >= 0.5)
            out[f"false_flags_{k}"] = rate(anyflag & sel, sel)
            out[f"false_blur_{k}"] = rate(flags["blur"] & sel, sel)  # the blur flags among them (added 2026-12-08)
    fold_pos, fold_neg = cat["fold"] >= 0.5, cat["fold"] == 0
    out["fold_recall"] = rate(flags["fold"] & fold_pos, fold_pos)
    lean = fold_pos & (cat["fat"] < 0.1)  # a breakdown (added 2026-12-06, qc2): fold tiles under 10% fat
    out["fold_recall_under_10pct_fat"] = rate(flags["fold"] & lean, lean)
    out["fold_false"] = rate(flags["fold"] & fold_neg, fold_neg)
    for k in ("tumour", "fat", "mucin"):
        sel = fold_neg & (cat[k] >= 0.5)
        out[f"fold_false_{k}"] = rate(flags["fold"] & sel, sel)
    bub_pos, bub_neg = cat["bubble"] >= 0.5, cat["bubble"] == 0
    out["bubble_recall"] = rate(flags["bubble"] & bub_pos, bub_pos)
    out["bubble_false"] = rate(flags["bubble"] & bub_neg, bub_neg)
    out["seconds_per_image"] = float(np.mean([c["seconds"] for c in cases]))
    return out


def show(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for k, v in figures.items():
        if isinstance(v, tuple):
            print(f"  {k:24s} {v[0]:.4f} ({v[1]}/{v[2]})")
        elif isinstance(v, float):
            print(f"  {k:24s} {v:.4f}")
        else:
            print(f"  {k:24s} {v}")


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a rate of ``k`` in ``n`` (0 to 1): unlike k/n +- 2 s.e. it stays inside [0, 1]
    and is not zero-width at k = 0, where the families' few tiles of a class put most of their rates."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def pooled(per_family: list[dict]) -> dict:
    """Each rate pooled over families (numerators and denominators summed) with its Wilson 95% interval:
    (rate, k, n, low, high)."""
    out = {}
    for key in per_family[0]:
        counts = [f[key] for f in per_family if isinstance(f.get(key), tuple)]
        if counts:
            k, n = sum(c[1] for c in counts), sum(c[2] for c in counts)
            out[key] = (k / n if n else math.nan, k, n, *wilson(k, n))
    return out


def show_pooled(title: str, per_family: list[dict]) -> None:
    print(f"\n{title}")
    for key, (rate, k, n, low, high) in pooled(per_family).items():
        print(f"  {key:24s} {rate:.4f} ({k}/{n}) Wilson 95% {low:.4f}-{high:.4f}")


def summarise(per_family: list[dict]) -> dict:
    """min and mean over families of each figure (rates as shares)."""
    out = {}
    for k in per_family[0]:
        vals = [f[k][0] if isinstance(f[k], tuple) else f[k] for f in per_family if f.get(k) is not None]
        vals = [v for v in vals if isinstance(v, float | int) and not (isinstance(v, float) and math.isnan(v))]
        if vals:
            out[k] = (min(vals), float(np.mean(vals)), max(vals))
    return out


# ---------------------------------------------------------------------------------------------- tiers
def tier_generator(families: list[int], n: int, solid_mucin: bool = False, tiles: bool = True) -> dict:
    from wsi.errors import ConfigError

    results = {}
    for base in families:
        cases = []
        for case in cohort(base, n, solid_mucin):
            try:
                cases.append(generated(*case, tiles=tiles))
            except ConfigError as err:  # a scene the generator cannot lay out (no room for a hard case): said, skipped
                print(f"skipped: {err}", flush=True)
        if not cases:
            continue
        results[base] = score(cases)
        show(f"generator family {base} ({len(cases)} slides)", results[base])
    return results


def tier_real(seeds: list[int]) -> dict:
    images = real_images()
    results = {}
    for seed in seeds:
        cases = [real_case(name, rgb, um, seed * 10 + i) for i, (name, rgb, um) in enumerate(images)]
        results[seed] = score(cases)
        show(f"real composites, seed {seed}", results[seed])
    return results


def tier_clean() -> dict:
    """Each real image with no defect at four codings (as read, JPEG q95, q85, q75): every flag is a false flag
    on clean tissue."""
    results = {}
    for name, rgb, um in real_images():
        for quality in (None, 95, 85, 75):
            case = real_case(name, rgb, um, None, quality)
            flags = {k: int(case[k].sum()) for k in ("blur", "fold", "bubble")}
            flags["any"] = int((case["blur"] | case["fold"] | case["bubble"]).sum())
            key = f"{name}:{'as read' if quality is None else f'q{quality}'}"
            results[key] = {"tiles": len(case["focus"]), **flags}
            counts = "  ".join(f"{k} {v}" for k, v in flags.items())
            print(f"  clean {key:16s} tiles {len(case['focus']):5d}  {counts}", flush=True)
    total = {k: sum(r[k] for r in results.values()) for k in ("tiles", "blur", "fold", "bubble", "any")}
    low, high = wilson(total["any"], total["tiles"])
    print(f"  clean, all images and codings: {total['any']}/{total['tiles']} tiles flagged "
          f"({total['any'] / total['tiles']:.4f}, Wilson 95% {low:.4f}-{high:.4f})")
    return results


def tier_nofocus(work: Path) -> dict:
    from wsi.config import load_config
    from wsi.tiling import TileConfig, tile_slides
    from wsi_synth import defects as dd
    from wsi_synth import write_synthetic_slide

    slides = work / "nofocus"
    shutil.rmtree(slides, ignore_errors=True)
    cases = [(0.0, "gaussian"), (1.5, "gaussian"), (2.0, "disk"), (3.0, "gaussian"), (1.5, "disk")]
    expected = {}
    for i, (sigma, kernel) in enumerate(cases):
        for sharp_twin in (False, True):
            name = f"n{i}{'s' if sharp_twin else 'b'}"
            defects = [] if sharp_twin or sigma == 0 else [dd.BlurRegion(1500, 1000, 1e5, 1e5, 0, sigma / MPP,
                                                                          kernel=kernel, ramp=0)]
            write_synthetic_slide(slides / f"{name}.svs", width=3000, height=2000, mpp=MPP, seed=8500 + i,
                                  defects=defects, tumour_tiles=1)
            expected[name] = bool(defects)
    config = load_config()
    tiled = tile_slides(work / "nofocus-out", TileConfig.from_config(config), sorted(slides.glob("*.svs")),
                        progress=False)
    failed = {item["slide_id"]: (item["cause"] or "") for item in tiled.items()}
    right = sum((("no in-focus tissue" in failed[k]) == v) for k, v in expected.items())
    print(f"\nnofocus: {right}/{len(expected)} slides called right")
    for k, v in sorted(expected.items()):
        print(f"  {k}: blurred={v} -> {failed[k] or 'tiled'}")
    return {"right": right, "total": len(expected)}


def _checkout_env(code: Path, cwd: Path) -> dict:
    """The environment under which a process started in ``cwd`` imports the ``wsi`` of checkout ``code``; raises if
    it would import another. ``python -m`` and ``-c`` put their working folder ahead of ``PYTHONPATH``: started from
    a checkout's root they import that checkout's ``wsi``, whatever ``PYTHONPATH`` says (so until 2026-12-07 every
    ``--against`` run from a checkout compared that checkout with itself)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    found = subprocess.run([sys.executable, "-c", "import wsi; print(wsi.__file__)"], check=True, capture_output=True,
                           text=True, env=env, cwd=cwd).stdout.strip()
    if Path(found).resolve().parent.parent != Path(code).resolve():
        raise SystemExit(f"bench/qc.py: a process meant to run {code}'s wsi imports {found}")
    return env


def _tile_process(slide: Path, out: Path, mode: str, pixels: bool, env: dict) -> tuple[float, float, float]:
    """One whole ``python -m wsi.cli tile`` of ``slide`` under ``env`` (:func:`_checkout_env`), started in ``out``'s
    parent: wall seconds, CPU seconds (user + system: what the process itself cost, whatever the load) and peak RSS
    in MB."""
    shutil.rmtree(out, ignore_errors=True)
    timer = shutil.which("time") or "/usr/bin/time"
    start = time.perf_counter()
    command = [timer, "-f", "%M %U %S", sys.executable, "-m", "wsi.cli", "tile", str(slide), "--out", str(out),
               "--set", f"tiling.qc={mode}", "--set", f"tiling.store_pixels={str(pixels).lower()}"]
    done = subprocess.run(command, check=True, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.perf_counter() - start
    kb, user, system = done.stderr.strip().splitlines()[-1].split()
    return wall, float(user) + float(system), int(kb) / 1024


def _spread(values: np.ndarray) -> float:
    """The sample standard deviation of per-round figures (0 for a single round)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


COST_SLIDES = {  # name: (width, height, um/px), the same scene (seed 8400) at each size
    "small": (12000, 9000, MPP),  # 6 x 4.5 mm at 20x: 368 tiles, a biopsy
    "full20": (36000, 27000, MPP),  # 18 x 13.5 mm at 20x: 2,994 tiles, a whole resection slide
    "full40": (72000, 54000, MPP / 2),  # the same 18 x 13.5 mm scanned at 40x, tiled at 0.5 um/px: 2,995 tiles
}


def tier_cost(work: Path, repeats: int = 5, against: Path | None = None, slides=("small",)) -> dict:
    """QC's added cost in whole ``wsi tile`` processes, every case alternated in each of ``repeats`` rounds (every
    other round in reverse order), on each of ``slides`` (:data:`COST_SLIDES`; made once under ``work``). On the
    small slide, ``exclude`` and a coordinates-only store join ``off`` and ``flag``. With ``against`` (another
    checkout), that checkout's QC off and flag join each round too, and the figure is the two checkouts' added CPU
    side by side: one run, so the machine's load weighs on both alike."""
    from wsi_synth import HardCases, write_synthetic_slide

    paths = {}
    (work / "cost").mkdir(parents=True, exist_ok=True)
    for name in slides:
        width, height, um = COST_SLIDES[name]
        paths[name] = work / "cost" / ("cost.svs" if name == "small" else f"cost-{name}.svs")
        if not paths[name].exists():
            write_synthetic_slide(paths[name], width=width, height=height, mpp=um, seed=8400, tumour_tiles=3,
                                  lymphoid_aggregates=2, hard=HardCases(solid_tumours=1, mucin=1, haemorrhage=1))
    cases = []
    for name in slides:
        cases += [(name, ROOT, "off", True), (name, ROOT, "flag", True)]
        if name == "small":
            cases += [(name, ROOT, "exclude", True), (name, ROOT, "off", False), (name, ROOT, "flag", False)]
        if against is not None:
            cases += [(name, against, "off", True), (name, against, "flag", True)]
    seconds: dict = {c: [] for c in cases}
    rss: dict = {c: [] for c in cases}
    cpu: dict = {c: [] for c in cases}
    envs = {code: _checkout_env(code, work / "cost") for code in {c[1] for c in cases}}
    for round_ in range(repeats):
        # every other round in reverse: no case always follows the same one (a process straight after another
        # slide's, or first of its round, meets another cache and load)
        for case in cases if round_ % 2 == 0 else cases[::-1]:
            name, code, mode, pixels = case
            wall, used, peak = _tile_process(paths[name], work / "cost" / "out", mode, pixels, envs[code])
            seconds[case].append(wall)
            cpu[case].append(used)
            rss[case].append(peak)
    med = {c: float(np.median(v)) for c, v in seconds.items()}
    mcpu = {c: float(np.median(v)) for c, v in cpu.items()}
    out: dict = {}
    for name in slides:
        figures = {"flag/off (pixels)": med[(name, ROOT, "flag", True)] / med[(name, ROOT, "off", True)],
                   "flag/off (pixels), CPU": mcpu[(name, ROOT, "flag", True)] / mcpu[(name, ROOT, "off", True)],
                   "added CPU s (pixels)": mcpu[(name, ROOT, "flag", True)] - mcpu[(name, ROOT, "off", True)]}
        if name == "small":
            figures.update({
                "exclude/off (pixels)": med[(name, ROOT, "exclude", True)] / med[(name, ROOT, "off", True)],
                "flag/off (coordinates only)": med[(name, ROOT, "flag", False)] / med[(name, ROOT, "off", False)],
                "exclude/off (pixels), CPU": mcpu[(name, ROOT, "exclude", True)] / mcpu[(name, ROOT, "off", True)],
                "flag/off (coordinates only), CPU": (mcpu[(name, ROOT, "flag", False)]
                                                     / mcpu[(name, ROOT, "off", False)])})
        if against is not None:
            theirs = mcpu[(name, against, "flag", True)] - mcpu[(name, against, "off", True)]
            # paired by round (each round's processes meet the same load): what this checkout's flag process
            # saves on the other's, against the other's added CPU
            pairs = np.subtract(cpu[(name, against, "flag", True)], cpu[(name, ROOT, "flag", True)])
            saved = float(np.median(pairs))
            # what the instrument can resolve: the same pairing of the two checkouts' ``off`` processes, whose QC
            # code does not run, spreads as much as the machine makes whole processes vary
            control = np.subtract(cpu[(name, against, "off", True)], cpu[(name, ROOT, "off", True)])
            figures.update({"against: flag/off (pixels), CPU": (mcpu[(name, against, "flag", True)]
                                                                 / mcpu[(name, against, "off", True)]),
                            "against: added CPU s (pixels)": theirs,
                            "added CPU, this / against": figures["added CPU s (pixels)"] / theirs,
                            "flag CPU saved on against, median of rounds, s": saved,
                            "flag CPU saved / against's added CPU": saved / theirs,
                            "flag CPU saved, sd of rounds, s": _spread(pairs),
                            "off CPU, against less this (same code), median of rounds, s": float(np.median(control)),
                            "off CPU, against less this, sd of rounds, s": _spread(control)})
        figures["peak_rss_mb"] = {f"{'' if code == ROOT else 'against '}{mode}/{'pixels' if pixels else 'coordinates'}":
                                  max(rss[(n, code, mode, pixels)])
                                  for (n, code, mode, pixels) in cases if n == name}
        out[name] = figures
    print("\ncost (whole `wsi tile` processes, median of", repeats, "each, seconds of wall clock and of CPU):")
    for c, v in seconds.items():
        code = "" if c[1] == ROOT else f"{c[1]} "
        print(f"  {c[0]:6s} {code}qc={c[2]:8s} pixels={c[3]!s:5s} wall {' '.join(f'{s:.2f}' for s in v)}  median "
              f"{med[c]:.2f}; CPU {' '.join(f'{s:.2f}' for s in cpu[c])}  median {mcpu[c]:.2f}; peak RSS "
              f"{max(rss[c]):.0f} MB")
    for name, figures in out.items():
        for k, v in figures.items():
            if k != "peak_rss_mb":
                print(f"  {name} {k}: {v:.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", nargs="+", default=["generator", "real", "clean", "nofocus", "cost"],
                        choices=("generator", "real", "clean", "nofocus", "cost"))
    parser.add_argument("--families", type=int, default=5)
    parser.add_argument("--slides", type=int, default=4, help="slides per generator family")
    parser.add_argument("--fresh", action="store_true", help="add a family drawn at run time")
    parser.add_argument("--solid-mucin", action="store_true",
                        help="generator: every slide holds solid tumour and mucin (one in six otherwise)")
    parser.add_argument("--thumbnail-only", action="store_true",
                        help="generator: no tiles rendered: folds and bubbles alone (no focus, so no blur and no "
                             "any-flag figures), some ten times faster")
    parser.add_argument("--seed-base", type=int, help="first family's seed (default 8600)")
    parser.add_argument("--dev", action="store_true", help="development seeds (9400+), never the reported ones")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "qc")
    parser.add_argument("--repeats", type=int, default=5, help="cost: rounds, each case once per round")
    parser.add_argument("--against", type=Path, help="cost: another checkout whose QC joins every round")
    parser.add_argument("--cost-slides", nargs="+", default=["small"], choices=tuple(COST_SLIDES),
                        help="cost: the slides measured (full20 and full40 take 1 and 4 minutes to make, once)")
    args = parser.parse_args()
    base = args.seed_base if args.seed_base is not None else (DEV_BASE if args.dev else FAMILY_BASE)
    families = [base + FAMILY_STEP * f for f in range(args.families)]
    if args.fresh:
        families.append(10_000 + secrets.randbelow(10 ** 6))
        print(f"fresh family seed: {families[-1]}")
    args.work.mkdir(parents=True, exist_ok=True)
    report = {}
    if "generator" in args.tier:
        report["generator"] = {str(k): v for k, v in tier_generator(families, args.slides, args.solid_mucin,
                                                                          not args.thumbnail_only).items()}
        show("generator: min / mean / max over families", summarise(list(report["generator"].values())))
        show_pooled("generator: pooled over families", list(report["generator"].values()))
    if "real" in args.tier:
        report["real"] = {str(k): v for k, v in tier_real(families).items()}
        show("real: min / mean / max over seeds", summarise(list(report["real"].values())))
        show_pooled("real: pooled over seeds", list(report["real"].values()))
    if "clean" in args.tier:
        report["clean"] = tier_clean()
    if "nofocus" in args.tier:
        report["nofocus"] = tier_nofocus(args.work)
    if "cost" in args.tier:
        report["cost"] = tier_cost(args.work, args.repeats, args.against, args.cost_slides)
    (args.work / ("results-dev.json" if args.dev else "results.json")).write_text(json.dumps(report, indent=1,
                                                                                              default=str))


if __name__ == "__main__":
    main()
