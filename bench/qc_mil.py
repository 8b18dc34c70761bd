"""Slide QC against MIL (issue 26): when slides carry out-of-focus regions and folds, does ``tiling.qc: exclude``
keep the MIL calls as good as on clean slides, and better than ``flag``?

    python bench/qc_mil.py [--tier m] [--repeats 5] [--root bench/out/qc_mil_<tier>]

Design (fixed in bench/RESULTS.md, "Slide quality control", before the first run):

* a slide tier of ``bench/mil_quality.py`` (``--tier``: ``m``, 32 slides of 3.6 x 2.7 mm at 0.5 um/px, half
  ``tumour`` with 1-3 foci of about one tile, 1-4 lymphoid mimics on every slide, stain strengths 1 +- 0.25; or
  ``t05n``, whose clean cohort the shipped recipe does not rank perfectly), drawn twice from the same seeds:
  *clean* (the tier's own cache, ``bench/out/mil_quality_<tier>``, shared with ``mil_quality.py``), and with
  *defects* on every slide (:func:`mil_quality.defects_off_tumour`: two blur
  regions of sigma 1.5-3 um and one fold over the main pieces, each redrawn until it touches no tumour: on a
  tumour-free slide they sit anywhere in the tissue, on a tumour slide beside the tumour);
* three arms, every stage the real one (``tile_slides``, ``extract_cohort`` with ``tf_efficientnet_lite0`` and
  its ImageNet weights): *clean* (``tiling.qc: flag``), *flag* (defects, ``flag``: flagged tiles kept) and
  *exclude* (defects, ``exclude``: flagged tiles left out of the features);
* the shipped ABMIL recipe, ``--repeats`` repeats of 5-fold CV grouped by patient, the same folds in every arm.

Figures per arm: AUROC per repeat (min and mean) with its patient-bootstrap 95% CI; the paired lead of exclude
over flag and over clean, and of flag over clean (same resamples, same slides, every repeat) with the share of
resamples ahead; on tumour-free slides the mean out-of-fold tumour probability and the calls at >= 0.5; the
share of tumour-free slides whose top attended tile is a defect tile (>= 25% of its footprint blurred by
>= 1.5 um or folded, in the generator's truth; for *clean*, the same places without the defects); on tumour
slides whether the top attended tile is tumour; the tiles flagged, and defect and tumour tiles among them.
Pass: exclude's mean AUROC >= clean's - 0.02, and exclude ahead of flag in more than 90% of resamples.

Results go to stdout and ``<root>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import mil_quality as mq  # noqa: E402  (bench/mil_quality.py: the tier, its cohort, training and figures)

DEFECTS = {"blur": 2, "folds": 1, "sigma_um": [1.5, 3.0]}
ARMS = {"clean": ("clean", None, "flag"), "flag": ("defects", DEFECTS, "flag"),
        "exclude": ("defects", DEFECTS, "exclude")}  # arm: (slides folder, defects drawn, tiling.qc)
DEFECT_TILE_SHARE = 0.25


def tile_figures(cohort: mq.Cohort, defect_truth: dict[str, np.ndarray]) -> dict:
    """Per arm: tiles, QC flags, and the defect and tumour tiles among the flagged ones (flag mode) or left out
    (exclude mode: the store's excluded tiles, measured on their coordinates)."""
    from wsi.keys import qc_flag_bits
    from wsi.store import SlideStore

    out = {"tiles": 0, "defect_tiles": 0, "flagged": 0, "flagged_defect": 0, "flagged_tumour": 0,
           "excluded": 0, "excluded_defect": 0}
    for bag in cohort.bags.bags:
        store = SlideStore.open(bag.store)
        defect = mq.mask_share(store, defect_truth[bag.slide_id]) >= DEFECT_TILE_SHARE
        flags = store.qc_flags()
        flagged = np.zeros(len(defect), bool) if flags is None else qc_flag_bits(flags) > 0
        out["tiles"] += len(defect)
        out["defect_tiles"] += int(defect.sum())
        out["flagged"] += int(flagged.sum())
        out["flagged_defect"] += int((flagged & defect).sum())
        out["flagged_tumour"] += int((flagged & cohort.tumour_tiles[bag.slide_id]).sum())
        excluded, _ = store.qc_excluded()
        out["excluded"] += len(excluded)
        if len(excluded):
            share = mq.mask_share(store, defect_truth[bag.slide_id], excluded)
            out["excluded_defect"] += int((share >= DEFECT_TILE_SHARE).sum())
    return out


def normal_slide_figures(cohort: mq.Cohort, run: dict, defect_truth: dict[str, np.ndarray]) -> dict:
    """Out-of-fold figures on the tumour-free slides: tumour probability, calls at >= 0.5, top tile on a defect."""
    from wsi.store import SlideStore

    normal = [i for i, y in enumerate(cohort.y) if not y]
    probs = np.array(run["probs"])[:, normal]
    on_defect = []
    for repeat in run["top_tile"]:
        for i in normal:
            bag = cohort.bags.bags[i]
            store = SlideStore.open(bag.store)
            share = mq.mask_share(store, defect_truth[bag.slide_id])
            on_defect.append(bool(share[repeat[i]] >= DEFECT_TILE_SHARE))
    return {"mean_p": float(probs.mean()), "max_p": float(probs.max()), "calls_05": int((probs >= 0.5).sum()),
            "calls": int(probs.size), "top_on_defect": float(np.mean(on_defect))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="repeats of 5-fold CV (fold seeds tier seed + r)")
    parser.add_argument("--tumour-share", type=float, default=0.1)
    parser.add_argument("--tier", default="m", choices=[k for k, v in mq.TIERS.items() if "size_um" in v])
    parser.add_argument("--root", type=Path, default=None, help="default bench/out/qc_mil_<tier>")
    args = parser.parse_args()

    tier = mq.TIERS[args.tier]
    args.root = args.root or HERE / "out" / f"qc_mil_{args.tier}"
    cohorts, runs, timings = {}, {}, {}
    for arm, (folder, defects, qc) in ARMS.items():
        # the clean slides are the tier's own, prepared as mil_quality.py prepares them (tiling.qc: flag)
        root = HERE / "out" / f"mil_quality_{args.tier}" if folder == "clean" else args.root / folder
        out_name = "out" if folder == "clean" else f"out_{qc}"
        out, labels, timings[arm] = mq.prepare(root, tier, defects=defects, qc=qc, out_name=out_name)
        print(f"{arm}: prepared, " + ", ".join(f"{k} {v:.0f}" for k, v in timings[arm].items()), flush=True)
        cohorts[arm] = mq.load(root, out, labels, args.tumour_share)
        started = time.perf_counter()
        runs[arm] = mq.run_mil(cohorts[arm], "abmil", {}, args.repeats, tier["seed"],
                               args.root / f"arms_{arm}")
        timings[arm]["train_s"] = time.perf_counter() - started
        print(f"{arm}: trained, {timings[arm]['train_s']:.0f} s", flush=True)
    ids = cohorts["clean"].ids
    assert all(c.ids == ids for c in cohorts.values()), "the arms must score the same slides"
    slides = args.root / "defects" / "slides"
    defect_truth = {s: np.load(slides / f"{s}.defect.npy") for s in ids}

    def paired(arm: str, against: tuple[str, ...]) -> dict:
        return mq.auroc_figures(cohorts[arm], runs[arm]["probs"], {a: runs[a]["probs"] for a in against},
                                tier["seed"])

    figures = {"clean": paired("clean", ()), "flag": paired("flag", ("clean",)),
               "exclude": paired("exclude", ("flag", "clean"))}
    results = {"tier": args.tier, "repeats": args.repeats, "defects": DEFECTS, "timings": timings, "arms": {}}
    for arm in ARMS:
        results["arms"][arm] = {**figures[arm], "top1": runs[arm]["top1"], "mass": runs[arm]["mass"],
                                "normal": normal_slide_figures(cohorts[arm], runs[arm], defect_truth),
                                "tiles": tile_figures(cohorts[arm], defect_truth)}
    (args.root / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n| arm | AUROC min / mean over {args.repeats} repeats [95% CI] | per repeat | tumour-free slides: mean p "
          "(max), calls >= 0.5 | top tile on a defect (tumour-free) | top tile is tumour (tumour slides) | tiles | "
          "flagged (of them defect / tumour) | excluded (of them defect) |\n|---|---|---|---|---|---|---|---|---|")
    for arm, a in results["arms"].items():
        n, t = a["normal"], a["tiles"]
        print(f"| {arm} | {min(a['per_repeat']):.3f} / {mq.fmt_ci(a['auroc'], a['ci95'])} | "
              f"{' / '.join(f'{v:.3f}' for v in a['per_repeat'])} | {n['mean_p']:.3f} ({n['max_p']:.3f}), "
              f"{n['calls_05']} of {n['calls']} | {n['top_on_defect']:.2f} | {np.mean(a['top1']):.2f} | "
              f"{t['tiles']} ({t['defect_tiles']} defect) | {t['flagged']} ({t['flagged_defect']} / "
              f"{t['flagged_tumour']}) | {t['excluded']} ({t['excluded_defect']}) |")
    print("\n| paired lead | AUROC difference [95% CI] | resamples ahead |\n|---|---|---|")
    for arm, other in (("exclude", "flag"), ("exclude", "clean"), ("flag", "clean")):
        lead = results["arms"][arm]["lead"][other]
        print(f"| {arm} - {other} | {mq.fmt_ci(lead['value'], lead['ci95'], True)} | {lead['share_ahead']:.0%} |")
    exclude, clean = results["arms"]["exclude"], results["arms"]["clean"]
    holds = (exclude["auroc"] >= clean["auroc"] - 0.02, exclude["lead"]["flag"]["share_ahead"] > 0.9)
    print(f"\npass: exclude >= clean - 0.02: {holds[0]}; exclude ahead of flag in > 90% of resamples: {holds[1]}")


if __name__ == "__main__":
    main()
