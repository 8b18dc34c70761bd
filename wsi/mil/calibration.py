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
* ``mil.calibration: site`` (the labels table must have a ``site`` column) adds, for each site of the training
  cohort, its own temperature and per-class offsets of the log-probabilities (:func:`fit_site`), fitted on its
  out-of-fold slides and drawn towards the cohort's temperature as if the cohort weighed
  :data:`PRIOR_SLIDES` slides more: a site whose slides the models score on another scale (a scanner that makes
  every slide look more like tumour) gets its own scale back, and a site of a few slides stays near the cohort's.
  Predict applies a site's fit to slides whose site the labels table names; slides of any other site get the
  cohort's temperature. Rankings within a site never change; across sites they can (that is the point).
* :func:`brier`, :func:`ece` and :func:`confident_errors`: Brier score (binary: mean of (p_positive - y)^2;
  multi-class: mean over slides of the squared error summed over classes) and top-label ECE over ``ECE_BINS``
  equal-width bins of the predicted class's probability (the mean gap between confidence and accuracy, weighted
  by each bin's share of slides), the highest probability among wrong calls, and the wrong calls above 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ECE_BINS = 10
METHODS = ("temperature", "site", "none")
PRIOR_SLIDES = 4.0  # a site's own fit weighs against the cohort's as if the cohort's were this many more slides
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


def apply_site(probs, temperature: float, bias) -> np.ndarray:
    """Probabilities (n, C) or (C,) with log-probabilities divided by ``temperature`` and ``bias`` (C,) added."""
    probs = np.asarray(probs, dtype=float)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / float(temperature) + np.asarray(bias, dtype=float)
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=-1, keepdims=True)


def fit_site(y_true, probs, temperature: float) -> tuple[float, tuple[float, ...]]:
    """One site's ``(temperature, bias)``: minimises the cross-entropy of its slides against their smoothed
    targets plus a Gaussian prior holding log-temperature at the cohort's and the offsets (the first class's fixed
    at 0) at 0, as informative as :data:`PRIOR_SLIDES` slides at p = 0.5 would be."""
    from scipy.optimize import minimize

    y_true, probs = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float)
    n_classes = probs.shape[1]
    if len(y_true) == 0:
        return float(temperature), (0.0,) * n_classes
    targets = smoothed_targets(y_true, n_classes)
    anchor = np.log(temperature)

    def loss(theta: np.ndarray) -> float:
        bias = np.concatenate([[0.0], theta[1:]])
        scaled = np.clip(apply_site(probs, np.exp(theta[0]), bias), _EPS, 1.0)
        data = -(targets * np.log(scaled)).sum()
        # a slide at p = 0.5 informs a logit by 1/4 (its Fisher information): the prior is worth PRIOR_SLIDES such
        return float(data + PRIOR_SLIDES / 8 * ((theta[0] - anchor) ** 2 + (theta[1:] ** 2).sum()))

    start = np.concatenate([[anchor], np.zeros(n_classes - 1)])
    bounds = [_LOG_T_BOUNDS] + [(-10.0, 10.0)] * (n_classes - 1)
    fit = minimize(loss, start, method="L-BFGS-B", bounds=bounds)
    return float(np.exp(fit.x[0])), (0.0, *(float(b) for b in fit.x[1:]))


@dataclass(frozen=True)
class Calibration:
    """What a run's predictions go through: ``method`` (``mil.calibration``), the cohort's temperature (None for
    ``none``) and, for ``site``, each training site's ``(temperature, bias)``."""

    method: str = "none"
    temperature: float | None = None
    sites: dict[str, tuple[float, tuple[float, ...]]] = field(default_factory=dict)

    def apply(self, probs, site: str | None = None) -> np.ndarray:
        """``probs`` calibrated: by ``site``'s own fit when the run has one, else by the cohort's temperature."""
        if site is not None and site in self.sites:
            return apply_site(probs, *self.sites[site])
        if self.temperature is None:
            return np.asarray(probs, dtype=float)
        return apply_temperature(probs, self.temperature)

    def to_dict(self) -> dict:
        """run.json's ``calibration`` entry."""
        entry: dict = {"method": self.method}
        if self.temperature is not None:
            entry["temperature"] = self.temperature
        if self.method == "site":
            entry["sites"] = {s: {"temperature": t, "bias": list(b)} for s, (t, b) in self.sites.items()}
        return entry

    @classmethod
    def from_dict(cls, entry: dict) -> Calibration:
        return cls(entry.get("method", "none"), entry.get("temperature"),
                   {s: (float(v["temperature"]), tuple(float(b) for b in v["bias"]))
                    for s, v in (entry.get("sites") or {}).items()})


def fit_calibration(method: str, y_true, probs, sites=None) -> Calibration:
    """The run's :class:`Calibration` for ``mil.calibration`` ``method`` on (labels, out-of-fold probabilities)
    and, for ``site``, each slide's site."""
    if method == "none":
        return Calibration()
    temperature = fit_temperature(y_true, probs)
    if method == "temperature":
        return Calibration("temperature", temperature)
    y_true, probs, sites = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float), np.asarray(sites)
    return Calibration("site", temperature, {str(s): fit_site(y_true[sites == s], probs[sites == s], temperature)
                                             for s in np.unique(sites)})


def cross_fitted(y_true, probs, groups, method: str = "temperature", sites=None) -> np.ndarray:
    """``probs`` (n, C) calibrated group by group: the slides of each group (a CV fold) by a calibration
    (:func:`fit_calibration`) fitted on the slides of every other group."""
    y_true, probs, groups = np.asarray(y_true, dtype=int), np.asarray(probs, dtype=float), np.asarray(groups)
    sites = None if sites is None else np.asarray(sites)
    out = np.empty_like(probs)
    for g in np.unique(groups):
        inside = groups == g
        fitted = fit_calibration(method, y_true[~inside], probs[~inside],
                                 None if sites is None else sites[~inside])
        if sites is None:
            out[inside] = fitted.apply(probs[inside])
        else:
            out[inside] = np.array([fitted.apply(p, str(s)) for p, s in zip(probs[inside], sites[inside])])
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
