"""The numbers a pathology paper reports, each with a 95% bootstrap confidence interval, and the ROC figure.

Predictions are the argmax of the class probabilities. Binary tasks report the AUROC and F1 of the positive
class (the second class); multi-class tasks report one-vs-rest AUROC per class, their macro mean and the macro
F1. Balanced accuracy is the mean recall over the classes present. The confusion matrix is given as counts
(rows: true class, columns: predicted class) and as row-normalised rates, whose intervals are per cell.

The bootstrap resamples patients (all slides of a drawn patient go in together), since slides of one patient
are not independent; resamples lacking a class give no AUROC for it and are skipped for that figure only.

Calibration (:mod:`.calibration`): the Brier score and the expected calibration error (ECE), with intervals, and
the highest probability among wrong calls (``max_wrong_confidence``) with the count of wrong calls above 0.95
(``confident_wrong``).

Given each slide's site, ``per_site`` repeats AUROC and balanced accuracy (with their intervals, resampled by
patient within the site) for every site: a model that learnt a site's stain instead of the tissue scores well on
the pooled slides and poorly, or at chance, within a site. A site with one class has no AUROC.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .. import atomic
from .calibration import ECE_BINS, brier, confident_errors, ece, reliability_bins


def _confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC with ties counted half; NaN when one side is empty."""
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _point_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray | float]:
    n_classes = probs.shape[1]
    cm = _confusion(y_true, probs.argmax(axis=1), n_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    diagonal = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, diagonal / support, np.nan)
        precision = np.where(predicted > 0, diagonal / predicted, 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0,
                      2 * precision * np.nan_to_num(recall) / (precision + np.nan_to_num(recall)), 0.0)
        rates = cm / support[:, None]
    auroc = np.array([_auroc(y_true == c, probs[:, c]) for c in range(n_classes)])
    out = {"balanced_accuracy": float(np.nanmean(recall)), "confusion_rates": rates,
           "brier": brier(y_true, probs), "ece": ece(y_true, probs)}
    if n_classes == 2:
        out["auroc"] = auroc[1:]
        out["f1"] = float(f1[1])
    else:
        out["auroc"] = auroc
        out["auroc_macro"] = float(np.nanmean(auroc)) if np.isfinite(auroc).any() else float("nan")
        out["f1"] = float(f1.mean())
    return out


