"""Models that hold across institutions: site-aware folds, per-site metrics, external validation and stain
normalisation at extraction (issue 13)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from factories import (
    ENCODER,
    H_E,
    bag_features,
    extract_config,
    make_store,
    mil_config,
    read_csv,
    save_tiny,
    stained,
    write_store,
)

from wsi.checks import check_workflow_inputs
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.mil import load_cohort, make_folds
from wsi.mil.data import ConfoundedSiteWarning

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
    labels.write_text(header + "".join(f"{s},{label},{t}\n" if site_column else f"{s},{label}\n"
                                      for s, label, t in rows))
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


def test_site_profiles_draw_the_same_tissue_in_each_sites_colours():
    from wsi_synth import SITE_PROFILES, write_synthetic_slide

    drawn = {name: write_synthetic_slide(f"{name}.svs", width=2800, height=2100, seed=11, tumour_tiles=1,
                                         site=profile, write=False) for name, profile in SITE_PROFILES.items()}
    plain = write_synthetic_slide("plain.svs", width=2800, height=2100, seed=11, tumour_tiles=1, write=False)
    assert {s.tumour_boxes for s in drawn.values()} == {plain.tumour_boxes}  # one tissue, four looks
    tissue = plain.truth_masks(16)["tissue"]
    looks = {}
    for name, slide in {**drawn, "plain": plain}.items():
        rgb = slide.render_level(16, 0, 0, tissue.shape[1], tissue.shape[0]).astype(float)
        looks[name] = (rgb[tissue].mean(axis=0), rgb[~tissue].mean(axis=0))
    names = list(drawn)
    for i, a in enumerate(names):
        for b in names[i + 1:]:  # every two sites' tissue differs by several grey levels in mean colour
            assert np.abs(looks[a][0] - looks[b][0]).max() > 4, (a, b, looks[a][0], looks[b][0])
    glass_b, glass_plain = looks["B"][1], looks["plain"][1]
    assert glass_b[2] < glass_plain[2] - 8 and abs(glass_b[0] - glass_plain[0]) < 3  # B's scanner casts yellow
    assert SITE_PROFILES["C"].jpeg_quality == 65


# ------------------------------------------------------------------------------------------ per-site metrics
@pytest.fixture(scope="module")
def site_run(tmp_path_factory, dask_cluster):
    """A leave-one-site-out ABMIL run on 4 sites of toy features (on the session's Dask cluster), and a new cohort
    of 2 other sites with its labels table."""

    from wsi.mil import TrainConfig, train

    out = tmp_path_factory.mktemp("sites")
    labels = site_cohort(out)
    config = mil_config(labels, dask_cluster, cv="leave_one_site_out", run_name="sites")
    run_dir = train(out, TrainConfig.from_config(config), progress=False).outputs["model run"]
    new = tmp_path_factory.mktemp("external")
    new_labels = site_cohort(new, ((3, 3), (2, 3)), seed=7, sites="XY")
    return out, labels, run_dir, new, new_labels


def test_metrics_json_gives_auroc_and_balanced_accuracy_per_site_with_intervals(site_run):
    import json

    out, labels, run_dir, _, _ = site_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["per_site"]) == set(SITES)
    for site, (n_normal, n_tumour) in zip(SITES, ((3, 3), (2, 4), (4, 2), (3, 3))):
        m = metrics["per_site"][site]
        assert m["n_slides"] == n_normal + n_tumour and m["support"] == [n_normal, n_tumour]
        lo, hi = m["auroc"]["tumour"]["ci95"]
        assert lo <= m["auroc"]["tumour"]["value"] <= hi
        assert 0 <= m["balanced_accuracy"]["value"] <= 1
    assert metrics["auroc"]["tumour"]["value"] > 0.8  # the toy task is learnable across sites
    run = json.loads((run_dir / "run.json").read_text())
    assert run["training"]["split"] == "one fold per site"
    assert [sorted({site_of(s) for s in f["test"]}) for f in run["folds"]] == [[s] for s in SITES]


def test_predict_with_labels_writes_external_validation_beside_predictions(site_run):
    import json
    import shutil

    from wsi.cli import main

    _, _, run_dir, new, new_labels = site_run
    assert main(["predict", "--out", str(new), "--model", str(run_dir), "--labels", str(new_labels),
                 "--no-progress", "--set", "mil.bootstrap=200"]) == 0
    folder = new / "predictions" / "sites"
    metrics = json.loads((folder / "metrics.json").read_text())
    assert (folder / "roc.png").stat().st_size > 0
    assert metrics["n_slides"] == 11 and metrics["labels"] == str(new_labels)
    assert set(metrics["per_site"]) == {"X", "Y"} and metrics["per_site"]["Y"]["support"] == [2, 3]
    assert metrics["auroc"]["tumour"]["value"] > 0.8
    # without labels, predict writes no metrics, and removes older ones that no longer describe the predictions
    assert main(["predict", "--out", str(new), "--model", str(run_dir), "--no-progress"]) == 0
    assert not (folder / "metrics.json").exists()
    # a label the run does not know is a one-line error naming the labels file
    bad = new / "bad.csv"
    shutil.copy(new_labels, bad)
    bad.write_text(bad.read_text().replace("tumour", "tumor"))
    assert main(["predict", "--out", str(new), "--model", str(run_dir), "--labels", str(bad),
                 "--no-progress"]) == 2


def test_site_calibration_is_fitted_per_site_and_predict_applies_it_by_the_labels_site(site_run, dask_cluster,
                                                                                        tmp_path):
    import json

    from wsi.mil import PredictConfig, TrainConfig, predict, train

    out, labels, _, new, new_labels = site_run
    config = mil_config(labels, dask_cluster, calibration="site", run_name="by_site")
    run_dir = train(out, TrainConfig.from_config(config), progress=False).outputs["model run"]
    calibration = json.loads((run_dir / "run.json").read_text())["calibration"]
    assert calibration["method"] == "site" and sorted(calibration["sites"]) == list(SITES)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(0 <= metrics["per_site"][s]["ece"]["value"] <= 1 for s in SITES)  # cross-fitted, per site
    # a new slide of a training site gets its site's own calibration; one of another site the cohort's
    moved = new / "moved.csv"
    moved.write_text(new_labels.read_text().replace("X00,normal,X", "X00,normal,A"))
    summary = predict(new, PredictConfig.from_config({**config, "labels": str(moved)}), run_dir)
    rows = {r["slide_id"]: r for r in read_csv(summary.outputs["predictions"])}
    assert rows["X00"]["calibration"] == "site A" and rows["Y00"]["calibration"] == "cohort"
    # no table: the cohort's, for every slide
    assert predict(new, PredictConfig.from_config({**config, "labels": None}), run_dir).done
    assert {r["calibration"] for r in read_csv(summary.outputs["predictions"])} == {"cohort"}
    # asked for without a site column: one line naming the labels file, before any fold
    plain = tmp_path / "plain.csv"
    plain.write_text("".join(line.rsplit(",", 1)[0] + "\n" for line in labels.read_text().splitlines()))
    with pytest.raises(ConfigError) as e:
        train(out, TrainConfig.from_config(mil_config(plain, calibration="site")), progress=False)
    assert "\n" not in str(e.value) and str(plain) in str(e.value)
    assert "mil.calibration is site, and the labels table has no site column" in str(e.value)


def test_report_shows_per_site_figures_and_names_a_one_class_site(site_run):
    from wsi.config import load_config
    from wsi.report import ReportConfig, write_report

    _, _, run_dir, new, new_labels = site_run
    from wsi.mil import PredictConfig, predict

    config = load_config(overrides={"labels": str(new_labels), "mode": "predict", "model_dir": str(run_dir),
                                    "mil": {"bootstrap": 100}})
    predict(new, PredictConfig.from_config(config), run_dir)
    text = write_report(new, ReportConfig.from_config(config), run="sites").outputs["report"].read_text()
    assert "Metrics on these slides (external validation)" in text
    assert text.count("<table class=sites>") == 2  # external and the run's own cross-validation
    assert "<td>X</td><td>3 normal, 3 tumour</td>" in text
    one_class = new_labels.read_text().replace("Y00,normal", "Y00,tumour").replace("Y01,normal", "Y01,tumour")
    new_labels.with_name("one.csv").write_text(one_class)
    config["labels"] = str(new_labels.with_name("one.csv"))
    predict(new, PredictConfig.from_config(config), run_dir)
    text = write_report(new, ReportConfig.from_config(config), run="sites").outputs["report"].read_text()
    warnings_html = text.split("<section id=warnings")[1].split("</section>")[0]
    assert "site Y holds only tumour slides" in warnings_html


# ------------------------------------------------------------------------------------------ stain normalisation


@pytest.fixture(scope="module")
def stain_cohort(tmp_path_factory):
    """One tissue as two labs stained it (two stores), a folder of reference tiles and a tiny ViT checkpoint."""
    from PIL import Image

    root = tmp_path_factory.mktemp("stain")
    out = root / "out"
    write_store(out, "lab", stained(H_E["lab"]))
    write_store(out, "other", stained(H_E["other lab"]))
    reference = root / "reference"
    reference.mkdir()
    for i, tile in enumerate(stained(H_E["reference"], n=4, px=64, seed=5)):
        Image.fromarray(tile).save(reference / f"tile{i}.png")
    return out, reference, save_tiny(root / "test_vit.safetensors")


def stain_config(cluster, checkpoint, **extract):
    """Extraction of the stain cohort: batches of 8, no h5 exports."""
    return extract_config(cluster, checkpoint, batch_size=8, export_h5=False, **extract)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_a_slide_already_stained_like_the_reference_is_left_as_it_is_pixel_for_pixel(method):
    import torch

    from wsi.features.stain import StainTransform, fit_stain

    tiles = stained(H_E["lab"], n=6, px=40, seed=3)
    fit = fit_stain(method, tiles, "tiles", "test tiles")
    transform = StainTransform({"method": method, "target": fit, "slide": fit}, torch.device("cpu"))
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    y = transform(x.clone())
    assert y.shape == x.shape
    # every pixel stays where it was, with its colour (up to Macenko's clipping of glass at Io and float error)
    assert float((y - x).abs().mean()) < 0.01 and float((y - x).abs().max()) < 0.1


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_normalising_maps_two_labs_stains_of_one_tissue_close_together(method):
    import torch

    from wsi.features.stain import StainTransform, fit_stain

    reference = fit_stain(method, stained(H_E["reference"], seed=5), "reference", "reference tiles")
    out = []
    for lab in ("lab", "other lab"):
        tiles = stained(H_E[lab])
        transform = StainTransform({"method": method, "target": reference,
                                    "slide": fit_stain(method, tiles, lab, lab)}, torch.device("cpu"))
        out.append(transform(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255))
    raw = np.abs(stained(H_E["lab"]).astype(float) - stained(H_E["other lab"])).mean() / 255
    assert float((out[0] - out[1]).abs().mean()) < (0.3 if method == "macenko" else 0.8) * raw


def test_normalised_features_live_beside_raw_ones_with_the_fitted_reference_in_their_attrs(stain_cohort, dask_cluster):
    from wsi.features import ExtractConfig, extract_cohort
    from wsi.features.stain import fit_stain
    from wsi.store import SlideStore, store_path

    out, reference, checkpoint = stain_cohort
    from PIL import Image

    reference_tiles = np.stack([np.asarray(Image.open(p)) for p in sorted(reference.glob("*.png"))])
    for method in ("none", "macenko", "reinhard"):
        config = stain_config(dask_cluster, checkpoint, stain=method, stain_reference=str(reference))
        summary = extract_cohort(out, ExtractConfig.from_config(config), progress=False)
        assert sorted(summary.done) == ["lab", "other"] and not summary.failed
    lab, other = (SlideStore.open(store_path(out, s)) for s in ("lab", "other"))
    assert lab.feature_encoders() == ["test_vit", "test_vit+macenko", "test_vit+reinhard"]
    assert sorted(p.name for p in (lab.path / "features").iterdir() if p.is_dir()) == \
        ["test_vit", "test_vit+macenko", "test_vit+reinhard"]
    assert lab.feature_attrs("test_vit").stain is None
    for method in ("macenko", "reinhard"):
        stain = lab.feature_attrs(f"test_vit+{method}").stain
        assert stain["method"] == method and stain["reference"] == str(reference.resolve())
        expected = fit_stain(method, reference_tiles, reference, "reference")
        for key, value in expected.items():  # the reference's fit, stored: extraction can be redone
            np.testing.assert_allclose(stain["target"][key], value, rtol=1e-5)
        assert stain["slide"].keys() == expected.keys()
        assert other.feature_attrs(f"test_vit+{method}").stain["target"] == stain["target"]

    def gap(key):  # how far apart the two labs' features of the same tissue are
        return float(np.linalg.norm(lab.features(key) - other.features(key), axis=1).mean())

    # Macenko maps both labs' stain vectors onto the reference's: the same tissue then embeds alike
    assert gap("test_vit+macenko") < 0.5 * gap("test_vit")
    assert gap("test_vit+reinhard") < gap("test_vit")
    # a second run skips what is complete under each key
    config = stain_config(dask_cluster, checkpoint, stain="macenko", stain_reference=str(reference))
    again = extract_cohort(out, ExtractConfig.from_config(config), progress=False)
    assert sorted(again.skipped) == ["lab", "other"]


def test_a_stain_reference_without_tissue_is_a_one_line_error_naming_it(stain_cohort, dask_cluster, tmp_path):
    from PIL import Image

    from wsi.features import ExtractConfig, extract_cohort

    out, _, checkpoint = stain_cohort
    glass = tmp_path / "glass"
    glass.mkdir()
    Image.fromarray(np.full((64, 64, 3), 236, np.uint8)).save(glass / "blank.png")
    with pytest.raises(ConfigError) as e:
        config = stain_config(dask_cluster, checkpoint, stain="macenko", stain_reference=str(glass))
        extract_cohort(out, ExtractConfig.from_config(config), progress=False)
    message = str(e.value)
    assert "\n" not in message and str(glass) in message and "no tissue" in message
    with pytest.raises(ConfigError, match="not cohort, a folder of tile images, a model run or a tiled slide"):
        nope = str(tmp_path / "nope")
        config = stain_config(dask_cluster, checkpoint, stain="reinhard", stain_reference=nope)
        extract_cohort(out, ExtractConfig.from_config(config), progress=False)


def test_a_cohort_keeps_its_reference_and_never_mixes_features_of_two_references(stain_cohort, dask_cluster):
    from wsi.features import ExtractConfig, extract_cohort

    out, reference, checkpoint = stain_cohort
    config = stain_config(dask_cluster, checkpoint, stain="macenko", stain_reference=str(reference))
    first = extract_cohort(out, ExtractConfig.from_config(config), progress=False)
    assert not first.failed
    # cohort: the reference the cohort's normalised features were made with, so later slides match them
    cohort_reference = stain_config(dask_cluster, checkpoint, stain="macenko", stain_reference="cohort")
    again = extract_cohort(out, ExtractConfig.from_config(cohort_reference), progress=False)
    assert sorted(again.skipped) == ["lab", "other"] and not again.failed
    # another reference (here the slide "lab" of the cohort): complete features of the old one fail their slide
    lab_reference = stain_config(dask_cluster, checkpoint, stain="macenko", stain_reference="lab")
    other = extract_cohort(out, ExtractConfig.from_config(lab_reference), progress=False)
    assert sorted(other.failed) == ["lab", "other"]
    assert "fitted to another reference" in other.failed["lab"] and str(reference.resolve()) in other.failed["lab"]


def test_a_model_run_hands_new_slides_the_reference_it_was_trained_with(stain_cohort, tmp_path):
    """extract.stain_reference: <model run> (external validation, a new site) fits nothing anew: the new slides
    are mapped onto the very reference the run's training features were, and a run trained on another stain
    method is a one-line error naming the run."""
    import json

    from wsi.features.stain import fit_reference

    out, reference, _ = stain_cohort
    fitted = fit_reference("macenko", str(reference), out, [], {}, "test_vit")
    run = tmp_path / "abmil_test_vit+macenko"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"feature_attrs": {"stain": {**fitted, "slide": None}}}))
    assert fit_reference("macenko", str(run), tmp_path / "new_out", [], {}, "test_vit") == fitted
    with pytest.raises(ConfigError) as e:
        fit_reference("reinhard", str(run), tmp_path / "new_out", [], {}, "test_vit")
    assert "\n" not in str(e.value) and str(run) in str(e.value) and "trained on stain macenko" in str(e.value)
