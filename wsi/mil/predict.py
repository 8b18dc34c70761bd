"""Apply a trained run: the fold ensemble scores bags, :func:`predict` streams a cohort's stores through it.

Ensemble scores of one bag: slide probabilities are the mean of the folds' softmax outputs (every fold of every
CV repeat), calibrated by the run's temperature (:mod:`.calibration`; a run made before calibration gives them
raw, with an :class:`UncalibratedRunWarning`); the predicted class is their argmax; attention is the mean of the
folds' attention (for ``clam_mb``, each fold's branch of the predicted class), so it still sums to 1; per-tile
class scores are the mean of the folds' per-tile softmax (see :mod:`.models` for what a tile score is for each
architecture).

Out-of-fold scores: a slide of the run's own cohort was trained on by every fold model but one per repeat, so
the ensemble's scores of it are flattering (its attention finds tumour the models were taught on that very
slide). For such a slide :func:`predict` also writes the scores of the fold models that held it out as their
test slide (one per repeat; the same probabilities as ``cv_predictions.csv``); heatmaps show those for training
slides.

Out of distribution (:mod:`.ood`): every slide gets ``ood_score`` against the run's training slides (out of
fold for those), and ``ood`` when it is above 1: the slide is unlike the slides the model was trained on, and
its probability is not to be trusted as the cross-validated figures would suggest.

:func:`predict` writes ``scores/<run>`` into every store and ``OUT/predictions/<run>/predictions.csv``
(slide_id, ``prob_<class>`` per class, predicted, ``ood_score``, ``ood``; the last two empty for a run made
before the score). Given a labels table (``labels``, the training table's
format, ``site`` column included), it also scores the predictions of the labelled slides that the run did not
train on, which is external validation of the run: ``metrics.json`` (as the run's own, with ``per_site`` when the
table has sites) and ``roc.png`` beside ``predictions.csv``. Slides that cannot be scored (no store, no features for the
run's encoder, features of another size or from other weights) get a ``failures.csv`` row (stage
``predict``) and the others carry on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .. import __version__
from ..atomic import write_csv, write_json
from ..checks import check_model_dir
from ..config import StageConfig
from ..errors import ConfigError, format_ids
from ..layout import Layout
from ..runner import StageSummary, run_slides
from ..store import FeatureAttrs, ScoreAttrs, SlideStore, is_complete, same_stain_target, store_path
from .calibration import Calibration
from .data import read_labels
from .metrics import classification_metrics, plot_roc
from .models import MILModel, create_model
from .ood import OODReference, slide_descriptor
from .training import RUN_SCHEMA_VERSION, autocast_context, autocast_dtype, probability_columns


class UncalibratedRunWarning(UserWarning):
    """A model run made before calibration and the out-of-distribution score: predict still works, uncalibrated."""


@dataclass
class Ensemble:
    """The folds of one trained run, ready to score bags of ``encoder`` features."""

    run: str
    model_name: str
    encoder: str
    classes: list[str]
    in_dim: int
    model_dir: Path
    feature_attrs: dict
    models: list[MILModel] = field(repr=False)
    device: torch.device
    precision: str
    held_out_by: dict[str, tuple[int, ...]] = field(default_factory=dict)  # slide id -> the folds that held it out
    calibration: Calibration = field(default_factory=Calibration)  # method none: probabilities as the models give
    ood: OODReference | None = None        # the training slides' feature statistics; None: a run made before
    ood_out_of_fold: dict[str, float] = field(default_factory=dict)  # the training slides' own, out-of-fold scores

    def check_features(self, features: np.ndarray, source=None) -> None:
        """A bag this ensemble can score: (N >= 1, in_dim) and finite; else a ConfigError naming ``source``."""
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ConfigError(source, f"features have shape {tuple(features.shape)}, model run {self.run} expects "
                                      f"(N, {self.in_dim}) features of {self.encoder}",
                              "was the model trained on another encoder?")
        if features.shape[0] == 0:
            raise ConfigError(source, "empty bag (no tiles)")
        if not np.isfinite(features).all():
            raise ConfigError(source, "features contain NaN/inf", f"re-run `wsi extract --encoder {self.encoder}`")

    def score_bag(self, features: np.ndarray, *, folds: tuple[int, ...] | None = None, site: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``features`` (N, D) -> attention (N,) summing to 1, per-tile class scores (N, C), slide
        probabilities (C,) averaged over the folds (or over the models of ``folds`` alone) and calibrated by the
        run's calibration (``site``'s own where the run has one)."""
        features = np.asarray(features, dtype=np.float32)
        self.check_features(features)
        x = torch.from_numpy(features).to(self.device)
        dtype = autocast_dtype(self.precision, self.device)
        with torch.inference_mode(), autocast_context(self.device, dtype):
            outputs = [m(x) for m in (self.models if folds is None else [self.models[f] for f in folds])]
        probs = torch.stack([torch.softmax(o.logits.float(), dim=0) for o in outputs]).mean(dim=0)
        predicted = int(probs.argmax())  # attention follows the models' call (a site's offsets may move it)
        attention = torch.stack([o.attention_for(predicted).float() for o in outputs]).mean(dim=0)
        tile_scores = torch.stack([torch.softmax(o.tile_logits.float(), dim=1) for o in outputs]).mean(dim=0)
        probs = self.calibration.apply(probs.cpu().numpy(), site)
        return attention.cpu().numpy(), tile_scores.cpu().numpy(), probs

    def ood_score(self, slide_id: str, features: np.ndarray) -> float | None:
        """The slide's out-of-distribution score (above 1: unlike the training slides): out of fold for a slide
        of the run's cohort; None for a run made before the score existed."""
        if slide_id in self.ood_out_of_fold:
            return self.ood_out_of_fold[slide_id]
        return None if self.ood is None else float(self.ood.score(slide_descriptor(features)))


