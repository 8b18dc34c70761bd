"""Tissue-detection benchmark: the tissue mask scored against known truth on three families of hard images.

    python bench/tissue.py [--family generator edge real inkfold] [--slides 16] [--seed-base N] [--old REV]

**generator** (seeds 7000+, used by no test): what tissue detection gets wrong on real slides, spread over 16 or
more 8 x 6 mm slides at 0.5 um/px: solid high-grade tumour sheets (as dark and blue as a real dense tumour
core), small tumour foci, lymphoid aggregates, haemorrhage (as red as red ink), mucin, fat, pale stroma, marker
strokes of every colour along and across tissue, dust, debris and smudges, stitched scanner fields of grey glass
with brightness steps beside white unscanned padding, and grey, yellow and blue glass casts, with stain
strengths varying by slide.

**edge** (seeds 7100+; designed before its first run, never tuned on): the generator family's slides, each with
one or two marker strokes of a random colour from the slide's middle out past one of its edges (every other one
fading into a halo of 30-120 um at 0.1-0.3 of the ink's density, two dust specks of 8-30 um beside each), and a
dense marker blot (150-350 um half-wide, 200-800 um long) on a main piece's rim, fading into a halo of 100-300
um at 0.15-0.4 of the ink's density.

**real** (seeds 7200+; designed before its first run, never tuned on): marker ink composited onto the real
images of ``tests/data`` (see :func:`real_composites`): the needle core of ``slide_with_ink.jpeg`` left of its
own blot and halo, ``tma_spots.jpeg``, both at 8 um/px, and ``cmu_small_region.svs`` area-averaged to 2 um/px.
Each composite gets a stroke off the edge, a stroke across tissue, a blot with a halo and dust, the ink's
optical density added to what lies under it (Beer-Lambert), none of it over white padding (never imaged).
The tissue truth of a real image is the mask of the **clean** image by the revision before this family
existed (``TRUTH_REV``): what the family measures is what the ink changes, and a mask's own judgement of clean
real tissue is left to the tests on the clean images. Dense dark cores (red under 0.8 of blue, mean under 140,
inside that truth) stand for tumour.

**inkfold** (seeds 7300+; designed before its first run, never tuned on): tissue folds over dense tumour, which
must stay tissue, and marker ink over dense tumour, which must go (see :func:`inkfold_images`). For each seed,
one generator slide (16,000 x 12,000 px at 0.5 um/px, 1-2 solid high-grade tumour sheets, the site profiles in
turn, each sheet with a fold through it drawn by :class:`wsi_synth.defects.Fold`) and one composite of
``tma_spots.jpeg`` (1-2 folds through its dense dark cores, drawn by :func:`wsi_synth.defects.composite`, as
``bench/qc.py``'s real tier draws them); on every other seed, a black or blue marker stroke through a solid sheet
or a dense core as well. Figures per image: the ink-free tumour's share the mask calls ink, tumour recall,
tumour tiles lost (>= 25% ink-free tumour, dropped), the share of the ink over tissue kept as tissue.

Each generator slide's 8 um/px thumbnail is rendered exactly as the writer renders that pyramid level, and
every image passes through the same JPEG encoding (quality 85, YCbCr 4:2:0) that the slide files use; writing
every slide's level 0 would cost minutes a slide and change nothing the mask sees. ``--seed-base`` draws a
family afresh (seeds nothing has used). The mask is scored on the truth of the same grid:

* tissue recall: share of tissue pixels (not under ink) kept, per slide; per class (tumour, stroma, fat,
  haemorrhage, mucin, lymphoid) over the cohort;
* bad tiles: the tiler's 256 px tiles at 0.5 um/px that the mask keeps (tissue share >= min_tissue_fraction)
  though next to none of them is tissue free of ink (less than half of min_tissue_fraction), named after what
  covers most of them: ink, dust/smudge, or glass/padding; and, apart, the rim tiles whose true tissue share
  falls just short of min_tissue_fraction (12-25%), which the outline's last pixel decides;
* lost tiles: tiles with half or more ink-free tissue, or a quarter or more tumour, that the mask drops;
* ink kept: share of the ink on glass (ink and halo, no tissue under it) that the mask keeps as tissue;
* ink over tissue kept: share of the strokes over tissue (not their halos) that the mask keeps as tissue;
* seconds per slide of the mask.

The same numbers for the tissue detector of an older revision (``--old``, default the one before the ink off
the edge and halos) are printed beside them, measured in this run.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MPP = 0.5
THUMB_DS = 16  # 8 um/px, the default tissue.mask_mpp
CLASSES = ("tumour", "stroma", "fat", "blood", "mucin", "lymphoid")
CASTS = ((242.0, 241.0, 245.0), (236.0, 232.0, 214.0), (228.0, 234.0, 246.0), (246.0, 246.0, 246.0))
SEED_BASES = {"generator": 7000, "edge": 7100, "real": 7200, "inkfold": 7300}
TRUTH_REV = "be551c4"  # the mask whose judgement of a clean real image is the real family's tissue truth


def cohort(n: int, seed_base: int, edge: bool):
    """(name, write_synthetic_slide kwargs) for ``n`` slides: every hard case spread over the cohort; ``edge``
    adds strokes off the edge (with dust beside them) and a blot with a halo to every slide."""
    from wsi_synth import HardCases

    rng = np.random.default_rng(seed_base)
    slides = []
    for i in range(n):
        tumour = i % 2 == 0
        hard = HardCases(solid_tumours=int(rng.integers(1, 3)) if tumour else 0,
                         haemorrhage=int(rng.integers(1, 3)) if i % 4 != 3 else 0,
                         mucin=int(i % 3 == 0), pen_over_tissue=i % 4 in (0, 1),
                         scanner_padding=i % 5 != 4, glass_rgb=CASTS[i % len(CASTS)],
                         pen_off_edge=1 + i % 2 if edge else 0, ink_halos=int(edge))
        slides.append((f"s{seed_base + i}", dict(width=16000, height=12000, mpp=MPP, seed=seed_base + i,
                                                 tumour_tiles=int(rng.integers(1, 4)) if tumour else 0,
                                                 pen_marks=i % 3 != 2, specks=True,
                                                 lymphoid_aggregates=int(rng.integers(0, 3)),
                                                 stain=(float(rng.uniform(0.8, 1.3)), float(rng.uniform(0.8, 1.3))),
                                                 hard=hard)))
    return slides


def jpeg(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` through the slide files' JPEG coding (quality 85, YCbCr 4:2:0)."""
    import imagecodecs

    return imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(rgb, level=85, outcolorspace="YCBCR",
                                                             subsampling="420"))


