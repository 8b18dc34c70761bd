"""The shared pieces: the per-slide stage loop and its failure policy, the atomic write, the output layout."""

import doctest
import os
from pathlib import Path

import wsi.atomic
import wsi.runner
from wsi.atomic import replacing, write_json
from wsi.config import scoring_run_dir
from wsi.failures import read_failures
from wsi.layout import Layout
from wsi.runner import run_slides


def test_docstring_examples_run():
    assert doctest.testmod(wsi.runner).failed == 0 and doctest.testmod(wsi.atomic).failed == 0


def test_one_failing_slide_is_recorded_once_and_the_rest_carry_on(tmp_path):
    def tile(slide_id):
        if slide_id == "bad":
            raise MemoryError("out of memory")  # not a WsiError: still only this slide's failure
        return 10 * len(slide_id)

    summary = run_slides(tmp_path, "tile", {"a": "a.svs", "bad": "bad.svs", "c": "c.svs"}, tile)
    assert summary.done == ["a", "c"] and summary.failed == {"bad": "MemoryError: out of memory"}
    assert summary.results == {"a": 10, "c": 10}
    assert [(r["slide_id"], r["stage"], r["source"]) for r in read_failures(tmp_path)] == [("bad", "tile", "bad.svs")]
    # later stages skip it (no second row, no wrong advice) and skip what is already complete
    later = run_slides(tmp_path, "predict", {"a": "a", "bad": "bad", "c": "c"}, lambda s: None,
                       is_done=lambda s: s == "c")
    assert later.done == ["a"] and later.skipped == {"bad": "failed at tile", "c": "up to date"}
    assert len(read_failures(tmp_path)) == 1
    # once the slide is fixed, its row goes
    assert run_slides(tmp_path, "tile", {"bad": "bad.svs"}, lambda s: None).done == ["bad"]
    assert read_failures(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "status.json", {"run": 1})
    try:
        with replacing(path) as tmp:
            tmp.write_text('{"run": ')
            raise OSError("disk full")
    except OSError:
        pass
    assert path.read_text() == '{\n "run": 1\n}' and os.listdir(tmp_path) == ["status.json"]


def test_layout_names_the_paths_the_stages_share(tmp_path):
    layout = Layout(tmp_path)
    assert layout.store("a") == tmp_path / "stores" / "a.zarr"
    status = tmp_path / "status" / "heatmap" / "run" / "batch-00000.json"
    assert layout.status("heatmap", "batch-00000", "run") == status
    assert layout.status("tile", "batch-00000") == tmp_path / "status" / "tile" / "batch-00000.json"
    (tmp_path / "models" / ".run.partial-1234").mkdir(parents=True)
    (tmp_path / "models" / ".other.partial-1234").mkdir()
    assert layout.partial_runs("run") == [tmp_path / "models" / ".run.partial-1234"]
    old = layout.partial_run("run", "old")  # what a training moves the run it replaces to: found as a leftover
    old.mkdir()
    assert layout.partial_runs("run") == [old, tmp_path / "models" / ".run.partial-1234"]
    assert layout.partial_run("run") != layout.partial_run("run")  # two trainings never share a folder
    assert scoring_run_dir({"mode": "train"}, layout, "run") == tmp_path / "models" / "run"
    assert scoring_run_dir({"mode": "predict", "model_dir": "/site/models/v2"}, layout, "v2") == Path("/site/models/v2")
    for run in ("a", "b"):
        layout.predictions_csv(run).parent.mkdir(parents=True)
        layout.predictions_csv(run).write_text("slide_id\n")
    assert layout.predictions_csvs() == [layout.predictions_csv("a"), layout.predictions_csv("b")]
