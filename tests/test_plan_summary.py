"""The end-of-run summary names the job that was cut off (a cancelled batch), not one that finished."""

from pathlib import Path

from wsi.config import load_config
from wsi.layout import Layout
from wsi.plan import Plan, executor_errors, summary
from wsi.provenance import write_status


def _plan(tmp_path) -> Plan:
    config = load_config()
    config.update(slides_per_job=2, out_dir=str(tmp_path / "out"))
    slides = {f"s{i}": Path(f"/slides/s{i}.svs") for i in range(4)}
    return Plan(config, Layout(config["out_dir"]), slides, "run")


def _tile_line(plan: Plan) -> str:
    text, _ = summary(plan)
    return next(line for line in text.splitlines() if line.strip().startswith("tile"))


def test_a_cancelled_batch_is_named_with_its_cause_not_the_batch_that_finished(tmp_path):
    plan = _plan(tmp_path)
    layout = plan.layout
    write_status(layout.status("tile", "batch-00000"), "tile", [{"slide_id": "s0", "status": "done"}])
    layout.log("tile", "batch-00000").parent.mkdir(parents=True)
    layout.log("tile", "batch-00000").write_text("wsi tile: 2 of 2 slides done\n")
    layout.log("tile", "batch-00001").write_text("tiling s2\nwsi tile: error: stopped by SIGTERM (scancel)\n")
    assert _tile_line(plan) == (f"  tile     failed: wsi tile: error: stopped by SIGTERM (scancel) "
                                f"(log: {layout.log('tile', 'batch-00001')})")


def test_a_batch_cut_off_before_it_wrote_anything_is_named(tmp_path):
    plan = _plan(tmp_path)
    layout = plan.layout
    write_status(layout.status("tile", "batch-00000"), "tile", [{"slide_id": "s0", "status": "done"}])
    assert _tile_line(plan) == "  tile     did not finish: batch-00001"
    layout.log("tile", "batch-00001").parent.mkdir(parents=True, exist_ok=True)
    layout.log("tile", "batch-00001").write_text("")  # an empty log is not worth naming
    assert _tile_line(plan) == "  tile     did not finish: batch-00001"
    layout.log("tile", "batch-00001").write_text("tiling s2\n")
    assert _tile_line(plan) == f"  tile     did not finish: batch-00001 (log: {layout.log('tile', 'batch-00001')})"


def test_a_stage_none_of_whose_jobs_ran_is_not_run(tmp_path):
    assert _tile_line(_plan(tmp_path)) == "  tile     not run"


# Snakemake's own log of a run, as snakemake 9 with snakemake-executor-plugin-slurm 2.8 writes it
SNAKEMAKE_LOG = """\
[Sun Dec  6 09:33:45 2026]
Error in rule tile:
    message: SLURM sbatch failed. The error message was 'sbatch: error: Invalid generic resource (gres) specification'.
    sbatch call:
        sbatch --parsable --job-name d44c --output .snakemake/slurm_logs/rule_tile/batch-00001/%j.log --gres=fpga:1
For further error details see the cluster/cloud log and the log files of the involved rule(s).
    jobid: 2
    output: {out}/status/tile/batch-00001.json
    log: {out}/logs/tile/batch-00001.log (check log file(s) for error details)
    shell:
        $WSI_PYTHON -m wsi.cli tile @args --out out
        (command exited with non-zero exit code)
Cleaning up SLURM log files older than 10 day(s).
"""


def test_a_job_sbatch_refused_is_named_with_sbatch_s_error(tmp_path):
    plan = _plan(tmp_path)
    layout = plan.layout
    write_status(layout.status("tile", "batch-00000"), "tile", [{"slide_id": "s0", "status": "done"}])
    layout.log("tile", "batch-00001").parent.mkdir(parents=True, exist_ok=True)
    layout.log("tile", "batch-00001").write_text("")  # Snakemake made it; nothing ran to write in it
    log = tmp_path / "snakemake.log"
    log.write_text(SNAKEMAKE_LOG.format(out=layout.out))
    text, _ = summary(plan, executor_errors([str(log)]))
    tile = next(line for line in text.splitlines() if line.strip().startswith("tile"))
    assert tile == ("  tile     failed: batch-00001: SLURM sbatch failed. The error message was 'sbatch: error: "
                    "Invalid generic resource (gres) specification'.")