def read_run(model_dir) -> dict:
    """``run.json`` of a complete run; anything else is a ConfigError naming the folder."""
    model_dir = Path(model_dir)
    path = model_dir / "run.json"
    if not path.is_file():
        raise ConfigError(model_dir, "not a complete model run (no run.json)",
                          "point --model at OUT/models/<run> of a finished `wsi train`")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(path, f"run.json is not valid JSON: {e}") from e
    if info.get("complete") is not True or info.get("schema_version") != RUN_SCHEMA_VERSION:
        raise ConfigError(path, f"model run is incomplete or of another format (schema_version "
                                f"{info.get('schema_version')!r}, this wsi reads {RUN_SCHEMA_VERSION})",
                          "re-run `wsi train`")
    return info


def load_ensemble(model_dir, *, device: str | torch.device | None = None, precision: str = "auto") -> Ensemble:
    """Every fold of the run in ``model_dir`` (``OUT/models/<run>``), in eval mode on ``device`` (default: CUDA
    when present)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    info = read_run(model_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = []
    for fold in info["folds"]:
        path = model_dir / fold["weights"]
        model = create_model(**info["model"])
        try:
            model.load_state_dict(load_file(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(path, f"fold weights cannot be loaded into {info['model']['name']}: {e}",
                              "re-run `wsi train`") from e
        models.append(model.to(device).eval())
    calibration, ood = info.get("calibration"), info.get("ood")
    if calibration is None:
        warnings.warn(f"model run {info['run']} ({model_dir}) was trained before calibration existed: its "
                      "probabilities are uncalibrated and slides get no out-of-distribution score; re-run "
                      "`wsi train` for both", UncalibratedRunWarning, stacklevel=2)
    held_out_by: dict[str, tuple[int, ...]] = {}
    for i, fold in enumerate(info["folds"]):
        for slide_id in fold.get("test", ()):
            held_out_by[slide_id] = held_out_by.get(slide_id, ()) + (i,)
    return Ensemble(run=info["run"], model_name=info["model"]["name"], encoder=info["encoder"],
                    classes=list(info["classes"]), in_dim=int(info["model"]["in_dim"]), model_dir=model_dir,
                    feature_attrs=info.get("feature_attrs") or {}, models=models, device=device,
                    precision=precision, held_out_by=held_out_by,
                    calibration=Calibration.from_dict(calibration or {}),
                    ood=OODReference.load(model_dir, ood["threshold"]) if ood else None,
                    ood_out_of_fold=(ood or {}).get("out_of_fold", {}))


@dataclass(frozen=True)
class PredictConfig(StageConfig):
    """The sections the predict stage reads (:meth:`~wsi.config.StageConfig.from_config`)."""

    stage: ClassVar[str] = "predict"
    labels: str | None    # external validation
    extract: dict
    cluster: dict
    mil: dict
    resources: dict       # {"predict": ...}: whether the job holds a GPU


def _check_weights(ensemble: Ensemble, store: SlideStore, attrs: FeatureAttrs | None = None) -> None:
    """The store's features (or the fine grid's, ``attrs``) come from the run's encoder weights, normalised to
    the run's stain reference."""
    attrs = attrs or store.feature_attrs(ensemble.encoder)
    trained = ensemble.feature_attrs.get("weights_sha256")
    found = attrs.weights_sha256
    if trained and found and trained != found:
        raise ConfigError(store.path, f"features of {ensemble.encoder} come from weights {found[:12]}, model run "
                                      f"{ensemble.run} was trained on weights {trained[:12]}",
                          "re-extract with the run's encoder weights")
    reference = ensemble.feature_attrs.get("stain")
    if reference and attrs.stain and not same_stain_target(reference["target"], attrs.stain["target"]):
        raise ConfigError(store.path, f"features of {ensemble.encoder} were normalised to "
                                      f"{attrs.stain['reference']}, model run {ensemble.run} to "
                                      f"{reference['reference']}",
                          f"re-extract with extract.stain_reference: {ensemble.model_dir}")


