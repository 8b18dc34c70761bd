"""Calibrated slide probabilities: temperature scaling fitted on the out-of-fold predictions, and the figures that
say how far a probability can be trusted (Brier score, expected calibration error, the bins of a reliability
diagram, which :func:`wsi.mil.metrics.plot_reliability` draws).

An attention-MIL ensemble ranks slides well but its probabilities run to 0.0003 and 0.9996, so a wrong call comes
with full confidence. Temperature scaling divides the log-probabilities by one number ``T`` (``T > 1`` softens
them) fitted on the out-of-fold predictions of the run's own cross-validation, by cross-entropy against Platt's
smoothed targets (:func:`smoothed_targets`). It never
changes which class is predicted, nor any ranking: AUROC, balanced accuracy and F1 stay as they were; only the
confidence moves.

* :func:`fit_temperature` fits ``T`` (bounded to [0.05, 50]) on (labels, probabilities).
* :func:`cross_fitted` calibrates each fold's out-of-fold slides with a ``T`` fitted on the other folds' slides,
  so the Brier score and ECE a run reports are not flattered by the fit; the run keeps the ``T`` fitted on all
  its out-of-fold slides, which predict applies.
* :func:`brier`, :func:`ece` and :func:`confident_errors`: Brier score (binary: mean of (p_positive - y)^2;
  multi-class: mean over slides of the squared error summed over classes) and top-label ECE over ``ECE_BINS``
  equal-width bins of the predicted class's probability (the mean gap between confidence and accuracy, weighted
  by each bin's share of slides), the highest probability among wrong calls, and the wrong calls above 0.95.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 10
CONFIDENT = 0.95  # a wrong call above this probability is counted in the metrics
_LOG_T_BOUNDS = (np.log(0.05), np.log(50.0))
_EPS = 1e-7


def apply_temperature(probs, temperature: float) -> np.ndarray:
    """Probabilities (n, C) or (C,) with their log-probabilities divided by ``temperature``."""
    probs = np.asarray(probs, dtype=float)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / float(temperature)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def smoothed_targets(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Platt's targets: a slide of a class with ``n`` slides wants ``(n + 1) / (n + 2)`` on its class and the rest
    spread over the others. Fitted against hard labels, a perfectly separated cohort (the usual case in a few
    dozen slides) drives the temperature to zero and every probability to 0 or 1; these targets keep the
    confidence at what that many slides can show."""
    counts = np.bincount(y_true, minlength=n_classes).astype(float)
    own = (counts[y_true] + 1) / (counts[y_true] + 2)
    targets = np.repeat(((1 - own) / max(n_classes - 1, 1))[:, None], n_classes, axis=1)
    targets[np.arange(len(y_true)), y_true] = own
    return targets


def _cross_entropy(targets: np.ndarray, probs: np.ndarray, temperature: float) -> float:
    scaled = np.clip(apply_temperature(probs, temperature), _EPS, 1.0)
    return float(-(targets * np.log(scaled)).sum(axis=1).mean())


def fit_temperature(y_true, probs) -> float:
    """The temperature that minimises the cross-entropy of ``probs`` (n, C) against the smoothed targets of
    ``y_true`` (n,) (:func:`smoothed_targets`); 1.0 when there are no slides."""
    from scipy.optimize import minimize_scalar

    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    if len(y_true) == 0:
        return 1.0
    targets = smoothed_targets(y_true, probs.shape[1])
    fit = minimize_scalar(lambda log_t: _cross_entropy(targets, probs, np.exp(log_t)), bounds=_LOG_T_BOUNDS,
                          method="bounded", options={"xatol": 1e-4})
    return float(np.exp(fit.x))


def cross_fitted(y_true, probs, groups) -> np.ndarray:
    """``probs`` (n, C) calibrated group by group: the slides of each group (a CV fold) by a temperature fitted on
    the slides of every other group."""
    y_true, probs, groups = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float), np.asarray(groups)
    out = np.empty_like(probs)
    for g in np.unique(groups):
        inside = groups == g
        out[inside] = apply_temperature(probs[inside], fit_temperature(y_true[~inside], probs[~inside]))
    return out


def brier(y_true: np.ndarray, probs: np.ndarray) -> float:
    onehot = np.eye(probs.shape[1])[y_true]
    if probs.shape[1] == 2:
        return float(np.mean((probs[:, 1] - onehot[:, 1]) ** 2))
    return float(np.mean(((probs - onehot) ** 2).sum(axis=1)))


def reliability_bins(y_true: np.ndarray, probs: np.ndarray) -> list[dict]:
    """Per non-empty bin of the predicted class's probability: its range, slide count, mean confidence and
    accuracy."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == y_true
    index = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    return [{"lo": b / ECE_BINS, "hi": (b + 1) / ECE_BINS, "n": int((index == b).sum()),
             "confidence": float(confidence[index == b].mean()), "accuracy": float(correct[index == b].mean())}
            for b in range(ECE_BINS) if (index == b).any()]


def ece(y_true: np.ndarray, probs: np.ndarray) -> float:
    bins = reliability_bins(y_true, probs)
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / max(n, 1))


def confident_errors(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The highest probability among wrong calls (0 when none) and the count of wrong calls above
    ``CONFIDENT``."""
    confidence, wrong = probs.max(axis=1), probs.argmax(axis=1) != y_true
    return {"max_wrong_confidence": float(confidence[wrong].max()) if wrong.any() else 0.0,
            "confident_wrong": int((wrong & (confidence > CONFIDENT)).sum())}
