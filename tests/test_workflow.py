"""The whole workflow through real `snakemake` runs: the README demo, a corrupt slide, a DICOM slide among SVS
files, kills and re-runs, parameter changes, an unwritable output folder, the SLURM profile, wrong inputs
stopped before any job, and a failed retrain that leaves the previous model usable.

Snakemake runs with a PATH that holds no `wsi` script: the rules must call the CLI through the interpreter
that runs Snakemake."""

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from factories import on_cluster

from wsi.checks import check_workflow_inputs
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.store import SlideStore, is_complete, store_path
from wsi_synth import make_demo_cohort, write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
DEMO_RUN = "abmil_tf_efficientnet_lite0"  # the README demo's model run
RUN = "abmil_test_vit"  # the small cohort's: the session's tiny test_vit encoder


def snakemake_cmd(workdir: Path, *args) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
            "--directory", str(workdir), *args]


# No `wsi` on it, as in an sbatch script that never activated the venv.
BARE_ENV = {**os.environ, "PATH": "/usr/bin:/bin"}


def snakemake(workdir: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_cmd(workdir, *args), capture_output=True, text=True, env=BARE_ENV)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table of a (dry) run."""
    counts, in_table = {}, False
    for line in proc.stdout.splitlines() + proc.stderr.splitlines():
        parts = line.split()
        if parts[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(parts) == 2 and parts[1].isdigit():
            if parts[0] == "total":
                break
            counts[parts[0]] = int(parts[1])
    return counts


def dry_runs(work: Path, *configfiles: list[Path]) -> list[dict[str, int]]:
    """:func:`planned_jobs` of one dry run per list of config files, all started at once (a dry run is mostly
    Snakemake starting up; dry runs take no lock)."""
    procs = [subprocess.Popen(snakemake_cmd(work, "--configfile", *map(str, files), "-n"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=BARE_ENV) for files in configfiles]
    plans = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-4000:]
        plans.append(planned_jobs(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)))
    return plans


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    """Six synthetic slides (three per class, one patient each; the first a DICOM folder, the rest SVS), plus a
    corrupt slide file with no label."""
    folder = tmp_path_factory.mktemp("cohort")
    labels = make_demo_cohort(folder, n_slides=6, seed=1, field_mm=(1.6, 1.2))
    table = rows(labels)
    first = table[0]
    (folder / "slides" / f"{first['slide_id']}.svs").unlink()
    write_synthetic_slide(folder / "slides" / first["slide_id"], kind="dicom", width=3200, height=2400, mpp=0.5,
                          seed=7, tumour_tiles=4 if first["label"] == "tumour" else 0, lymphoid_aggregates=1)
    with open(labels, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "label", "patient_id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({**r, "patient_id": r["slide_id"]} for r in table)
    (folder / "slides" / "corrupt.svs").write_bytes(b"II*\x00" + os.urandom(4096))
    return folder


def small_config(cohort: Path, out: Path, path: Path, checkpoint: Path, cluster=None, **top) -> Path:
    """The demo config on ``cohort``, with 4 slides per tile/heatmap job (so 7 slides make 2 batches) and the
    tiny test_vit encoder at ``checkpoint`` (the README demo runs the demo's EfficientNet; these runs check what
    the workflow does, not what the model learns); its Dask work on ``cluster`` (the session's) when given, else
    on local workers each extract and train job starts."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config.pop("demo")
    config.update(slides_dir=str(cohort / "slides"), labels=str(cohort / "labels.csv"), out_dir=str(out),
                  slides_per_job=4, **top)
    config["extract"].update(encoder="test_vit", checkpoint=str(checkpoint))
    config["mil"].update(folds=3, epochs=4, patience=4, bootstrap=50)
    if cluster is not None:
        config = on_cluster(config, cluster)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def reference_run(small_cohort, tiny_vit, dask_cluster, tmp_path_factory):
    """One uninterrupted run over the small cohort (with its corrupt slide), with --keep-going, on the session's
    Dask cluster (the README demo and the killed runs start clusters of their own); returns the work folder, the
    config and the finished process (its exit status and console)."""
    work = tmp_path_factory.mktemp("reference")
    config = small_config(small_cohort, work / "out", work / "config.yaml", tiny_vit, dask_cluster)
    proc = snakemake(work, "--configfile", str(config), "--keep-going", check=False)
    return work, config, proc


@pytest.mark.slow
def test_readme_demo_runs_every_stage(tmp_path):
    """`snakemake --cores 2 --configfile configs/demo.yaml`, as the README says, in a fresh folder."""
    snakemake(tmp_path, "--configfile", str(REPO / "configs" / "demo.yaml"))
    out = tmp_path / "demo" / "out"
    labels = rows(tmp_path / "demo" / "labels.csv")
    predictions = rows(out / "predictions" / DEMO_RUN / "predictions.csv")
    assert {r["slide_id"] for r in predictions} == {r["slide_id"] for r in labels}
    assert set(predictions[0]) == {"slide_id", "prob_normal", "prob_tumour", "predicted", "ood_score", "ood",
                                   "calibration"}
    assert not [r for r in predictions if r["ood"] == "True"]  # the training slides, scored out of fold
    metrics = json.loads((out / "models" / DEMO_RUN / "metrics.json").read_text())
    # the demo model learns: cross-validated (out-of-fold) AUROC, and heatmaps dark on normal slides, lit on foci
    assert metrics["auroc"]["tumour"]["value"] >= 0.9 and len(metrics["auroc"]["tumour"]["ci95"]) == 2
    for r in labels:
        folder = out / "heatmaps" / DEMO_RUN / r["slide_id"]
        for name in ("overlay.png", "heatmap.png", "tiles.geojson", "heatmap.tif", "top_tiles.png"):
            assert (folder / name).stat().st_size > 0, folder / name
        assert (out / "features" / "tf_efficientnet_lite0" / f"{r['slide_id']}.h5").exists()
        tiles = json.loads((folder / "tiles.geojson").read_text())["features"]
        brightest = max(f["properties"]["measurements"]["tumour evidence"] for f in tiles
                        if f["properties"]["objectType"] == "tile")
        assert brightest < 0.2 if r["label"] == "normal" else brightest > 0.5, (r, brightest)
    report = (out / "report.html").read_text()
    assert "Cross-validated metrics" in report and "data:image/png;base64" in report
    # self-contained: the only addresses are the links into a local `wsi view` (hyperlinks, never loaded)
    addresses = re.findall(r"https?://[^'\"\s>]+", report)
    assert addresses and all(a.startswith("http://127.0.0.1:8765/slide?id=") for a in addresses), addresses[:3]


@pytest.mark.slow
def test_corrupt_slide_is_reported_and_the_rest_finish_dicom_included(reference_run):
    work, _, proc = reference_run
    out = work / "out"
    failures = rows(out / "failures.csv")
    # one row: later stages skip the slide instead of failing it again with advice that does not apply
    assert [(f["slide_id"], f["stage"]) for f in failures] == [("corrupt", "tile")]
    assert "not a readable slide" in failures[0]["cause"]
    # the run says so on the console, and its exit status is 1 (allow_failed_slides is false)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = proc.stderr[proc.stderr.index("wsi: summary of"):]
    assert "tile     6 done, 1 failed" in summary and "heatmap  6 done, 1 skipped" in summary
    assert "corrupt [tile]: " in summary and "not a readable slide" in summary
    assert str(out / "report.html") in summary and "allow_failed_slides: true" in summary
    predictions = rows(out / "predictions" / RUN / "predictions.csv")
    assert len(predictions) == 6 and "corrupt" not in {r["slide_id"] for r in predictions}
    vendors = {r["slide_id"]: SlideStore.open(store_path(out, r["slide_id"])).slide.vendor for r in predictions}
    (dicom,) = [s for s, v in vendors.items() if v == "dicom"]  # the DICOM folder went through every stage
    assert (out / "heatmaps" / RUN / dicom / "heatmap.tif").stat().st_size > 0
    report = (out / "report.html").read_text()
    assert "corrupt" in report and "not a readable slide" in report


@pytest.mark.slow
def test_status_files_record_the_config_the_job_ran_with(reference_run):
    work, config, _ = reference_run
    used = yaml.safe_load(config.read_text())
    tile = json.loads((work / "out" / "status" / "tile" / "batch-00001.json").read_text())  # 00000 has corrupt
    assert set(tile["config"]) == {"slide", "tissue", "tiling"}
    assert tile["config"]["tiling"]["tile_px"] == 256
    assert [i["status"] for i in tile["items"]] == ["done"] * 3 and all(i["n_tiles"] > 0 for i in tile["items"])
    extract = json.loads((work / "out" / "status" / "extract" / "test_vit.json").read_text())
    assert set(extract["config"]) == {"slide", "extract", "cluster"}
    assert extract["config"]["extract"]["checkpoint"] == used["extract"]["checkpoint"]  # not the default null
    assert extract["config"]["cluster"]["n_workers"] == used["cluster"]["n_workers"]


@pytest.mark.slow
def test_parameter_change_reruns_that_stage_and_later_only(reference_run):
    work, config, _ = reference_run
    heatmap_change = work / "heatmap_change.yaml"
    heatmap_change.write_text("heatmap:\n  downsample: 16\n")
    mil_change = work / "mil_change.yaml"
    mil_change.write_text("mil:\n  lr: 0.001\n")
    tiling_change = work / "tiling_change.yaml"
    tiling_change.write_text("tiling:\n  tile_px: 224\n")
    unchanged, heatmap, mil, tiling = dry_runs(work, [config], [config, heatmap_change], [config, mil_change],
                                               [config, tiling_change])
    assert unchanged == {}
    assert set(heatmap) == {"heatmap", "report", "all"} and heatmap["heatmap"] == 2  # 7 slides, 4 per job
    assert set(mil) == {"train", "predict", "heatmap", "report", "all"}
    assert set(tiling) == {"tile", "extract", "train", "predict", "heatmap", "report", "all"}
    # one file of the DICOM slide rewritten in place (the folder's own mtime does not move): that slide re-tiles
    import pydicom

    (dicom,) = [p for p in Path(yaml.safe_load(config.read_text())["slides_dir"]).iterdir() if p.is_dir()]
    level = max(dicom.glob("*.dcm"))
    original = level.read_bytes()
    ds = pydicom.dcmread(level)
    ds.SeriesDescription = "re-exported"
    ds.save_as(level)
    try:
        plan = planned_jobs(snakemake(work, "--configfile", str(config), "-n"))
    finally:
        level.write_bytes(original)
    assert plan["tile"] == 1 and {"extract", "predict", "heatmap"} <= set(plan)


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything it started (the jobs, their Dask workers), as a node crash would."""
    import psutil

    root = psutil.Process(pid)
    procs = root.children(recursive=True) + [root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def _run_until(work: Path, config: Path, marker, timeout: float = 300) -> str:
    """Start snakemake, SIGKILL it and every process under it once ``marker()`` is true; return its log text.

    A killed Snakemake leaves its lock behind; `snakemake --unlock` (what the README says to run after a hard
    kill) releases it after the kill, so the next run can start."""
    log = work / f"killed-{time.time_ns()}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(snakemake_cmd(work, "--configfile", str(config), "--keep-going"),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while not marker() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before the kill point"
        _kill_tree(proc.pid)
        proc.wait()
    snakemake(work, "--configfile", str(config), "--unlock")
    return log.read_text()


@pytest.mark.slow
def test_killed_runs_resume_without_redoing_work_and_match_an_uninterrupted_run(small_cohort, tiny_vit,
                                                                               reference_run, tmp_path):
    out = tmp_path / "out"
    config = small_config(small_cohort, out, tmp_path / "config.yaml", tiny_vit, allow_failed_slides=True)
    status = out / "status"

    # 1. killed while tiling: after the first slide's tile job finished
    _run_until(tmp_path, config, lambda: len(list((status / "tile").glob("*.json"))) >= 1)
    for p in (out / "stores").glob("*.zarr"):
        assert is_complete(p) or not (p / "zarr.json").exists()
    tiled = {p: (p / "zarr.json").stat().st_mtime_ns for p in (out / "stores").glob("*.zarr") if is_complete(p)}
    assert tiled
    # 2. killed during extraction (its Dask cluster running), 3. killed during training
    _run_until(tmp_path, config, lambda: (out / "logs" / "extract").exists()
               and "dashboard" in "".join(p.read_text() for p in (out / "logs" / "extract").glob("*.log")))
    _run_until(tmp_path, config, lambda: (out / "logs" / "train").exists())
    assert not (out / "models" / RUN / "run.json").exists()

    # unlocked (after each kill), the same command again finishes the run
    snakemake(tmp_path, "--configfile", str(config), "--keep-going")
    for store, stamp in tiled.items():  # slides tiled before the first kill were not tiled again
        assert (store / "zarr.json").stat().st_mtime_ns == stamp, store
    reference_out = reference_run[0] / "out"
    for rel in (f"predictions/{RUN}/predictions.csv", f"models/{RUN}/cv_predictions.csv"):
        got, want = rows(out / rel), rows(reference_out / rel)
        assert [r["slide_id"] for r in got] == [r["slide_id"] for r in want]
        for g, w in zip(got, want):
            for key in g:
                if key.startswith("prob_"):
                    assert float(g[key]) == pytest.approx(float(w[key]), abs=1e-5), (rel, key)
    for r in rows(out / f"predictions/{RUN}/predictions.csv"):
        ours = json.loads((out / "heatmaps" / RUN / r["slide_id"] / "tiles.geojson").read_text())
        theirs = json.loads((reference_out / "heatmaps" / RUN / r["slide_id"] / "tiles.geojson").read_text())
        assert len(ours["features"]) == len(theirs["features"])


@pytest.mark.slow
def test_unwritable_output_folder_is_a_clear_error(small_cohort, tmp_path):
    """The CLI's refusal; the workflow's is test_workflow_checks.py's case unwritable_out_dir."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    proc = subprocess.run([sys.executable, "-m", "wsi.cli", "tile", str(small_cohort / "slides" / "demo_002.svs"),
                           "--out", str(blocker / "out"), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and str(blocker) in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.rglob("*.zarr"))