def _score_store(ensemble: Ensemble, store: SlideStore, site: str | None = None) -> ScoreAttrs:
    """Score one store (of ``site``, when the labels table names it) and write ``scores/<run>`` into it (with the
    out-of-fold scores of a slide of the run's cohort); returns what it wrote as the slide's attrs."""
    features = store.features(ensemble.encoder)
    ensemble.check_features(features, store.path)
    _check_weights(ensemble, store)
    attention, tile_scores, probs = ensemble.score_bag(features, site=site)
    folds = ensemble.held_out_by.get(store.slide_id)
    oof, oof_attrs = None, {}
    if folds is not None:
        oof_attention, oof_tiles, oof_probs = ensemble.score_bag(features, folds=folds, site=site)
        oof = (oof_attention, oof_tiles)
        oof_attrs = {"oof_folds": folds, "oof_probabilities": tuple(float(p) for p in oof_probs),
                     "oof_predicted": ensemble.classes[int(np.argmax(oof_probs))]}
    ood_score = ensemble.ood_score(store.slide_id, features)
    fine, fine_attrs = _score_fine_grid(ensemble, store, folds, site)
    attrs = ScoreAttrs(
        run=ensemble.run, model=ensemble.model_name, encoder=ensemble.encoder, classes=tuple(ensemble.classes),
        probabilities=tuple(float(p) for p in probs), predicted=ensemble.classes[int(np.argmax(probs))],
        wsi_version=__version__, temperature=ensemble.calibration.temperature,
        calibration_site=site if site in ensemble.calibration.sites else None, ood_score=ood_score,
        ood=None if ood_score is None else ood_score > 1, **oof_attrs, **fine_attrs)
    store.write_scores(ensemble.run, attention, tile_scores, attrs, out_of_fold=oof, fine=fine)
    return attrs


def _score_fine_grid(ensemble: Ensemble, store: SlideStore, folds: tuple[int, ...] | None, site: str | None
                     ) -> tuple[tuple[np.ndarray, np.ndarray] | None, dict]:
    """The fine grid's tiles (``wsi extract --high-res``) scored as one bag, by the fold models that held the
    slide out when it is of the run's cohort (as its heatmap shows it), else by the ensemble, calibrated as the
    slide is: ((attention, class scores), their ``ScoreAttrs.fine_*``), or (None, {}) for a slide without a fine
    grid."""
    if not store.has_fine_features(ensemble.encoder):
        return None, {}
    features, attrs = store.fine_features(ensemble.encoder)
    _check_weights(ensemble, store, attrs)
    if not len(features):  # no fine tile reaches the tissue rule: an empty map, no call
        empty = np.zeros(0, np.float32), np.zeros((0, len(ensemble.classes)), np.float32)
        return empty, {"fine_folds": folds, "fine_predicted": "none"}
    attention, tile_scores, probs = ensemble.score_bag(features, folds=folds, site=site)
    return (attention, tile_scores), {"fine_folds": folds, "fine_probabilities": tuple(float(p) for p in probs),
                                      "fine_predicted": ensemble.classes[int(np.argmax(probs))]}