def generated(kwargs: dict):
    """(thumbnail, truth, um/px): the slide's 8 um/px level as its file would hold it and its ground truth."""
    from wsi_synth import write_synthetic_slide

    slide = write_synthetic_slide(Path("bench.svs"), write=False, **kwargs)
    rgb = slide.render_level(THUMB_DS, 0, 0, math.ceil(slide.width / THUMB_DS), math.ceil(slide.height / THUMB_DS))
    return jpeg(rgb), slide.truth_masks(THUMB_DS), THUMB_DS * MPP


def real_bases():
    """(name, clean RGB, um/px) of the real images: the needle core left of its own blue blot and halo (columns
    3,400 on: the blot starts at 3,678 and its halo about 80 px before), the tissue microarray, and the Aperio
    region area-averaged 4x (2 um/px: wide enough for strokes, fine enough to differ from the 8 um/px ones)."""
    import cv2
    from PIL import Image

    from wsi.slide import open_slide

    core = np.asarray(Image.open(DATA / "slide_with_ink.jpeg").convert("RGB"))[:, :3400]
    tma = np.asarray(Image.open(DATA / "tma_spots.jpeg").convert("RGB"))
    with open_slide(DATA / "cmu_small_region.svs") as s:
        region = s.read_region(0, 0, 0, s.width, s.height)
        um = s.mpp_x * 4
    aperio = cv2.resize(region, (region.shape[1] // 4, region.shape[0] // 4), interpolation=cv2.INTER_AREA)
    return [("needle", core, 8.0), ("tma", tma, 8.0), ("aperio", aperio, um)]


def real_composites(n: int, seed_base: int, truth_mask):
    """(name, composite, truth, um/px) for ``n`` composites over the real bases in turn, each from its own seed:

    * a stroke from a tissue pixel (or, one time in two, a glass pixel) out past a random edge by 3-10% of the
      image's short side, 40-100 um half-wide, every other one with a halo of 30-120 um at 0.1-0.3 density;
    * a stroke across tissue through a random tissue pixel, 0.3-0.8 of the short side long, 40-100 um half-wide;
    * a blot centred on a random pixel of the tissue's outline, 150-350 um half-wide, 200-800 um long, with a
      halo of 100-300 um at 0.15-0.4 density (at most 0.06, 0.25 and 0.1 of the short side: the Aperio region
      is 1.1 mm wide);
    * two dust specks of 8-30 um beside the edge stroke, four of 8-40 um elsewhere on the glass;

    each ink's colour drawn from blue, green, black and red, strokes bent by up to 6% of their length. The
    tissue truth is ``truth_mask`` of the clean (JPEG-coded) image; nothing is drawn over padding."""
    import cv2

    from wsi_synth import PEN_INKS, SPECK_TS, PenStroke, Speck, composite_marks

    bases = [(name, jpeg(rgb), um) for name, rgb, um in real_bases()]
    truths = [truth_mask(rgb, um) for _, rgb, um in bases]
    out = []
    for i in range(n):
        (name, clean, um), tissue = bases[i % len(bases)], truths[i % len(bases)]
        rng = np.random.default_rng(seed_base + i)
        h, w = tissue.shape
        short = min(h, w)
        padding = clean.min(axis=2) >= 253
        glass = ~tissue & ~padding
        colour = lambda: list(PEN_INKS)[int(rng.integers(len(PEN_INKS)))]  # noqa: E731

        def pixel_of(where):
            ys, xs = np.nonzero(where)
            k = int(rng.integers(len(ys)))
            return np.array([xs[k] + 0.5, ys[k] + 0.5])

        def bent(a, b):
            t = np.linspace(0, 1, 24)[:, None]
            normal = np.array([-(b - a)[1], (b - a)[0]]) / np.hypot(*(b - a))
            return a + t * (b - a) + rng.uniform(-0.06, 0.06) * np.hypot(*(b - a)) * np.sin(np.pi * t) * normal

        start = pixel_of(tissue if rng.random() < 0.5 else glass)
        past, along = rng.uniform(0.03, 0.1) * short, rng.uniform(0.1, 0.9)
        end = np.array([(-past, along * h), (w + past, along * h), (along * w, -past),
                        (along * w, h + past)][int(rng.integers(4))])
        edge_pts = bent(start, end)
        halo = (rng.uniform(30, 120) / um, rng.uniform(0.1, 0.3)) if i % 2 else (0.0, 0.0)
        edge = PenStroke(tuple(map(tuple, edge_pts)), rng.uniform(40, 100) / um, colour(),
                         int(rng.integers(1, 2 ** 31)), *halo)
        centre, angle = pixel_of(tissue), rng.uniform(0, math.pi)
        reach = rng.uniform(0.15, 0.4) * short * np.array([math.cos(angle), math.sin(angle)])
        across = PenStroke(tuple(map(tuple, bent(centre - reach, centre + reach))), rng.uniform(40, 100) / um,
                           colour(), int(rng.integers(1, 2 ** 31)))
        outline = tissue & ~cv2.erode(tissue.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
        centre, angle = pixel_of(outline), rng.uniform(0, math.pi)
        reach = 0.5 * min(rng.uniform(200, 800) / um, 0.25 * short) * np.array([math.cos(angle), math.sin(angle)])
        blot = PenStroke((tuple(centre - reach), tuple(centre), tuple(centre + reach)),
                         min(rng.uniform(150, 350) / um, 0.06 * short), colour(), int(rng.integers(1, 2 ** 31)),
                         min(rng.uniform(100, 300) / um, 0.1 * short), rng.uniform(0.15, 0.4))
        clear = cv2.erode(glass.view(np.uint8), cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * math.ceil(60 / um) + 1,) * 2)).view(bool)  # 60 um from tissue and padding
        dust = []
        for beside, count, largest in ((True, 2, 30), (False, 4, 40)):
            for _ in range(count):
                for _attempt in range(50):
                    r = rng.uniform(8, largest) / um
                    if beside:
                        k = int(rng.integers(1, len(edge_pts)))
                        d = edge_pts[k] - edge_pts[k - 1]
                        normal = np.array([-d[1], d[0]]) / max(np.hypot(*d), 1e-6)
                        off = edge.half_width + 2 * edge.halo + rng.uniform(40, 150) / um + r
                        x, y = edge_pts[k] + rng.choice((-1, 1)) * off * normal
                    else:
                        x, y = pixel_of(clear)
                    if 0 <= x < w and 0 <= y < h and clear[int(y), int(x)]:
                        dust.append(Speck(float(x), float(y), r, SPECK_TS[int(rng.integers(len(SPECK_TS)))],
                                          False, int(rng.integers(1, 2 ** 31))))
                        break
        rgb, marks = composite_marks(clean.astype(np.float32), (edge, across, blot), dust)
        rgb[padding] = clean[padding]
        dense = tissue & (clean[..., 0] < 0.8 * clean[..., 2].astype(np.float32)) & (clean.mean(axis=2) < 140)
        empty = np.zeros_like(tissue)
        truth = {"tissue": tissue, "tumour": dense, "fat": empty, "blood": empty, "mucin": empty,
                 "lymphoid": empty, **{kind: where & ~padding for kind, where in marks.items()}}
        out.append((f"{name}{seed_base + i}", jpeg(rgb), truth, um))
    return out


def _fold(rng, cx: float, cy: float, um: float, long_um: tuple, wide_um: tuple, line_px: float | None):
    """A fold through (cx, cy) (pixels of a grid of ``um`` um/px) in a random direction."""
    from wsi_synth import defects as dd

    return dd.Fold(cx, cy, rng.uniform(0, math.pi), rng.uniform(*long_um) / um, rng.uniform(*wide_um) / um,
                   line_width=line_px if line_px else rng.uniform(2, 4) / um, line_density=rng.uniform(1.0, 2.0))


def _stroke_through(rng, cx: float, cy: float, um: float, colour: str):
    """A straight marker stroke through (cx, cy), 0.5-1.5 mm long, 40-100 um half-wide, in pixels of ``um``."""
    from wsi_synth import PenStroke

    angle, half = rng.uniform(0, math.pi), 0.5 * rng.uniform(500, 1500) / um
    d = half * np.array([math.cos(angle), math.sin(angle)])
    return PenStroke((tuple(np.array([cx, cy]) - d), (cx, cy), tuple(np.array([cx, cy]) + d)),
                     rng.uniform(40, 100) / um, colour, int(rng.integers(1, 2 ** 31)))


def inkfold_images(n: int, seed_base: int, truth_mask):
    """(name, image, truth, um/px) for the inkfold family: for each of ``n`` seeds, a generator slide and a
    composite of ``tma_spots.jpeg``:

    * generator (``g<seed>``): 16,000 x 12,000 px at 0.5 um/px, 1-2 solid tumour sheets, 0-2 tumour foci, 0-2
      lymphoid aggregates, haemorrhage on every third, mucin on every fourth, marker strokes on the glass on
      every other one (``pen_marks``), the four site profiles in turn; through each solid sheet (a random pixel
      of its truth) a fold of 400-1,200 um half-length and 80-250 um width (bend line 2-4 um, 1-2x density), as
      :func:`wsi_synth.defects.draw_defects` sizes them; the 8 um/px level as the writer renders it;
    * real (``tma<seed>``): ``tma_spots.jpeg`` (8 um/px) with 1-2 folds through random pixels of its dense dark
      cores (red under 0.8 of blue, mean under 140, inside the clean image's mask by ``TRUTH_REV``, eroded by a
      pixel), 300-800 um half-length, 60-150 um wide, a one-pixel bend line of 1-2x density, drawn by
      :func:`wsi_synth.defects.composite` (``bench/qc.py``'s real tier draws its folds the same way); the
      tissue truth is that clean mask, the tumour truth those dense cores;
    * on odd seeds, both images also get a straight marker stroke (0.5-1.5 mm long, 40-100 um half-wide; black
      on seeds 1, 5, 9, ..., blue on 3, 7, ...) through a random solid-sheet (dense core) pixel, its optical
      density added to the image's (:func:`wsi_synth.composite_marks`).

    Every image passes through the slides' JPEG coding (quality 85)."""
    import cv2
    from PIL import Image

    from wsi_synth import SITE_PROFILES, HardCases, composite_marks, write_synthetic_slide
    from wsi_synth import defects as dd

    def erode(mask):
        return cv2.erode(mask.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)

    def pick(rng, where):
        ys, xs = np.nonzero(where)
        k = int(rng.integers(len(ys)))
        return xs[k] + 0.5, ys[k] + 0.5

    tma = jpeg(np.asarray(Image.open(DATA / "tma_spots.jpeg").convert("RGB")))
    tma_tissue = truth_mask(tma, 8.0)
    dense = tma_tissue & (tma[..., 0] < 0.8 * tma[..., 2].astype(np.float32)) & (tma.mean(axis=2) < 140)
    um = THUMB_DS * MPP
    out = []
    for i in range(n):
        seed = seed_base + i
        rng = np.random.default_rng([seed, 0xF01D])
        ink = ("black", "blue")[(i // 2) % 2] if i % 2 else None
        # generator slide
        hard = HardCases(solid_tumours=int(rng.integers(1, 3)), haemorrhage=int(i % 3 == 0), mucin=int(i % 4 == 0))
        kwargs = dict(width=16000, height=12000, mpp=MPP, seed=seed, tumour_tiles=int(rng.integers(0, 3)),
                      pen_marks=i % 2 == 0, specks=True, lymphoid_aggregates=int(rng.integers(0, 3)), hard=hard,
                      site=SITE_PROFILES["ABCD"[i % 4]])
        plain = write_synthetic_slide(Path("bench.svs"), write=False, **kwargs)
        tumour = plain.truth_masks(THUMB_DS)["tumour"]
        sheets = []
        for blob in plain.scene.solid:
            x0, y0, x1, y1 = (v / THUMB_DS for v in blob.box())
            inside = np.zeros_like(tumour)
            inside[max(int(y0), 0):int(y1) + 1, max(int(x0), 0):int(x1) + 1] = True
            inside &= erode(tumour)
            if inside.any():
                sheets.append(inside)
        folds = [_fold(rng, *(v * THUMB_DS for v in pick(rng, sheet)), MPP, (400, 1200), (80, 250), None)
                 for sheet in sheets]
        slide = write_synthetic_slide(Path("bench.svs"), write=False, defects=folds, **kwargs)
        rgb = slide.render_level(THUMB_DS, 0, 0, math.ceil(slide.width / THUMB_DS), math.ceil(slide.height / THUMB_DS))
        truth = slide.truth_masks(THUMB_DS)
        if ink and sheets:
            rgb, marks = composite_marks(rgb.astype(np.float32), [_stroke_through(rng, *pick(rng, sheets[0]), um,
                                                                                  ink)])
            for kind in ("pen", "halo", "speck"):
                truth[kind] = truth[kind] | marks[kind]
        out.append((f"g{seed}", jpeg(rgb), truth, um))
        # tissue microarray composite
        folds = [_fold(rng, *pick(rng, erode(dense)), 8.0, (300, 800), (60, 150), 1.0)
                 for _ in range(int(rng.integers(1, 3)))]
        rgb = dd.composite(tma, folds)
        truth = {"tissue": tma_tissue, "tumour": dense, **dd.composite_truth(tma_tissue, folds),
                 **{k: np.zeros_like(dense) for k in ("fat", "blood", "mucin", "lymphoid", "pen", "halo", "speck")}}
        if ink:
            rgb, marks = composite_marks(rgb.astype(np.float32), [_stroke_through(rng, *pick(rng, erode(dense)), 8.0,
                                                                                  ink)])
            truth.update(marks)
        out.append((f"tma{seed}", jpeg(rgb), truth, 8.0))
    return out


def inkfold_score(masks, truth: dict, um: float, min_tissue_fraction: float) -> dict:
    """The inkfold family's figures for one image (``masks``: a TissueMasks), beside :func:`score`'s."""
    from scipy import ndimage

    from wsi.tissue import tissue_fractions

    out = score(masks.tissue, truth, um, min_tissue_fraction)
    inked = ndimage.binary_dilation(truth["pen"] & ~truth["halo"], iterations=1)
    tumour = truth["tumour"] & ~inked
    folded = tumour & truth.get("fold", np.zeros_like(tumour))
    out["tumour_ink"] = (int(masks.ink[tumour].sum()), int(tumour.sum()))
    out["fold_tumour"] = (int(masks.tissue[folded].sum()), int(folded.sum()))
    downsample = um / MPP
    tile = 256 / downsample
    h, w = masks.tissue.shape
    ys, xs = np.meshgrid(np.arange(int(h // tile)), np.arange(int(w // tile)), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
    kept = tissue_fractions(masks.tissue, downsample, coords, 256) >= min_tissue_fraction
    tumour_tiles = tissue_fractions(tumour, downsample, coords, 256) >= 0.25
    out["tumour_tiles"] = (int((tumour_tiles & ~kept).sum()), int(tumour_tiles.sum()))
    return out


def inkfold_report(method: str, results: list, seconds: list) -> None:
    def share(pair):
        return pair[0] / pair[1] if pair[1] else math.nan

    print(f"\n== {method}: mask {np.mean(seconds):.3f} s per image")
    print(f"{'image':12s} {'tum->ink':>8s} {'tumour':>7s} {'fold-tum':>8s} {'tum tiles lost':>14s} "
          f"{'ink/tissue kept':>15s} {'recall':>7s} {'lost':>5s} {'ink kept':>9s} {'bad ink':>7s}")
    for name, r in results:
        print(f"{name:12s} {share(r['tumour_ink']):8.3f} {share(r['tumour']):7.3f} {share(r['fold_tumour']):8.3f} "
              f"{r['tumour_tiles'][0]:6d} of {r['tumour_tiles'][1]:4d} {share(r['ink_on_tissue_kept']):15.3f} "
              f"{share(r['tissue']):7.3f} {r['lost']:5d} {share(r['ink_kept']):9.4f} {r['bad_ink']:7d}")
    for part, prefix in (("generator", "g"), ("tma", "tma"), ("all", "")):
        rows = [r for name, r in results if name.startswith(prefix)]
        figures = {"tumour lost to ink": [share(r["tumour_ink"]) for r in rows],
                   "tumour recall": [share(r["tumour"]) for r in rows],
                   "fold-over-tumour recall": [share(r["fold_tumour"]) for r in rows if r["fold_tumour"][1]],
                   "tumour tiles lost": [r["tumour_tiles"][0] for r in rows],
                   "ink over tissue kept": [share(r["ink_on_tissue_kept"]) for r in rows
                                            if r["ink_on_tissue_kept"][1]]}
        print(f"{part}: " + "; ".join(f"{k} min {min(v):.3f} mean {np.mean(v):.3f} max {max(v):.3f}"
                                      for k, v in figures.items() if v)
              + f"; tumour tiles lost in all {sum(r['tumour_tiles'][0] for r in rows)} of "
              + f"{sum(r['tumour_tiles'][1] for r in rows)}")


def load_old(rev: str):
    """wsi.tissue as it was at ``rev``, imported as a module of the current package (for its relative imports)."""
    source = subprocess.run(["git", "show", f"{rev}:wsi/tissue.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    spec = importlib.util.spec_from_loader(f"wsi._tissue_{rev}", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "wsi"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:wsi/tissue.py", "exec"), module.__dict__)
    return module


def mask_function(module, section: dict):
    """``(rgb, um/px) -> tissue mask`` of a wsi.tissue module (this one or an old revision's)."""
    params = module.TissueParams.from_dict({k: section[k] for k in (f.name for f in
                                            module.dataclasses.fields(module.TissueParams))})
    if hasattr(module, "tissue_masks"):
        return lambda rgb, um: module.tissue_masks(rgb, um, params).tissue
    return lambda rgb, um: module.tissue_mask(rgb, um, params)


def masks_function(module, section: dict):
    """``(rgb, um/px) -> TissueMasks`` of a wsi.tissue module (this one or an old revision's)."""
    params = module.TissueParams.from_dict({k: section[k] for k in (f.name for f in
                                            module.dataclasses.fields(module.TissueParams))})
    return lambda rgb, um: module.tissue_masks(rgb, um, params)


def score(mask: np.ndarray, truth: dict, um: float, min_tissue_fraction: float) -> dict:
    from scipy import ndimage

    from wsi.tissue import tissue_fractions

    inked = ndimage.binary_dilation(truth["pen"] & ~truth["halo"], iterations=1)  # tissue shows through a halo
    tissue = truth["tissue"] & ~inked
    classes = {"tumour": truth["tumour"], "fat": truth["fat"], "blood": truth["blood"], "mucin": truth["mucin"],
               "lymphoid": truth["lymphoid"]}
    classes["stroma"] = truth["tissue"] & ~np.logical_or.reduce(list(classes.values()))
    out = {"tissue": (int(mask[tissue].sum()), int(tissue.sum()))}
    for name, where in classes.items():
        where = where & ~inked
        out[name] = (int(mask[where].sum()), int(where.sum()))
    ink_on_glass = truth["pen"] & ~truth["tissue"]
    out["ink_kept"] = (int(mask[ink_on_glass].sum()), int(ink_on_glass.sum()))
    on_tissue = truth["pen"] & ~truth["halo"] & truth["tissue"]  # strokes, not halos: tissue shows through those
    out["ink_on_tissue_kept"] = (int(mask[on_tissue].sum()), int(on_tissue.sum()))
    # the tiler's grid: 256 px tiles at 0.5 um/px = 128 um, on a grid whose level 0 is 0.5 um/px
    downsample = um / MPP
    tile = 256 / downsample
    h, w = mask.shape
    ys, xs = np.meshgrid(np.arange(int(h // tile)), np.arange(int(w // tile)), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
    kept = tissue_fractions(mask, downsample, coords, 256) >= min_tissue_fraction
    tissue_share = tissue_fractions(tissue, downsample, coords, 256)
    tumour_share = tissue_fractions(truth["tumour"] & ~inked, downsample, coords, 256)
    out["lost"] = int((~kept & ((tissue_share >= 0.5) | (tumour_share >= 0.25))).sum())
    glass = ~truth["tissue"] & ~truth["pen"] & ~truth["speck"]
    bad = {"ink": 0, "dust": 0, "glass": 0, "rim": 0}
    for (x, y), share in zip(coords[kept] / downsample, tissue_share[kept]):
        window = (slice(int(y), int(y + tile)), slice(int(x), int(x + tile)))
        if share < min_tissue_fraction / 2:  # next to no tissue: named after what covers most of it
            shares = {name: where[window].mean() for name, where in
                      (("ink", truth["pen"]), ("dust", truth["speck"]), ("glass", glass))}
            bad[max(shares, key=shares.get)] += 1
        elif share < min_tissue_fraction:  # a rim tile the mask's outline decided
            bad["rim"] += 1
    out["tiles"] = int(kept.sum())
    out.update({f"bad_{k}": v for k, v in bad.items()})
    return out


def report(method: str, results: list, seconds: list) -> None:
    total = lambda key: sum(r[key] for _, r in results)  # noqa: E731
    print(f"\n== {method}: mask {np.mean(seconds):.3f} s per image")
    print(f"{'image':12s} {'tissue':>7s} {'tumour':>7s} {'tiles':>6s} {'ink':>4s} {'dust':>5s} {'glass':>6s} "
          f"{'rim':>4s} {'lost':>5s} {'ink kept':>9s}")
    for name, r in results:
        rec = r["tissue"][0] / max(r["tissue"][1], 1)
        tum = f"{r['tumour'][0] / r['tumour'][1]:.3f}" if r["tumour"][1] else "-"
        kept = f"{r['ink_kept'][0] / r['ink_kept'][1]:.4f}" if r["ink_kept"][1] else "-"
        print(f"{name:12s} {rec:7.3f} {tum:>7s} {r['tiles']:6d} {r['bad_ink']:4d} {r['bad_dust']:5d} "
              f"{r['bad_glass']:6d} {r['bad_rim']:4d} {r['lost']:5d} {kept:>9s}")
    recalls = [r["tissue"][0] / max(r["tissue"][1], 1) for _, r in results]
    print(f"tissue recall min {min(recalls):.3f} median {np.median(recalls):.3f}")
    tumour = [r["tumour"][0] / r["tumour"][1] for _, r in results if r["tumour"][1]]
    if tumour:
        print(f"tumour recall per tumour slide: min {min(tumour):.3f} median {np.median(tumour):.3f}")
    print("per class (cohort): " + ", ".join(
        f"{c} {sum(r[c][0] for _, r in results) / max(1, sum(r[c][1] for _, r in results)):.3f}" for c in CLASSES))
    ink_kept = [r["ink_kept"] for _, r in results]
    print("kept tiles mostly on: " + ", ".join(f"{k} {total(f'bad_{k}')}" for k in ("ink", "dust", "glass"))
          + f" (of {total('tiles')} tiles); rim tiles with 12-25% tissue: {total('bad_rim')}; tiles lost "
          + f"(>= 50% tissue or >= 25% tumour): {total('lost')}; ink on glass kept as tissue: "
          + f"{sum(k for k, _ in ink_kept) / max(1, sum(a for _, a in ink_kept)):.4f} of "
          + f"{sum(a for _, a in ink_kept)} px (worst image {max(k / max(a, 1) for k, a in ink_kept):.4f})")
    on_tissue = [r["ink_on_tissue_kept"] for _, r in results]
    inked_px = sum(a for _, a in on_tissue)
    print(f"ink over tissue kept as tissue: {sum(k for k, _ in on_tissue) / max(1, inked_px):.4f} of {inked_px} px "
          + f"(worst image {max(k / max(a, 1) for k, a in on_tissue):.4f})")


def scored(images, methods: dict, score_one) -> tuple[dict, dict]:
    """Each method's mask of every ``(name, rgb, truth, um)`` image scored by ``score_one(mask, truth, um)``, and
    the seconds each mask took: ``({method: [(name, figures)]}, {method: [seconds]})``."""
    rows: dict = {m: [] for m in methods}
    seconds: dict = {m: [] for m in methods}
    for name, rgb, truth, um in images:
        for method, fn in methods.items():
            t = time.perf_counter()
            mask = fn(rgb, um)
            seconds[method].append(time.perf_counter() - t)
            rows[method].append((name, score_one(mask, truth, um)))
    return rows, seconds


def inkfold_family(args, seed_base: int, section: dict, min_fraction: float) -> None:
    import wsi.tissue

    methods = {"new": masks_function(wsi.tissue, section),
               f"old ({args.old})": masks_function(load_old(args.old), section)}
    images = inkfold_images(args.slides, seed_base, mask_function(load_old(TRUTH_REV), section))
    rows, seconds = scored(images, methods, lambda masks, truth, um: inkfold_score(masks, truth, um, min_fraction))
    print(f"\n#### family inkfold, {args.slides} seeds ({2 * args.slides} images) from seed {seed_base}")
    for method, results in rows.items():
        inkfold_report(method, results, seconds[method])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", nargs="+", choices=tuple(SEED_BASES), default=list(SEED_BASES))
    parser.add_argument("--slides", type=int, default=16, help="slides (images) per family")
    parser.add_argument("--seed-base", type=int, help="draw every family from this seed on (default: its own)")
    parser.add_argument("--old", default=TRUTH_REV, help="git revision whose wsi/tissue.py is the baseline")
    args = parser.parse_args()

    import wsi.tissue
    from wsi.config import load_config

    section = load_config()["tissue"]
    min_fraction = load_config()["tiling"]["min_tissue_fraction"]
    methods = {"new": mask_function(wsi.tissue, section), f"old ({args.old})": mask_function(load_old(args.old),
                                                                                              section)}
    for family in args.family:
        seed_base = SEED_BASES[family] if args.seed_base is None else args.seed_base
        if family == "inkfold":
            inkfold_family(args, seed_base, section, min_fraction)
            continue
        if family == "real":
            images = real_composites(args.slides, seed_base, mask_function(load_old(TRUTH_REV), section))
        else:
            images = ((name, *generated(kwargs)) for name, kwargs in cohort(args.slides, seed_base, family == "edge"))
        rows, seconds = scored(images, methods, lambda mask, truth, um: score(mask, truth, um, min_fraction))
        print(f"\n#### family {family}, {args.slides} images from seed {seed_base}")
        for method, results in rows.items():
            report(method, results, seconds[method])


if __name__ == "__main__":
    sys.exit(main())
