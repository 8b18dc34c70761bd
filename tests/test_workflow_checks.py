"""Wrong inputs stop the workflow and the CLI before any job starts: one line naming the key or file and what
to do, exit status 2 (real `snakemake` and `wsi` processes), and the checks behind them."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from wsi.checks import check_labels, check_model_dir, check_workflow_inputs, near_miss_labels
from wsi.config import load_config
from wsi.errors import ConfigError
from wsi.layout import Layout
from wsi.plan import Plan

REPO = Path(__file__).resolve().parents[1]


def write_labels(path: Path, rows) -> Path:
    path.write_text("slide_id,label\n" + "".join(f"{s},{label}\n" for s, label in rows))
    return path


def test_a_tiny_class_named_like_a_big_one_is_a_typo():
    assert near_miss_labels(Counter(tumour=40, normal=38, tumor=2)) == [
        "label 'tumor' (2 slide(s)) looks like a typo of 'tumour' (40 slide(s))"]
    assert near_miss_labels(Counter(Tumour=1, tumour=3, normal=3))  # case alone differs
    assert near_miss_labels(Counter(tumour=3, normal=3)) == []  # balanced classes are classes
    assert near_miss_labels(Counter(tumour=40, tumor=30)) == []  # not tiny: the user's two classes


def test_labels_naming_unknown_slides_are_listed_with_the_nearest_id(tmp_path):
    labels = write_labels(tmp_path / "labels.csv", [("case_001", "a"), ("case_02", "b"), ("case_003", "b")])
    with pytest.raises(ConfigError, match=r"1 labelled slide id\(s\) are not slides in slides_dir: case_02 "
                                          r"\(did you mean 'case_002'"):
        check_labels(labels, ["case_001", "case_002", "case_003"])
    assert check_labels(labels, ["case_001", "case_002", "case_003"], skip_missing=True) == ["case_02"]
    with pytest.raises(ConfigError, match="typo"):
        check_labels(write_labels(tmp_path / "t.csv", [*((f"s{i}", "tumour") for i in range(30)), ("x", "tumor")]),
                     [f"s{i}" for i in range(30)] + ["x"])
    # listing the classes says they are meant
    check_labels(tmp_path / "t.csv", [f"s{i}" for i in range(30)] + ["x"], classes=["tumour", "tumor"])


def test_a_model_dir_without_a_complete_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_dir does not exist"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=r"no run.json"):
        check_model_dir(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text(json.dumps({"complete": True, "folds": [{"weights": "f0.st"}]}))
    with pytest.raises(ConfigError, match="incomplete model run .missing f0.st"):
        check_model_dir(tmp_path / "run")
    (tmp_path / "run" / "f0.st").write_bytes(b"")
    assert check_model_dir(tmp_path / "run")["complete"] is True


def test_batches_cover_every_slide_once_in_id_order(tmp_path):
    slides = {f"s{i:03d}": tmp_path / f"s{i:03d}.svs" for i in range(103)}
    plan = Plan({"slides_per_job": 50}, Layout(tmp_path), slides, "run")
    assert [len(ids) for ids in plan.batches.values()] == [50, 50, 3]
    assert [s for ids in plan.batches.values() for s in ids] == sorted(slides)
    # a job's files are named by their content: a changed list is a new file (a changed Snakemake param)
    first = plan.args_file("tile", "batch-00000", ["a", "b"])
    assert first.read_text() == "a\nb\n" and plan.args_file("tile", "batch-00000", ["a", "c"]) != first


def snakemake(workdir: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def one_slide_folder(tmp_path_factory) -> Path:
    from wsi_synth import write_synthetic_slide

    folder = tmp_path_factory.mktemp("slides")
    write_synthetic_slide(folder / "a.svs", width=1024, height=768, mpp=0.5, seed=0, tumour_tiles=0)
    return folder


CASES = ("no_slides_dir", "empty_slides_dir", "misspelt_model_dir", "unknown_label_id", "unwritable_out_dir")


def wrong_inputs(case: str, one_slide_folder: Path, tmp_path: Path) -> tuple[dict, str]:
    """The workflow config of a wrong-input ``case`` (over the defaults), and the one line it must be refused with."""
    empty = tmp_path / "empty"
    empty.mkdir()
    model = tmp_path / "models" / "run"
    model.mkdir(parents=True)
    (model / "run.json").write_text(json.dumps({"complete": True, "folds": [{"weights": "fold_0.safetensors"}]}))
    (model / "fold_0.safetensors").write_bytes(b"")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    config = {"out_dir": str(tmp_path / "out")}
    config.update({
        "no_slides_dir": {"mode": "features", "slides_dir": str(tmp_path / "nope")},
        "empty_slides_dir": {"mode": "predict", "slides_dir": str(empty), "model_dir": str(model)},
        "misspelt_model_dir": {"mode": "predict", "slides_dir": str(one_slide_folder),
                               "model_dir": str(tmp_path / "models" / "rnu")},
        "unknown_label_id": {"slides_dir": str(one_slide_folder),
                             "labels": str(write_labels(tmp_path / "l.csv", [("a", "x"), ("b", "y")]))},
        "unwritable_out_dir": {"mode": "features", "slides_dir": str(one_slide_folder),
                               "out_dir": str(blocker / "out")},
    }[case])
    expected = {"no_slides_dir": f"{tmp_path / 'nope'}: slides_dir does not exist",
                "empty_slides_dir": f"{empty}: slides_dir holds no slides",
                "misspelt_model_dir": f"{tmp_path / 'models' / 'rnu'}: model_dir does not exist",
                "unknown_label_id": "1 labelled slide id(s) are not slides in slides_dir",
                "unwritable_out_dir": f"{blocker / 'out'}: out_dir cannot be created or written"}[case]
    return config, expected


@pytest.mark.parametrize("case", CASES)
def test_the_workflow_checks_refuse_wrong_inputs_with_one_line(case, one_slide_folder, tmp_path):
    """What the Snakefile runs at parse time (pipelines/common.smk: check_workflow_inputs), in this process."""
    config, expected = wrong_inputs(case, one_slide_folder, tmp_path)
    with pytest.raises(ConfigError) as e:
        check_workflow_inputs(load_config(overrides=config))
    assert expected in e.value.one_line() and "\n" not in e.value.one_line()


@pytest.mark.slow
def test_workflow_refuses_a_wrong_input_before_any_job(one_slide_folder, tmp_path):
    """The real Snakemake: a refused input is one line and exit status 2, and no job runs (each case's line is
    checked in process above)."""
    config, expected = wrong_inputs("unknown_label_id", one_slide_folder, tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.html").write_text("an old report")  # "Nothing to be done" must not hide the error
    proc = snakemake(tmp_path, "--configfile", str(tmp_path / "config.yaml"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert line.startswith("wsi: error: ") and expected in line, line
    assert not (tmp_path / "out" / "status").exists()  # no job ran


@pytest.mark.slow
def test_unlock_as_the_readme_writes_it_works_in_any_folder(tmp_path):
    proc = snakemake(tmp_path, "--unlock")
    assert proc.returncode == 0 and "Unlocked working directory" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_cli_refuses_wrong_inputs_with_one_line(one_slide_folder, tmp_path):
    def wsi(*args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "wsi.cli", *args, "--out", str(tmp_path / "out")],
                              capture_output=True, text=True)

    for args, expected in ((["tile", str(tmp_path / "nope")], "slide file or folder does not exist"),
                           (["tile", str(tmp_path)], "no slides found"),
                           (["predict", "--model", str(tmp_path / "rnu")], "--model does not exist")):
        proc = wsi(*args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
