"""Is a slide like the slides a model was trained on? An out-of-distribution score from feature statistics.

A MIL model scores any bag it is given: a slide from a scanner or a stain it never saw, or a bag of ink, blur or
bare glass, still gets a probability, often a confident one. The run therefore keeps a reference of its training
slides, and predict says of every slide whether it lies outside it.

* **Descriptor of a slide**: the mean and the standard deviation over its tiles of each feature (2 x D values): a
  stain or scanner shift moves the means of many features at once; ink, blur or glass moves them far.
* **Distance**: the root mean square of the descriptor's z-scores against the training slides (each value
  centred on the training slides' mean and divided by their standard deviation, floored at a tenth of the
  median one so a nearly constant feature cannot dominate). With tens of slides and thousands of values a full
  covariance cannot be estimated; this diagonal distance needs none.
* **Threshold, out of fold**: each cross-validation fold's test slides are scored against a reference fitted on
  the fold's other slides, as a new slide would be. The threshold is the conformal ``1 - ood_alpha`` quantile
  of those out-of-fold distances (the ``ceil((n + 1)(1 - alpha))``-th smallest, the largest when that exceeds
  ``n``), so about ``alpha`` of slides like the training ones are flagged.
* **Reported**: ``ood_score`` = distance / threshold (above 1: flagged, ``ood`` true). A slide of the run's own
  cohort gets its out-of-fold score, not its flattering in-sample one.

The reference (centre and scale, 2 x D float32 each) is ``ood.safetensors`` in the run folder; ``run.json``'s
``ood`` holds the threshold and how it was fitted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

REFERENCE_FILE = "ood.safetensors"
DESCRIPTOR = "mean and standard deviation of each feature over the slide's tiles"
_SCALE_FLOOR = 0.1  # of the median scale


def slide_descriptor(features: np.ndarray) -> np.ndarray:
    """(N, D) tile features -> (2 D,) float64: per-feature mean and standard deviation."""
    features = np.asarray(features, dtype=np.float64)
    return np.concatenate([features.mean(axis=0), features.std(axis=0)])


@dataclass(frozen=True)
class OODReference:
    centre: np.ndarray
    scale: np.ndarray
    threshold: float = 1.0

    @classmethod
    def fit(cls, descriptors: np.ndarray, threshold: float = 1.0) -> OODReference:
        descriptors = np.asarray(descriptors, dtype=np.float64)
        scale = descriptors.std(axis=0)
        floor = max(float(np.median(scale)) * _SCALE_FLOOR, 1e-8)
        return cls(descriptors.mean(axis=0), np.maximum(scale, floor), threshold)

    def distance(self, descriptors: np.ndarray) -> np.ndarray:
        """Root mean square z-score of each descriptor (rows of a 2-d array, or one 1-d descriptor)."""
        z = (np.asarray(descriptors, dtype=np.float64) - self.centre) / self.scale
        return np.sqrt(np.mean(z ** 2, axis=-1))

    def score(self, descriptors: np.ndarray) -> np.ndarray:
        """Distance over the threshold: above 1 is out of distribution."""
        return self.distance(descriptors) / self.threshold

    def save(self, run_dir) -> Path:
        from safetensors.numpy import save_file

        path = Path(run_dir) / REFERENCE_FILE
        save_file({"centre": self.centre.astype(np.float32), "scale": self.scale.astype(np.float32)}, str(path),
                  metadata={"threshold": repr(float(self.threshold))})
        return path

    @classmethod
    def load(cls, run_dir, threshold: float) -> OODReference:
        """The reference a run saved; a ConfigError naming the file when it is missing or damaged."""
        from safetensors.numpy import load_file

        path = Path(run_dir) / REFERENCE_FILE
        try:
            arrays = load_file(str(path))
            return cls(arrays["centre"].astype(np.float64), arrays["scale"].astype(np.float64), float(threshold))
        except Exception as e:  # OSError, a missing key, or safetensors' own SafetensorError
            raise ConfigError(path, f"the out-of-distribution reference cannot be read ({type(e).__name__}: {e})",
                              "re-run `wsi train`") from e


def conformal_threshold(scores, alpha: float) -> float:
    """The ``ceil((n + 1)(1 - alpha))``-th smallest score (the largest when that rank exceeds n)."""
    ordered = np.sort(np.asarray(scores, dtype=float))
    rank = min(math.ceil((len(ordered) + 1) * (1 - alpha)), len(ordered))
    return float(ordered[rank - 1])


def fit_out_of_fold(descriptors: dict[str, np.ndarray], test_sets, alpha: float
                    ) -> tuple[OODReference, dict[str, float]]:
    """The reference of all ``descriptors`` (slide id -> descriptor) with its out-of-fold threshold, and each
    slide's out-of-fold ``ood_score``; ``test_sets``: the slide ids each fold held out (every slide in one)."""
    oof: dict[str, float] = {}
    for test in test_sets:
        held_out = set(test)
        reference = OODReference.fit(np.stack([d for s, d in descriptors.items() if s not in held_out]))
        oof.update({s: float(reference.distance(descriptors[s])) for s in test})
    threshold = conformal_threshold(list(oof.values()), alpha)
    reference = OODReference.fit(np.stack(list(descriptors.values())), threshold)
    return reference, {s: d / threshold for s, d in oof.items()}
