# Shared pieces of the wsi workflow: input checks, the run's plan (slides scanned once, batches, job files),
# each rule's resources, and the end-of-run summary. The logic lives in wsi.plan and wsi.checks.
import shlex
import sys
from pathlib import Path

from snakemake.exceptions import IncompleteCheckpointException
from wsi.checks import check_slides_dir, check_workflow_inputs
from wsi.errors import WsiError
from wsi.config import run_name, scoring_run_dir
from wsi.layout import Layout
from wsi.slide import dicom_files
from wsi.plan import Plan, clean_stale, config_file, finish, plan_encoder
from wsi.slurm import preflight
from wsi.stop import stop_children

# Jobs run the CLI with the interpreter that runs Snakemake, so no `wsi` on PATH is needed (an sbatch script
# that calls venv/bin/snakemake without activating the venv). Set in the shell, not as a param: another path
# to the same venv must not re-run every job.
shell.prefix(f"set -euo pipefail; WSI_PYTHON={shlex.quote(sys.executable)}; ")
LAYOUT = Layout(config["out_dir"])
ENCODER_KEY = plan_encoder(config)
PREDICT_ONLY = config["mode"] == "predict" and bool(config.get("model_dir"))


def or_exit(check, *args):
    """``check(*args)``; a wrong input ends the run here with one line and exit status 2, before any job."""
    try:
        return check(*args)
    except WsiError as e:
        print(f"wsi: error: {e.one_line()}", file=sys.stderr)
        sys.exit(2)


RUN = or_exit(run_name, config)
MODEL_DIR = scoring_run_dir(config, LAYOUT, RUN)

# `snakemake --unlock` only removes Snakemake's lock: it must work with any config, even a wrong one.
UNLOCKING = "--unlock" in sys.argv

if config.get("demo") and (
    Path(config["slides_dir"]).name != "slides"
    or Path(config["labels"] or "").resolve()
    != Path(config["slides_dir"]).parent.resolve() / "labels.csv"
):
    print(
        "wsi: error: demo mode writes <folder>/slides and <folder>/labels.csv: set slides_dir and labels so",
        file=sys.stderr,
    )
    sys.exit(2)

_PLANS = []


if not config.get("demo"):
    slides = {} if UNLOCKING else or_exit(check_workflow_inputs, config)
    _PLANS.append(Plan(config, LAYOUT, slides, RUN))


def plan(wildcards=None):
    """The run's plan; in demo mode only once the demo_data checkpoint has written the slides."""
    if not _PLANS:
        checkpoints.demo_data.get()
        _PLANS.append(Plan(config, LAYOUT, check_slides_dir(config["slides_dir"]), RUN))
    return _PLANS[0]


def job_resources(rule_name):
    """resources of ``rule_name`` from the config's `resources` section (gpu only when asked for)."""
    res = config["resources"][rule_name]
    return {
        "mem_mb": res["mem_mb"],
        "runtime": res["runtime"],
        **({"gpu": res["gpu"]} if res["gpu"] else {}),
    }


def batch_slides(wildcards):
    """The batch's slide files (every .dcm of a DICOM slide): a changed file re-tiles its batch."""
    p = plan()
    paths = [p.slides[s] for s in p.batches[wildcards.batch]]
    return [
        str(f)
        for path in paths
        for f in (dicom_files(path) if path.is_dir() else [path])
    ]


def batch_args(stage):
    """The file listing a batch's slides (tile: paths, heatmap: ids), one per line, for `wsi <stage> @FILE`."""

    def args(wildcards):
        p = plan()
        ids = p.batches[wildcards.batch]
        return str(
            p.args_file(
                stage,
                wildcards.batch,
                [str(p.slides[s]) for s in ids] if stage == "tile" else ids,
            )
        )

    return args


def stage_config_file(stage):
    return lambda wildcards: str(config_file(LAYOUT, config, stage))


def tile_status(wildcards=None):
    return [str(LAYOUT.status("tile", b)) for b in plan().batches]