@pytest.mark.slow
def test_slurm_profile_dry_run_plans_every_stage(small_cohort, tiny_vit, tmp_path):
    config = small_config(small_cohort, tmp_path / "out", tmp_path / "config.yaml", tiny_vit)
    proc = snakemake(tmp_path, "-n", "--profile", str(REPO / "configs" / "slurm"), "--configfile", str(config))
    plan = planned_jobs(proc)
    assert plan["tile"] == 2 and plan["extract"] == 1 and plan["train"] == 1 and plan["heatmap"] == 2


@pytest.mark.slow
def test_snakemake_report_bundles_the_run_report(reference_run, tmp_path):
    import zipfile

    work, config, _ = reference_run
    bundle = tmp_path / "report.zip"
    snakemake(work, "--configfile", str(config), "--report", str(bundle))
    with zipfile.ZipFile(bundle) as z:
        names = z.namelist()
    assert "report/report.html" in names  # Snakemake's own report page
    assert any(n.startswith("report/data/") and n.endswith("/report.html") for n in names), names  # ours, inside


def _model_files(run_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir())}


@pytest.mark.slow
def test_failed_retrain_keeps_the_previous_run_usable(small_cohort, reference_run, tmp_path):
    """Last in this file: it leaves the reference run's training marked as failed."""
    work, config, _ = reference_run
    out = work / "out"
    run_dir = out / "models" / RUN
    before = _model_files(run_dir)
    labels = small_cohort / "labels.csv"

    # wrong labels are stopped before any job starts: an id that is no slide, a class name with a typo. The
    # checks the Snakefile runs at parse time, in this process (the real Snakemake turning such an error into
    # one line and exit status 2 is test_workflow_checks.py's test_workflow_refuses_a_wrong_input_before_any_job)
    missing = tmp_path / "missing.csv"
    missing.write_text(labels.read_text() + "demo_999,tumour,demo_999\n")
    typo = tmp_path / "typo.csv"
    table = labels.read_text().splitlines()
    misspelt = table[-1].replace(",normal,", ",nromal,").replace(",tumour,", ",tumor,")
    typo.write_text("\n".join(table[:-1] + [misspelt]) + "\n")
    for bad, words in ((missing, ["demo_999", "not slides in slides_dir"]), (typo, ["looks like a typo of"])):
        with pytest.raises(ConfigError) as refused:
            check_workflow_inputs(load_config(config, overrides={"labels": str(bad)}))
        line = refused.value.one_line()
        assert "\n" not in line and str(bad) in line and all(w in line for w in words), line

    # a training job that fails (a labelled slide failed tiling): run.json and the folds stay as they were
    (out / "models" / f".{RUN}.partial-deadbeef").mkdir()  # left by a killed training: removed on the next run
    (out / "failures.csv.lock").touch()
    failing = tmp_path / "with_corrupt.csv"
    failing.write_text(labels.read_text() + "corrupt,tumour,corrupt\n")
    proc = snakemake(work, "--configfile", str(config), "--config", f"labels={failing}", check=False)
    assert proc.returncode == 1
    assert "wsi train: error: " in proc.stderr and "corrupt [tile]" in proc.stderr  # the cause, on the console
    summary = proc.stderr[proc.stderr.index("wsi: summary of"):]
    assert f"the previous model run {run_dir} is unchanged and usable" in summary
    assert _model_files(run_dir) == before
    assert not (out / "models" / f".{RUN}.partial-deadbeef").exists() and not (out / "failures.csv.lock").exists()

    predict = subprocess.run([sys.executable, "-m", "wsi.cli", "predict", "--out", str(out), "--model", str(run_dir),
                              "--no-progress"], capture_output=True, text=True)
    assert predict.returncode == 0, predict.stderr
    assert len(rows(out / "predictions" / RUN / "predictions.csv")) == 6