def _interval(samples: list) -> list:
    """Elementwise 2.5/97.5 percentiles over bootstrap samples, ignoring NaN; nested lists for arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells (a class never drawn) stay NaN
        lo, hi = np.nanpercentile(np.asarray(samples, dtype=float), [2.5, 97.5], axis=0)
    return np.stack([lo, hi], axis=-1).tolist()


def _figure(value, interval) -> dict:
    return {"value": None if not np.isfinite(value) else float(value),
            "ci95": [None if not np.isfinite(x) else float(x) for x in interval]}


def classification_metrics(y_true, probs, classes, *, groups=None, sites=None, n_bootstrap: int = 1000,
                           seed: int = 0) -> dict:
    """Metrics of slide predictions ``probs`` (n, C) against class indices ``y_true`` (n,), with 95% CIs from
    ``n_bootstrap`` patient-level resamples (``groups``: the patient of each slide; default one per slide); with
    ``sites`` (the site of each slide) also ``per_site``: the same AUROC, balanced accuracy, Brier score and ECE within
    each site."""
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    classes = [str(c) for c in classes]
    n_classes = len(classes)
    groups = np.asarray(groups if groups is not None else np.arange(len(y_true)))
    _, group_index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)] if len(y_true) else []

    point = _point_metrics(y_true, probs)
    rng = np.random.default_rng(seed)
    samples: dict[str, list] = {k: [] for k in point}
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(members), size=len(members))
        idx = np.concatenate([members[g] for g in drawn])
        for k, v in _point_metrics(y_true[idx], probs[idx]).items():
            samples[k].append(v)

    def ci(key):
        return _interval(samples[key]) if n_bootstrap else np.full(np.shape(point[key]) + (2,), np.nan).tolist()

    auroc_classes = classes[1:] if n_classes == 2 else classes
    auroc_ci = ci("auroc")
    out = {
        "n_slides": int(len(y_true)),
        "n_patients": int(len(members)),
        "classes": classes,
        "support": np.bincount(y_true, minlength=n_classes).tolist(),
        "bootstrap": {"resamples": int(n_bootstrap), "unit": "patient", "seed": int(seed)},
        "auroc": {c: _figure(point["auroc"][i], auroc_ci[i]) for i, c in enumerate(auroc_classes)},
        "balanced_accuracy": _figure(point["balanced_accuracy"], ci("balanced_accuracy")),
        "f1": _figure(point["f1"], ci("f1")),
        "brier": _figure(point["brier"], ci("brier")),
        "ece": _figure(point["ece"], ci("ece")),
        **confident_errors(y_true, probs),
    }
    if n_classes == 2:
        out["positive_class"] = classes[1]
    else:
        out["auroc_macro"] = _figure(point["auroc_macro"], ci("auroc_macro"))
    if sites is not None:
        sites = np.asarray(sites, dtype=str)
        out["per_site"] = {}
        for site in sorted(set(sites.tolist())):
            within = sites == site
            m = classification_metrics(y_true[within], probs[within], classes, groups=groups[within],
                                       n_bootstrap=n_bootstrap, seed=seed)
            out["per_site"][site] = {k: m[k] for k in ("n_slides", "n_patients", "support", "auroc",
                                                       "balanced_accuracy", "brier", "ece")}
    rates_ci = ci("confusion_rates")
    cm = _confusion(y_true, probs.argmax(axis=1), n_classes)
    out["confusion_matrix"] = {
        "labels": classes,
        "counts": cm.tolist(),
        "rates": [[_figure(point["confusion_rates"][i][j], rates_ci[i][j]) for j in range(n_classes)]
                  for i in range(n_classes)],
    }
    return out


def _square_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.5, 4.5), dpi=120)


def _save(fig, path) -> Path:
    """Write ``fig`` as a PNG via tmp + rename and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def plot_roc(y_true, probs, classes, metrics: dict, path, *, title: str = "ROC, cross-validated") -> Path:
    """ROC curve(s) of the pooled predictions (one-vs-rest per class when multi-class) with AUROC and CI in
    the legend; written via tmp + rename."""
    from sklearn.metrics import roc_curve

    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=float)
    shown = [1] if len(classes) == 2 else list(range(len(classes)))
    fig, ax = _square_figure()
    for c in shown:
        name = str(classes[c])
        if (y_true == c).all() or not (y_true == c).any():
            continue
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        figure = metrics["auroc"][name]
        lo, hi = figure["ci95"]
        ci_text = f" [{lo:.3f}-{hi:.3f}]" if lo is not None and hi is not None else ""
        ax.plot(fpr, tpr, lw=1.5, label=f"{name}: AUROC {figure['value']:.3f}{ci_text}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{title} (n={len(y_true)})")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability(y_true, probs, metrics: dict, path, *, title: str = "Reliability, cross-validated") -> Path:
    """The reliability diagram: accuracy against confidence per bin (marker area ~ slides), the diagonal of a
    calibrated model, and the Brier score and ECE in the legend; written via tmp + rename."""
    bins = reliability_bins(np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float))
    fig, ax = _square_figure()
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8, label="calibrated")
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS,
           alpha=0.35, edgecolor="k", label="accuracy per bin")
    ax.scatter([b["confidence"] for b in bins], [b["accuracy"] for b in bins], s=[12 + 6 * b["n"] for b in bins],
               c="C3", zorder=3, label="mean confidence")
    ax.set(xlabel="confidence (probability of the predicted class)", ylabel="accuracy", xlim=(0, 1),
           ylim=(0, 1.01), title=f"{title} (n={len(y_true)})\nBrier {metrics['brier']['value']:.3f}, "
                                 f"ECE {metrics['ece']['value']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