def predict(out_dir, params: PredictConfig, model_dir, *, slide_ids: list[str] | None = None) -> StageSummary:
    """Score ``slide_ids`` (default: every complete store under ``OUT/stores``) with the run in ``model_dir``,
    one store at a time. The summary's outputs are ``predictions.csv`` and, when ``labels`` name slides outside
    the run's training cohort, ``metrics.json`` (external validation); its warning names the slides unlike the
    training slides (``ood``), and each done slide's result is its :class:`~wsi.store.ScoreAttrs`."""
    check_model_dir(model_dir, key="--model")
    ensemble = load_ensemble(model_dir, device="cuda" if params.resources["predict"]["gpu"] else "cpu",
                             precision=params.mil["precision"])
    if slide_ids is None:
        layout = Layout(out_dir)
        slide_ids = [s for s in layout.store_ids() if is_complete(layout.store(s))]
    targets = {sid: store_path(out_dir, sid) for sid in slide_ids}
    rows = []
    sites = slide_sites(params.labels)

    def work(slide_id: str) -> None:
        attrs = _score_store(ensemble, SlideStore.open(targets[slide_id]), sites.get(slide_id))
        rows.append([slide_id, *attrs.probabilities, attrs.predicted,
                     "" if attrs.ood_score is None else round(attrs.ood_score, 4),
                     "" if attrs.ood is None else attrs.ood, calibrated_by(ensemble.calibration, attrs)])
        return attrs

    ran = run_slides(out_dir, "predict", targets, work)
    csv_path = Layout(out_dir).predictions_csv(ensemble.run)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(csv_path,
                         ["slide_id", *probability_columns(ensemble.classes), "predicted", "ood_score", "ood",
                          "calibration"],
                         rows)
    metrics = external_validation(csv_path.parent, ensemble, rows, params.labels, params.mil)
    ran.outputs["predictions"] = csv_path
    if metrics:
        ran.outputs["external validation"] = metrics
    unlike = sorted(r[0] for r in rows if r[-2] is True)
    if unlike:
        ran.warnings.append(f"wsi predict: {len(unlike)} slide(s) unlike the slides the model was trained on "
                            f"(ood_score above 1; do not trust their probabilities): {', '.join(unlike)}")
    return ran


def slide_sites(labels) -> dict[str, str]:
    """Each slide's site from the labels table's ``site`` column (none without a table or the column)."""
    if not labels:
        return {}
    table = read_labels(labels)
    if "site" not in table.columns:
        return {}
    return {row.slide_id: row.site for row in table.itertuples(index=False) if row.site}


def calibrated_by(calibration: Calibration, attrs: ScoreAttrs) -> str:
    """predictions.csv's ``calibration``: ``site <name>`` (its own fit), ``cohort`` (the run's temperature) or
    ``none``."""
    if attrs.calibration_site is not None:
        return f"site {attrs.calibration_site}"
    return "none" if calibration.temperature is None else "cohort"


def external_validation(folder: Path, ensemble: Ensemble, rows: list[list], labels, mil: dict) -> Path | None:
    """``metrics.json`` and ``roc.png`` in ``folder`` for the predicted ``rows`` (slide_id, probabilities...,
    predicted) whose slide has a label in ``labels`` and is not of the run's training cohort; returns the metrics
    path, or None (and removes an older pair) when no labelled new slide was scored."""
    metrics_path, roc_path = folder / "metrics.json", folder / "roc.png"
    metrics_path.unlink(missing_ok=True)
    roc_path.unlink(missing_ok=True)
    if not labels:
        return None
    table = read_labels(labels)
    unknown = sorted(set(table["label"]) - set(ensemble.classes))
    if unknown:
        raise ConfigError(labels, f"label(s) {format_ids(unknown)} are not classes of model run {ensemble.run} "
                                  f"({', '.join(ensemble.classes)})", "use the run's class names in the labels table")
    known = table.set_index("slide_id")
    scored = [r for r in rows if r[0] in known.index and r[0] not in ensemble.held_out_by]
    if not scored:
        return None
    y_true = [ensemble.classes.index(known.at[r[0], "label"]) for r in scored]
    probs = [r[1:1 + len(ensemble.classes)] for r in scored]
    sites = [known.at[r[0], "site"] for r in scored] if "site" in known.columns else None
    metrics = classification_metrics(y_true, probs, ensemble.classes,
                                     groups=[known.at[r[0], "patient_id"] for r in scored], sites=sites,
                                     n_bootstrap=mil["bootstrap"], seed=mil["seed"])
    metrics["labels"] = str(labels)
    metrics["left_out_training_slides"] = sum(r[0] in known.index and r[0] in ensemble.held_out_by for r in rows)
    plot_roc(y_true, probs, ensemble.classes, metrics, roc_path, title="ROC, external validation")
    return write_json(metrics_path, metrics)
