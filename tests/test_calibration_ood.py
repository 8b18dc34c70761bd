"""Calibration (wsi.mil.calibration) and the out-of-distribution score (wsi.mil.ood) on known numbers."""

import numpy as np
import pytest

from wsi.mil.calibration import (
    apply_temperature,
    brier,
    confident_errors,
    cross_fitted,
    ece,
    fit_temperature,
    reliability_bins,
)
from wsi.mil.metrics import _auroc
from wsi.mil.ood import OODReference, conformal_threshold, fit_out_of_fold, slide_descriptor


def _binary(p_tumour):
    p = np.asarray(p_tumour, dtype=float)
    return np.c_[1 - p, p]


def test_temperature_softens_overconfident_wrong_calls_without_changing_any_call_or_ranking():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    p = np.where(y == 1, rng.uniform(0.9, 0.999, 60), rng.uniform(0.001, 0.1, 60))
    p[[0, 1, 2]] = [0.99, 0.97, 0.995]  # normal slides called tumour with full confidence
    p[[40, 41]] = [0.01, 0.02]          # tumour slides called normal
    probs = _binary(p)
    assert confident_errors(y, probs)["confident_wrong"] == 5
    t = fit_temperature(y, probs)
    calibrated = apply_temperature(probs, t)
    assert t > 1.5
    assert confident_errors(y, calibrated)["max_wrong_confidence"] < 0.96  # from 0.995
    assert (calibrated.argmax(1) == probs.argmax(1)).all()
    assert _auroc(y == 1, calibrated[:, 1]) == pytest.approx(_auroc(y == 1, probs[:, 1]))
    def log_loss(p):
        return -np.log(p[np.arange(len(y)), y]).mean()

    assert log_loss(calibrated) < log_loss(probs)


def test_a_perfectly_separated_cohort_is_not_sharpened_to_certainty():
    """Hard-label likelihood would send the temperature to zero; Platt's targets stop at (n+1)/(n+2)."""
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    probs = _binary(np.where(y == 1, 0.8, 0.2))
    calibrated = apply_temperature(probs, fit_temperature(y, probs))
    assert calibrated[y == 1, 1] == pytest.approx(11 / 12, abs=0.01)


def test_cross_fitting_calibrates_each_fold_without_its_own_labels():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    probs = _binary(np.clip(np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.2, 40), 0.01, 0.99))
    groups = np.arange(40) % 4
    flipped = y.copy()
    flipped[groups == 0] = 1 - flipped[groups == 0]
    a, b = cross_fitted(y, probs, groups), cross_fitted(flipped, probs, groups)
    assert np.allclose(a[groups == 0], b[groups == 0])        # fold 0's own labels never enter its calibration
    assert not np.allclose(a[groups == 1], b[groups == 1])    # but they calibrate the other folds


def test_brier_ece_and_reliability_bins_on_hand_worked_numbers():
    y = np.array([1, 1, 0, 0])
    probs = _binary([0.9, 0.6, 0.4, 0.8])  # the last is wrong at 0.8
    assert brier(y, probs) == pytest.approx((0.01 + 0.16 + 0.16 + 0.64) / 4)
    bins = {round(b["lo"], 1): b for b in reliability_bins(y, probs)}
    # bins of the predicted class's probability: [0.6, 0.7) two right calls, [0.8, 0.9) one wrong, [0.9, 1] one right
    assert bins[0.6]["n"] == 2 and bins[0.6]["accuracy"] == 1.0 and bins[0.8]["accuracy"] == 0.0
    assert ece(y, probs) == pytest.approx(0.5 * (1 - 0.6) + 0.25 * 0.8 + 0.25 * (1 - 0.9))
    assert confident_errors(y, probs) == {"max_wrong_confidence": pytest.approx(0.8), "confident_wrong": 0}


def _slide(rng, shift=0.0, scale=1.0, n=200, dim=32):
    return slide_descriptor(rng.normal(shift, scale, size=(n, dim)) + rng.normal(0, 0.1, dim))


