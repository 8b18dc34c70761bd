"""Does the shipped MIL recipe give the same answer on any seed? Seeds x CV repeats on one tier's features.

    python bench/mil_stability.py --tier t05h --seeds 0,1,2,3,4 [--fresh 5] [--workers 2] [--baseline-repeats 3]

A lab runs the Snakefile once, with one ``mil.seed``. This study trains the shipped recipe
(``configs/default.yaml``) under several seeds of a family and reports, over the seeds, the min, mean, max and
spread of the out-of-fold AUROC, with the recipe's ``mil.repeats`` CV repeats (the shipped ensemble) and with
its first repeat alone (one cross-validation, the recipe before repeats). Each seed's repeats are the library's
own (:func:`wsi.mil.training.repeat_seed`: the same folds, fold indices and seeds as ``wsi train``), trained
through :func:`wsi.mil.train_fold` on the tier's cached features (``bench/mil_quality.py --prepare-only``), one
torch thread per process, ``--workers`` processes.

Per seed it also reports what calibration (:mod:`wsi.mil.calibration`) gives on the ensemble's out-of-fold
predictions, cross-fitted as in a run's metrics (each test fold of the first repeat calibrated by a temperature
fitted on the other folds): ECE, Brier score, the most confident wrong call and the wrong calls above 0.95,
and the uncalibrated ones; and the share of the tier's slides that the out-of-distribution score
(:mod:`wsi.mil.ood`) flags out of fold (they are all in distribution).

``--fresh N`` adds a family of N seeds drawn at that moment (printed, and kept in results.json), which nothing
was tuned on. The plain gated ABMIL baseline (``bench/mil_quality.py``: Adam 2e-4, 40 epochs, last weights) runs
``--baseline-repeats`` repeats of 5-fold CV on the same features. Results: stdout and
``<root>/stability.json``; each (seed, repeat) is cached under ``<root>/stability/``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mil_quality as mq  # noqa: E402  (bench/mil_quality.py: tiers, cohort loading, baselines)

_COHORT = None  # the tier's features, loaded once per worker process


def _load_worker(root: str, tier: str) -> None:
    global _COHORT
    import torch

    torch.set_num_threads(1)
    out, labels, _ = mq.prepare(Path(root), mq.TIERS[tier])
    _COHORT = mq.load(Path(root), out, labels, 0.1)


def _train_repeat(seed: int, repeat: int) -> dict:
    """One CV repeat of ``wsi train`` with ``mil.seed = seed``: its folds, fold indices and seeds; returns the
    out-of-fold tumour probability of every slide and the first-repeat test fold of each."""
    import dataclasses
    import tempfile

    from wsi.mil import make_folds, train_fold
    from wsi.mil.models import model_config
    from wsi.mil.training import FoldTask, TrainParams, repeat_seed

    cohort = _COHORT
    mil = mq.mil_settings({})
    r_seed = repeat_seed(seed, repeat)
    folds = make_folds(cohort.bags, mil["folds"], r_seed, cv=mil["cv"], validation=mil["validation"],
                       min_val_per_class=mil["min_val_per_class"])
    model = model_config(mil["model"], cohort.bags.in_dim, 2, mil)
    params = dataclasses.replace(TrainParams.from_config(mil), seed=r_seed)
    by_id = {b.slide_id: b for b in cohort.bags.bags}
    probs, fold_of, started = {}, {}, time.perf_counter()
    for fold in folds:
        with tempfile.TemporaryDirectory() as run_dir:
            task = FoldTask(run_dir, repeat * len(folds) + fold.index, mq.ENCODER, model, params,
                            *(tuple(by_id[s] for s in ids) for ids in (fold.train, fold.val, fold.test)))
            summary = train_fold(task, device="cpu", loaded=cohort.features)
        for slide_id in fold.test:
            probs[slide_id] = summary["test"][slide_id]
            fold_of[slide_id] = fold.index
    return {"seed": seed, "repeat": repeat, "probs": [probs[s] for s in cohort.ids],
            "fold": [fold_of[s] for s in cohort.ids], "test_sets": [list(f.test) for f in folds],
            "train_s": time.perf_counter() - started}


def _cached(root: Path, seed: int, repeat: int) -> Path:
    return root / "stability" / f"seed{seed}-repeat{repeat}.json"


def seed_figures(cohort, repeats: list[dict], descriptors: dict, alpha: float) -> dict:
    """AUROC of the first repeat and of the ensemble; calibration and OOD figures of the ensemble."""
    from sklearn.metrics import roc_auc_score

    from wsi.mil.calibration import brier, confident_errors, cross_fitted, ece
    from wsi.mil.ood import fit_out_of_fold

    y = cohort.y.astype(int)
    single = np.array(repeats[0]["probs"])
    raw = np.mean([r["probs"] for r in repeats], axis=0)
    calibrated = cross_fitted(y, raw, repeats[0]["fold"])
    _, ood = fit_out_of_fold(descriptors, repeats[0]["test_sets"], alpha)
    return {"auroc_one_cv": float(roc_auc_score(y, single[:, 1])), "auroc": float(roc_auc_score(y, raw[:, 1])),
            "ece": ece(y, calibrated), "brier": brier(y, calibrated), **confident_errors(y, calibrated),
            "raw": {"ece": ece(y, raw), "brier": brier(y, raw), **confident_errors(y, raw)},
            "ood_flagged": int(sum(v > 1 for v in ood.values())), "train_s": sum(r["train_s"] for r in repeats)}


def summary(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.min():.3f} / {v.mean():.3f} / {v.max():.3f} (spread {v.max() - v.min():.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(mq.TIERS), default="t05h")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="the tuned family: mil.seed values")
    parser.add_argument("--fresh", type=int, default=0, help="add a family of this many seeds drawn now")
    parser.add_argument("--fresh-seeds", default="", help="re-use a fresh family drawn before (its seeds)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=None,
                        help="the tier's cache (default bench/out/mil_quality_<tier>)")
    args = parser.parse_args()

    from wsi.mil.ood import slide_descriptor

    root = args.root or mq.HERE / "out" / f"mil_quality_{args.tier}"
    tier = mq.TIERS[args.tier]
    out, labels, _ = mq.prepare(root, tier)
    cohort = mq.load(root, out, labels, 0.1)
    mil = mq.mil_settings({})
    families = {"tuned": [int(s) for s in args.seeds.split(",") if s]}
    fresh = [int(s) for s in args.fresh_seeds.split(",") if s] or sorted(
        1000 * (10 + secrets.randbelow(10 ** 5)) + i for i in range(args.fresh))  # seeds nothing has used
    if fresh:
        families["fresh"] = fresh
        print(f"fresh seed family: {','.join(map(str, fresh))}", flush=True)
    jobs = [(s, j) for seeds in families.values() for s in seeds for j in range(mil["repeats"])
            if not _cached(root, s, j).exists()]
    started = time.perf_counter()
    if jobs:
        with ProcessPoolExecutor(args.workers, initializer=_load_worker, initargs=(str(root), args.tier)) as pool:
            for done in pool.map(_train_repeat, *zip(*jobs)):
                path = _cached(root, done["seed"], done["repeat"])
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(done))
                print(f"seed {done['seed']} repeat {done['repeat']}: {done['train_s']:.0f} s", flush=True)
    wall = time.perf_counter() - started

    descriptors = {s: slide_descriptor(cohort.features[s]) for s in cohort.ids}
    results = {"tier": args.tier, "recipe": {k: mil[k] for k in ("model", "repeats", "epochs", "lr", "calibration",
                                                                  "ood_alpha")},
               "families": {}, "wall_s": wall}
    for family, seeds in families.items():
        per_seed = {s: seed_figures(cohort, [json.loads(_cached(root, s, j).read_text())
                                             for j in range(mil["repeats"])], descriptors, mil["ood_alpha"])
                    for s in seeds}
        results["families"][family] = {"seeds": seeds, "per_seed": per_seed}
    baselines = mq.run_baselines(cohort, args.baseline_repeats, tier["seed"], root / "arms")
    from sklearn.metrics import roc_auc_score

    plain = [roc_auc_score(cohort.y, p) for p in baselines["plain gated ABMIL"]["probs"]]
    results["plain_gated_abmil"] = {"per_repeat": plain, "mean": float(np.mean(plain))}
    (root / "stability.json").write_text(json.dumps(results, indent=1))

    print(f"\ntier {args.tier}, {len(cohort.ids)} slides; plain gated ABMIL {np.mean(plain):.3f} (mean of "
          f"{len(plain)} repeats: {' / '.join(f'{a:.3f}' for a in plain)})")
    print(f"\n| family (seeds) | AUROC one CV: min / mean / max (spread) | AUROC shipped ({mil['repeats']} repeats) | "
          "ECE calibrated (max) | ECE raw (max) | Brier calibrated (mean) | most confident wrong call, "
          "calibrated (raw) | wrong calls > 0.95, calibrated (raw) | OOD flags of the tier's own slides |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for family, f in results["families"].items():
        s = list(f["per_seed"].values())
        print(f"| {family} ({','.join(map(str, f['seeds']))}) | {summary([x['auroc_one_cv'] for x in s])} | "
              f"{summary([x['auroc'] for x in s])} | {np.mean([x['ece'] for x in s]):.3f} "
              f"({max(x['ece'] for x in s):.3f}) | {np.mean([x['raw']['ece'] for x in s]):.3f} "
              f"({max(x['raw']['ece'] for x in s):.3f}) | {np.mean([x['brier'] for x in s]):.3f} | "
              f"{max(x['max_wrong_confidence'] for x in s):.3f} "
              f"({max(x['raw']['max_wrong_confidence'] for x in s):.3f}) | "
              f"{sum(x['confident_wrong'] for x in s)} ({sum(x['raw']['confident_wrong'] for x in s)}) | "
              f"{sum(x['ood_flagged'] for x in s)} of {len(s) * len(cohort.ids)} |")
    print(f"\nwall {wall:.0f} s for {len(jobs)} CV repeats on {args.workers} processes")


if __name__ == "__main__":
    main()
