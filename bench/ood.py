"""Does the out-of-distribution score flag slides unlike the training cohort, and spare the ones like it?

    python bench/ood.py --tier t05h [--alike 8] [--per-site 4] [--bags 200] [--seed 31000]

Reference: the tier's 40 slides (``bench/mil_quality.py --prepare-only``), fitted as ``wsi train`` fits it
(:func:`wsi.mil.ood.fit_out_of_fold` on the first CV repeat's folds of ``mil.seed`` 0, ``mil.ood_alpha`` of
``configs/default.yaml``). Scored against it, each set through the real pipeline (slides written by
:func:`wsi_synth.write_synthetic_slide`, ``wsi.tiling.tile_slides``, ``wsi.features.extract_cohort`` with the
tier's encoder and weights):

* **alike**: ``--alike`` new slides drawn exactly as the tier's (its size, foci, mimics and stain batches), from
  seed ``--seed``: in distribution, so flags here are false flags (target <= 5%);
* **new sites**: ``--per-site`` slides for each of the four :data:`wsi_synth.SITE_PROFILES` (stain vectors and
  strengths, scanner cast and JPEG quality that the tier never drew), otherwise as the tier's (target >= 90%
  flagged);
* **artefact bags**: ``--bags`` tiles of pure marker ink, of tissue out of focus (the tier's own tiles under a
  Gaussian blur of sigma 4 px) and of empty glass, each embedded by the encoder and fed as one slide (target:
  each flagged).

Also printed: the tier's own out-of-fold flags (false flags on the slides the reference was fitted on, by the
slides' folds). Results: stdout and ``<root>/ood.json``; slides and stores under ``<root>/ood/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mil_quality as mq  # noqa: E402  (bench/mil_quality.py: tiers, their cache, the encoder checkpoint)


def write_sets(root: Path, tier: dict, alike: int, per_site: int, seed: int) -> dict[str, str]:
    """The new slides (kept when present); returns slide id -> set name."""
    from wsi_synth import SITE_PROFILES, write_synthetic_slide

    rng = np.random.default_rng(seed)
    sets = {}
    plan = [("alike", None, i) for i in range(alike)] + [
        (f"site {name}", profile, i) for name, profile in SITE_PROFILES.items() for i in range(per_site)]
    for set_name, profile, i in plan:
        slide_id = f"{'alike' if profile is None else 'site' + profile.name}{i:02d}"
        tumour, slide_seed = i % 2 == 1, int(rng.integers(2 ** 31))
        mimics = int(rng.integers(*np.add(tier.get("mimics", mq.MIMICS), (0, 1))))
        stain = tuple(float(v) for v in 1 + tier.get("stain", mq.STAIN) * rng.uniform(-1, 1, size=2))
        foci = int(rng.integers(tier["foci"][0], tier["foci"][1] + 1)) if tumour else 0
        path = root / "slides" / f"{slide_id}.svs"
        if not path.exists():
            write_synthetic_slide(path, width=round(tier["size_um"][0] / 0.5), height=round(tier["size_um"][1] / 0.5),
                                  mpp=0.5, seed=slide_seed, tumour_tiles=foci, lymphoid_aggregates=mimics,
                                  stain=stain, site=profile)
        sets[slide_id] = set_name
    return sets


def artefact_bags(cohort, n: int, seed: int) -> dict[str, np.ndarray]:
    """uint8 tiles (n, 256, 256, 3) of marker ink, blurred tissue (the tier's own stored tiles) and glass."""
    from scipy.ndimage import gaussian_filter

    from wsi.store import SlideStore

    rng = np.random.default_rng(seed)
    texture = rng.normal(0, 6, size=(n, 256, 256, 1))
    ink = np.clip(np.array([40, 70, 150]) + texture + rng.normal(0, 10, size=(n, 1, 1, 3)), 0, 255)
    glass = np.clip(np.array([236, 236, 238]) + rng.normal(0, 2, size=(n, 256, 256, 3)), 0, 255)
    stores = [SlideStore.open(b.store) for b in cohort.bags.bags[:10]]
    tissue = np.concatenate([s.read_tiles(0, n // len(stores) + 1) for s in stores])[:n]
    blurred = gaussian_filter(tissue.astype(np.float32), sigma=(0, 4, 4, 0))
    return {"ink": ink.astype(np.uint8), "blur": np.clip(blurred, 0, 255).astype(np.uint8),
            "glass": glass.astype(np.uint8)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(mq.TIERS), default="t05h")
    parser.add_argument("--alike", type=int, default=8)
    parser.add_argument("--per-site", type=int, default=4)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--seed", type=int, default=31000)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args()

    from wsi.config import load_config
    from wsi.features import ExtractConfig, extract_cohort, load_encoder
    from wsi.mil import make_folds
    from wsi.mil.ood import fit_out_of_fold, slide_descriptor
    from wsi.store import SlideStore, store_path
    from wsi.tiling import TileConfig, tile_slides

    tier = mq.TIERS[args.tier]
    root = args.root or mq.HERE / "out" / f"mil_quality_{args.tier}"
    out, labels, _ = mq.prepare(root, tier)
    cohort = mq.load(root, out, labels, 0.1)
    mil = mq.mil_settings({})
    folds = make_folds(cohort.bags, mil["folds"], 0, cv=mil["cv"], validation=mil["validation"],
                       min_val_per_class=mil["min_val_per_class"])
    reference, own = fit_out_of_fold({s: slide_descriptor(cohort.features[s]) for s in cohort.ids},
                                     [f.test for f in folds], mil["ood_alpha"])

    work = root / "ood"
    sets = write_sets(work, tier, args.alike, args.per_site, args.seed)
    config = load_config(overrides={
        "extract": {"encoder": mq.ENCODER, "checkpoint": str(mq.checkpoint_path()), "batch_size": 32,
                    "export_h5": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"}})
    tile_slides(work / "out", TileConfig.from_config(config), sorted((work / "slides").glob("*.svs")), progress=False)
    extract_cohort(work / "out", ExtractConfig.from_config(config), progress=False)
    scores = {sid: float(reference.score(slide_descriptor(SlideStore.open(store_path(work / "out", sid))
                                                          .features(mq.ENCODER))))
              for sid in sets}
    encoder = load_encoder(mq.ENCODER, mq.checkpoint_path(), precision="fp32")
    for name, tiles in artefact_bags(cohort, args.bags, args.seed).items():
        scores[f"bag:{name}"] = float(reference.score(slide_descriptor(encoder.embed(tiles, 32))))
        sets[f"bag:{name}"] = f"artefact bag: {name}"

    groups: dict[str, list[float]] = {"tier's own slides, out of fold": list(own.values())}
    for sid, name in sets.items():
        groups.setdefault(name, []).append(scores[sid])
    results = {"tier": args.tier, "alpha": mil["ood_alpha"], "threshold": reference.threshold,
               "groups": {k: {"scores": v, "flagged": int(sum(x > 1 for x in v)), "n": len(v)}
                          for k, v in groups.items()}}
    (root / "ood.json").write_text(json.dumps(results, indent=1))
    print(f"tier {args.tier}: threshold {reference.threshold:.3f} (ood_alpha {mil['ood_alpha']})\n")
    print("| slides | flagged | OOD score min / median / max |\n|---|---|---|")
    for name, g in results["groups"].items():
        v = np.array(g["scores"])
        print(f"| {name} | {g['flagged']} of {g['n']} ({g['flagged'] / g['n']:.0%}) | "
              f"{v.min():.2f} / {np.median(v):.2f} / {v.max():.2f} |")


if __name__ == "__main__":
    main()