def batch_tile_status(wildcards):
    """The tile status of the batch. Through plan() it also ties the job to the demo_data checkpoint, so a job
    that runs elsewhere (a SLURM job) can read its batch's slide ids in its params."""
    plan()
    return str(LAYOUT.status("tile", wildcards.batch))


def heatmap_status(wildcards=None):
    return [str(LAYOUT.status("heatmap", b, RUN)) for b in plan().batches]


def model_input(wildcards=None):
    """What predict needs of the model: this run's training status (mode train), or model_dir's run.json."""
    return (
        str(MODEL_DIR / "run.json")
        if PREDICT_ONLY
        else str(LAYOUT.status("train", RUN))
    )


def final_targets(wildcards=None):
    if config["mode"] == "features":
        return [str(LAYOUT.status("extract", ENCODER_KEY))]
    return [str(LAYOUT.report)]


wildcard_constraints:
    batch=r"batch-\d+",


def submitted_rules():
    """{rule: its slurm_partition or None} of the rules this run submits to SLURM: those of the jobs to run that
    are not local, and in demo mode the per-slide rules the demo_data checkpoint adds later (in the default
    partition, as demo_data, unless set-resources names one).
    """
    jobs = [j for j in workflow.dag.needrun_jobs() if not j.is_local]
    rules = {j.rule.name: j.resources.get("slurm_partition") for j in jobs}
    if "demo_data" in rules:
        for name in ("tile", "heatmap"):
            own = workflow.resource_settings.overwrite_resources.get(name) or {}
            own = getattr(own.get("slurm_partition"), "value", None)
            rules[name] = own or rules["demo_data"]
    return rules


onstart:
    # Under the SLURM executor: check the status command and what the jobs ask for before the first sbatch.
    if getattr(workflow.executor_plugin, "name", None) == "slurm":
        settings = workflow.executor_settings
        warnings = or_exit(
            lambda: preflight(
                config,
                submitted_rules(),
                status_command=settings.status_command,
                first_poll_s=settings.init_seconds_before_status_checks,
            )
        )
        for warning in warnings:
            print(f"wsi: warning: {warning}", file=sys.stderr)
    for stale in clean_stale(LAYOUT, RUN):
        print(
            f"wsi: removed {stale}, left by a training that was stopped",
            file=sys.stderr,
        )


def summarise(success, snakemake_log=None):
    try:
        finish(plan(), success=success, snakemake_log=snakemake_log)
    except (
        IncompleteCheckpointException
    ):  # the demo cohort was never written: nothing to summarise
        pass


def print_view_command():
    """The run's last line: how to open its slides and heatmaps in the browser."""
    if config["mode"] != "features":
        print(
            f"wsi: browse the slides and their heatmaps: wsi view {shlex.quote(str(LAYOUT.out))} "
            f"--run {shlex.quote(RUN)}",
            file=sys.stderr,
        )


onsuccess:
    try:
        summarise(True)
    finally:
        print_view_command()


onerror:
    # Interrupted, Snakemake leaves its local jobs running (dask.yaml's extract and train): stop them and let
    # them close their clusters (and cancel their SLURM worker jobs) before the summary reads their logs.
    stop_children()
    summarise(False, log)


if config.get("demo"):

    checkpoint demo_data:
        output:
            slides=directory(config["slides_dir"]),
            labels=config["labels"],
        log:
            LAYOUT.log("demo_data", "demo_data"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=10,
        params:
            folder=Path(config["slides_dir"]).parent,
            n=config["demo"]["n_slides"],
            seed=config["demo"]["seed"],
            field=(
                "--field-mm {} {}".format(*config["demo"]["field_mm"])
                if "field_mm" in config["demo"]
                else ""
            ),
        shell:
            "$WSI_PYTHON -m wsi_synth {params.folder:q} --n-slides {params.n} --seed {params.seed} {params.field}"
            " > {log:q} 2>&1"