def test_ood_threshold_out_of_fold_flags_a_new_stain_and_a_bag_of_glass_but_few_like_the_training():
    rng = np.random.default_rng(2)
    training = {f"s{i}": _slide(rng) for i in range(40)}
    folds = [[f"s{i}" for i in range(k, 40, 5)] for k in range(5)]
    reference, oof = fit_out_of_fold(training, folds, alpha=0.02)
    assert set(oof) == set(training) and sum(v > 1 for v in oof.values()) <= 1  # the conformal rank: the largest
    new_like = np.array([reference.score(_slide(rng)) for _ in range(100)])
    assert (new_like > 1).mean() <= 0.05
    new_stain = np.array([reference.score(_slide(rng, shift=0.3)) for _ in range(20)])
    assert (new_stain > 1).all()
    glass = slide_descriptor(np.full((50, 32), 3.0))  # every tile the same: no texture, far from tissue
    assert reference.score(glass) > 1


def test_conformal_threshold_rank_and_reference_round_trip(tmp_path):
    scores = np.arange(1, 11, dtype=float)
    assert conformal_threshold(scores, 0.2) == 9.0     # ceil(11 * 0.8) = 9th smallest
    assert conformal_threshold(scores, 0.01) == 10.0   # the rank past n: the largest
    reference = OODReference.fit(np.random.default_rng(3).normal(size=(8, 6)), threshold=2.5)
    reference.save(tmp_path)
    again = OODReference.load(tmp_path, 2.5)
    x = np.ones(6)
    assert again.score(x) == pytest.approx(reference.score(x), rel=1e-5)


def test_a_missing_or_damaged_reference_is_one_error_naming_its_file(tmp_path):
    from wsi.errors import ConfigError

    with pytest.raises(ConfigError, match="ood.safetensors.*cannot be read"):
        OODReference.load(tmp_path, 1.0)
    (tmp_path / "ood.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="re-run `wsi train`"):
        OODReference.load(tmp_path, 1.0)


def test_site_calibration_gives_a_site_scored_on_another_scale_its_own_back():
    """Site B's models score every slide towards tumour (its normals at 0.75-0.9): the cohort's one temperature
    cannot fix that, B's own fit does; a site of two slides stays near the cohort's; other sites get the cohort's
    temperature; nothing moves the ranking within a site."""
    from wsi.mil.calibration import Calibration, fit_calibration

    rng = np.random.default_rng(3)
    y_a = np.r_[np.zeros(15, int), np.ones(15, int)]
    p_a = np.where(y_a == 1, rng.uniform(0.7, 0.95, 30), rng.uniform(0.05, 0.3, 30))
    y_b = np.r_[np.zeros(10, int), np.ones(10, int)]
    p_b = np.where(y_b == 1, rng.uniform(0.95, 0.995, 20), rng.uniform(0.75, 0.9, 20))
    y_c, p_c = np.array([0, 1]), np.array([0.6, 0.97])
    y, probs = np.r_[y_a, y_b, y_c], _binary(np.r_[p_a, p_b, p_c])
    sites = ["A"] * 30 + ["B"] * 20 + ["C"] * 2
    fitted = fit_calibration("site", y, probs, sites)
    cohort_only = fit_calibration("temperature", y, probs)
    assert fitted.temperature == pytest.approx(cohort_only.temperature)
    b = np.array([fitted.apply(p, "B") for p in probs[30:50]])
    assert (b.argmax(1) == y_b).mean() >= 0.9  # B's normals called normal again
    assert (cohort_only.apply(probs[30:50]).argmax(1) == y_b).mean() <= 0.6  # the one temperature cannot
    assert _auroc(y_b == 1, b[:, 1]) == pytest.approx(_auroc(y_b == 1, p_b))  # B's own ranking kept
    t_c, bias_c = fitted.sites["C"]
    assert abs(np.log(t_c / fitted.temperature)) < 0.5 and abs(bias_c[1]) < 1.0  # two slides: near the cohort
    np.testing.assert_allclose(fitted.apply(probs[:3], "unseen"), cohort_only.apply(probs[:3]))
    assert Calibration.from_dict(fitted.to_dict()) == fitted
    assert Calibration.from_dict({}).apply(probs[:2]).tolist() == probs[:2].tolist()  # a run before: raw
