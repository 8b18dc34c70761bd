"""Models that hold across institutions: site-aware folds, per-site metrics, external validation and stain
normalisation at extraction (issue 13)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from wsi.checks import check_workflow_inputs
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.mil import load_cohort, make_folds
from wsi.mil.data import ConfoundedSiteWarning

from test_mil import ENCODER, bag_features, make_store

SITES = ("A", "B", "C", "D")


def site_cohort(out, per_site=((3, 3), (2, 4), (4, 2), (3, 3)), *, seed=0, site_column=True, sites=SITES):
    """Stores and a labels table with a site column: ``per_site[i]`` = (normal, tumour) slides of site i."""
    rng = np.random.default_rng(seed)
    rows = []
    for site, (n_normal, n_tumour) in zip(sites, per_site):
        for j in range(n_normal + n_tumour):
            tumour = j >= n_normal
            sid = f"{site}{j:02d}"
            make_store(out, sid, bag_features(rng, tumour, int(rng.integers(30, 50)))[0])
            rows.append((sid, "tumour" if tumour else "normal", site))
    labels = out / "labels.csv"
    header = "slide_id,label,site\n" if site_column else "slide_id,label\n"
    labels.write_text(header + "".join(f"{s},{l},{t}\n" if site_column else f"{s},{l}\n" for s, l, t in rows))
    return labels


def site_of(slide_id):
    return slide_id[0]


def test_site_folds_keep_every_site_whole_and_balance_the_classes(tmp_path):
    per_site = ((3, 3), (2, 4), (4, 2), (3, 3), (1, 5), (5, 1))
    labels = site_cohort(tmp_path, per_site, sites="ABCDEF")
    cohort = load_cohort(tmp_path, labels, ENCODER)
    folds = make_folds(cohort, 3, seed=0, cv="site", validation="never")
    tested = [s for f in folds for s in f.test]
    assert sorted(tested) == sorted(b.slide_id for b in cohort.bags)  # every slide tested once
    label = {b.slide_id: b.label for b in cohort.bags}
    for fold in folds:
        test_sites = {site_of(s) for s in fold.test}
        assert not test_sites & {site_of(s) for s in fold.train}  # no site on both sides
        assert len(test_sites) == 2
        tumours = sum(label[s] == "tumour" for s in fold.test)
        assert tumours == 6 and len(fold.test) == 12  # 18 tumour of 36 slides, 3 folds: balanced exactly here
    # patient-grouped folds (the default) do split sites
    patient = make_folds(cohort, 3, seed=0, validation="never")
    assert any({site_of(s) for s in f.test} & {site_of(s) for s in f.train} for f in patient)


def test_leave_one_site_out_tests_each_site_once_on_a_model_trained_on_the_others(tmp_path):
    labels = site_cohort(tmp_path)
    cohort = load_cohort(tmp_path, labels, ENCODER)
    folds = make_folds(cohort, 5, seed=0, cv="leave_one_site_out", validation="never")
    assert [sorted({site_of(s) for s in f.test}) for f in folds] == [[s] for s in SITES]
    for fold in folds:
        assert site_of(fold.test[0]) not in {site_of(s) for s in fold.train}
    with_val = make_folds(cohort, 5, seed=0, cv="leave_one_site_out", validation="always")
    assert [{site_of(s) for s in f.val} for f in with_val] == [{"B"}, {"C"}, {"D"}, {"A"}]  # the next site


def test_a_site_holding_one_class_is_named_in_a_warning(tmp_path):
    labels = site_cohort(tmp_path, ((3, 3), (0, 4), (4, 2), (3, 3)))
    cohort = load_cohort(tmp_path, labels, ENCODER)
    with pytest.warns(ConfoundedSiteWarning, match=r"site 'B' holds only class 'tumour' \(4 slide"):
        make_folds(cohort, 4, seed=0, cv="leave_one_site_out")
    ok = tmp_path / "ok"
    ok.mkdir()
    cohort = load_cohort(ok, site_cohort(ok), ENCODER)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfoundedSiteWarning)
        make_folds(cohort, 3, seed=0, cv="site")


def test_empty_site_values_are_a_one_line_error_naming_the_column_and_the_fix(tmp_path):
    labels = site_cohort(tmp_path)
    lines = labels.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ","
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        load_cohort(tmp_path, labels, ENCODER)
    message = str(e.value)
    assert "\n" not in message and str(labels) in message
    assert "column site is empty for 1 slide(s): A02" in message and "fill in every slide's site" in message


@pytest.mark.parametrize("cv", ["site", "leave_one_site_out"])
def test_site_validation_needs_two_sites_and_a_site_column(tmp_path, cv):
    one = tmp_path / "one"
    one.mkdir()
    cohort = load_cohort(one, site_cohort(one, ((3, 3),), sites="A"), ENCODER)
    with pytest.raises(ConfigError, match=rf"mil.cv is {cv} and column site names one site only \('A'\).*"
                                          "add slides of other sites, or set mil.cv: patient"):
        make_folds(cohort, 2, seed=0, cv=cv)
    none = tmp_path / "none"
    none.mkdir()
    cohort = load_cohort(none, site_cohort(none, site_column=False), ENCODER)
    with pytest.raises(ConfigError, match=rf"mil.cv is {cv} and the labels file has no site column"):
        make_folds(cohort, 2, seed=0, cv=cv)


def test_the_workflow_check_stops_a_single_site_cohort_before_any_job(tmp_path, small_slide):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").symlink_to(small_slide.path)
    (slides / "b.svs").symlink_to(small_slide.path)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,site\na,normal,X\nb,tumour,X\n")
    config = load_config(overrides={"slides_dir": str(slides), "out_dir": str(tmp_path / "out"),
                                    "labels": str(labels), "mil": {"cv": "site"}})
    with pytest.raises(ConfigError, match="column site names one site only"):
        check_workflow_inputs(config)
    config["mil"]["cv"] = "patient"
    assert set(check_workflow_inputs(config)) == {"a", "b"}
