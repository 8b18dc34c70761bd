"""Tissue-detection benchmark: the tissue mask scored against the generator's ground truth on a hard cohort.

    python bench/tissue.py [--slides 16] [--old REV]

The cohort (seeds 7000+, used by no test) holds what tissue detection gets wrong on real slides, spread over
16 or more 8 x 6 mm slides at 0.5 um/px: solid high-grade tumour sheets (as dark and blue as a real dense
tumour core), small tumour foci, lymphoid aggregates, haemorrhage (as red as red ink), mucin, fat, pale
stroma, marker strokes of every colour along and across tissue, dust, debris and smudges, stitched scanner
fields of grey glass with brightness steps beside white unscanned padding, and grey, yellow and blue glass
casts, with stain strengths varying by slide.

Each slide's 8 um/px thumbnail is rendered exactly as the writer renders that pyramid level and passed
through the same JPEG encoding (quality 85, YCbCr 4:2:0) that the slide files use; writing every slide's
level 0 would cost minutes a slide and change nothing the mask sees. The mask is scored on the ground truth
of the same grid:

* tissue recall: share of tissue pixels (not under ink) kept, per slide; per class (tumour, stroma, fat,
  haemorrhage, mucin, lymphoid) over the cohort;
* bad tiles: the tiler's 256 px tiles at 0.5 um/px that the mask keeps (tissue share >= min_tissue_fraction)
  though next to none of them is tissue free of ink (less than half of min_tissue_fraction), named after what
  covers most of them: ink, dust/smudge, or glass/padding; and, apart, the rim tiles whose true tissue share
  falls just short of min_tissue_fraction (12-25%), which the outline's last pixel decides;
* seconds per slide of the mask.

The same numbers for the tissue detector of an older revision (``--old``, default the last one before the
region-level ink decision) are printed beside them, measured in this run.
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
MPP = 0.5
THUMB_DS = 16  # 8 um/px, the default tissue.mask_mpp
CLASSES = ("tumour", "stroma", "fat", "blood", "mucin", "lymphoid")
CASTS = ((242.0, 241.0, 245.0), (236.0, 232.0, 214.0), (228.0, 234.0, 246.0), (246.0, 246.0, 246.0))


def cohort(n: int):
    """(name, write_synthetic_slide kwargs) for ``n`` slides: every hard case, spread over the cohort."""
    from wsi.demo import HardCases

    rng = np.random.default_rng(7000)
    slides = []
    for i in range(n):
        tumour = i % 2 == 0
        hard = HardCases(solid_tumours=int(rng.integers(1, 3)) if tumour else 0,
                         haemorrhage=int(rng.integers(1, 3)) if i % 4 != 3 else 0,
                         mucin=int(i % 3 == 0), pen_over_tissue=i % 4 in (0, 1),
                         scanner_padding=i % 5 != 4, glass_rgb=CASTS[i % len(CASTS)])
        slides.append((f"tissue_{i:02d}", dict(width=16000, height=12000, mpp=MPP, seed=7000 + i,
                                               tumour_tiles=int(rng.integers(1, 4)) if tumour else 0,
                                               pen_marks=i % 3 != 2, specks=True,
                                               lymphoid_aggregates=int(rng.integers(0, 3)),
                                               stain=(float(rng.uniform(0.8, 1.3)), float(rng.uniform(0.8, 1.3))),
                                               hard=hard)))
    return slides


def thumbnail_and_truth(kwargs: dict):
    """The slide's 8 um/px level as its file would hold it (rendered, then JPEG-coded) and the ground truth."""
    import imagecodecs

    from wsi.demo import write_synthetic_slide

    slide = write_synthetic_slide(Path("bench.svs"), write=False, **kwargs)
    rgb = slide.render_level(THUMB_DS, 0, 0, math.ceil(slide.width / THUMB_DS), math.ceil(slide.height / THUMB_DS))
    rgb = imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(rgb, level=85, outcolorspace="YCBCR",
                                                            subsampling="420"))
    return rgb, slide.truth_masks(THUMB_DS)


def load_old(rev: str):
    """wsi.tissue as it was at ``rev``, imported as a module of the current package (for its relative imports)."""
    source = subprocess.run(["git", "show", f"{rev}:wsi/tissue.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    spec = importlib.util.spec_from_loader("wsi._tissue_old", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "wsi"
    sys.modules[spec.name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:wsi/tissue.py", "exec"), module.__dict__)
    return module


def score(mask: np.ndarray, truth: dict, min_tissue_fraction: float) -> dict:
    from scipy import ndimage

    from wsi.tiling import tissue_fractions

    inked = ndimage.binary_dilation(truth["pen"], iterations=1)
    tissue = truth["tissue"] & ~inked
    classes = {"tumour": truth["tumour"], "fat": truth["fat"], "blood": truth["blood"], "mucin": truth["mucin"],
               "lymphoid": truth["lymphoid"]}
    classes["stroma"] = truth["tissue"] & ~np.logical_or.reduce(list(classes.values()))
    out = {"tissue": (int(mask[tissue].sum()), int(tissue.sum()))}
    for name, where in classes.items():
        where = where & ~inked
        out[name] = (int(mask[where].sum()), int(where.sum()))
    # the tiler's grid: 256 px tiles at 0.5 um/px = 256 level-0 px = 16 thumbnail px
    tile = 256 / THUMB_DS
    h, w = mask.shape
    ys, xs = np.meshgrid(np.arange(int(h // tile)), np.arange(int(w // tile)), indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], 1) * 256
    kept = coords[tissue_fractions(mask, THUMB_DS, coords, 256) >= min_tissue_fraction]
    glass = ~truth["tissue"] & ~truth["pen"] & ~truth["speck"]
    bad = {"ink": 0, "dust": 0, "glass": 0, "rim": 0}
    for x, y in kept // THUMB_DS:
        window = (slice(int(y), int(y + tile)), slice(int(x), int(x + tile)))
        share = tissue[window].mean()
        if share < min_tissue_fraction / 2:  # next to no tissue: named after what covers most of it
            shares = {name: where[window].mean() for name, where in
                      (("ink", truth["pen"]), ("dust", truth["speck"]), ("glass", glass))}
            bad[max(shares, key=shares.get)] += 1
        elif share < min_tissue_fraction:  # a rim tile the mask's outline decided
            bad["rim"] += 1
    out["tiles"] = len(kept)
    out.update({f"bad_{k}": v for k, v in bad.items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--old", default="26a9ed5", help="git revision whose wsi/tissue.py is the baseline")
    args = parser.parse_args()

    from wsi.config import load_config
    from wsi.tissue import TissueParams, tissue_masks

    section = load_config()["tissue"]
    params = TissueParams.from_dict(section)
    min_fraction = load_config()["tiling"]["min_tissue_fraction"]
    old = load_old(args.old)
    old_params = old.TissueParams.from_dict({k: section[k] for k in (f.name for f in
                                             old.dataclasses.fields(old.TissueParams))})
    methods = {"new": lambda rgb: tissue_masks(rgb, THUMB_DS * MPP, params).tissue,
               f"old ({args.old})": lambda rgb: old.tissue_mask(rgb, THUMB_DS * MPP, old_params)}
    rows = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    for name, kwargs in cohort(args.slides):
        rgb, truth = thumbnail_and_truth(kwargs)
        for method, fn in methods.items():
            t = time.perf_counter()
            mask = fn(rgb)
            seconds[method].append(time.perf_counter() - t)
            rows[method].append((name, score(mask, truth, min_fraction)))

    print(f"\n{args.slides} slides of 16,000 x 12,000 px at 0.5 um/px; masks from 8 um/px thumbnails "
          f"({rgb.shape[1]} x {rgb.shape[0]} px)")
    for method, results in rows.items():
        print(f"\n== {method}: mask {np.mean(seconds[method]):.3f} s per slide")
        print(f"{'slide':10s} {'tissue':>7s} {'tumour':>7s} {'tiles':>6s} {'ink':>4s} {'dust':>5s} {'glass':>6s} "
              f"{'rim':>4s}")
        for name, r in results:
            rec = r["tissue"][0] / max(r["tissue"][1], 1)
            tum = f"{r['tumour'][0] / r['tumour'][1]:.3f}" if r["tumour"][1] else "-"
            print(f"{name:10s} {rec:7.3f} {tum:>7s} {r['tiles']:6d} {r['bad_ink']:4d} {r['bad_dust']:5d} "
                  f"{r['bad_glass']:6d} {r['bad_rim']:4d}")
        recalls = [r["tissue"][0] / max(r["tissue"][1], 1) for _, r in results]
        print(f"tissue recall min {min(recalls):.3f} median {np.median(recalls):.3f}")
        tumour = [r["tumour"][0] / r["tumour"][1] for _, r in results if r["tumour"][1]]
        print(f"tumour recall per tumour slide: min {min(tumour):.3f} median {np.median(tumour):.3f}")
        print("per class (cohort): " + ", ".join(
            f"{c} {sum(r[c][0] for _, r in results) / max(1, sum(r[c][1] for _, r in results)):.3f}"
            for c in CLASSES))
        print("kept tiles mostly on: " + ", ".join(
            f"{k} {sum(r[f'bad_{k}'] for _, r in results)}" for k in ("ink", "dust", "glass"))
            + f" (of {sum(r['tiles'] for _, r in results)} tiles); rim tiles with 12-25% tissue: "
            + f"{sum(r['bad_rim'] for _, r in results)}")


if __name__ == "__main__":
    sys.exit(main())
