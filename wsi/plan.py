"""What the Snakefile needs besides its rules: the cohort scanned once, slide batches, the files each job
reads, the end-of-run summary, and the cleanup of what a killed run left behind.

``pipelines/common.smk`` builds one :class:`Plan` at parse time. The slides folder is listed once per run
(not once per job: that made the DAG quadratic in slides), per-slide work runs in batches of
``slides_per_job`` slides per job, and each job reads its config and slide list from small files under
``OUT/.wsi/jobs`` named by their content, so its command line stays short and a changed parameter still
re-runs exactly the stages that read it.
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml

from .atomic import write_text
from .config import stage_config
from .errors import format_ids
from .failures import lock_path, read_failures
from .keys import encoder_key, feature_set_of
from .layout import Layout
from .provenance import read_status

STAGES = ("tile", "extract", "train", "predict", "heatmap")
SHOWN_FAILURES = 10


def batch_name(index: int) -> str:
    return f"batch-{index:05d}"


@dataclass(frozen=True)
class Plan:
    """The run as the Snakefile sees it: slides, their batches, the model run's name."""

    config: dict
    layout: Layout
    slides: dict[str, Path]
    run: str

    @property
    def batches(self) -> dict[str, list[str]]:
        """``{batch name: slide ids}``, ``slides_per_job`` slides each, in slide id order."""
        ids, n = sorted(self.slides), self.config["slides_per_job"]
        return {batch_name(i // n): ids[i:i + n] for i in range(0, len(ids), n)}

    def args_file(self, stage: str, batch: str, args: list[str]) -> Path:
        """One argument per line, for ``wsi <stage> @FILE``: the slides (tile) or slide ids (heatmap) of a batch."""
        return job_file(self.layout, f"{stage}-{batch}", "".join(f"{a}\n" for a in args), "args")


def job_file(layout: Layout, name: str, text: str, ext: str) -> Path:
    """Write ``text`` to its content-named file under ``OUT/.wsi/jobs`` (once) and return the path."""
    path = layout.job_file(name, text, ext)
    if not path.exists():
        write_text(path, text)
    return path


def config_file(layout: Layout, config: dict, stage: str) -> Path:
    """The config sections ``stage`` reads, as YAML for ``wsi <stage> --config``."""
    return job_file(layout, stage, yaml.safe_dump(stage_config(config, stage), sort_keys=True), "yaml")


def clean_stale(layout: Layout, run: str) -> list[Path]:
    """Remove what killed runs left behind: partial model runs of ``run`` (returned) and the failures lock.
    Only safe at a workflow's start, while Snakemake's lock keeps every other writer of OUT out."""
    partial = layout.partial_runs(run)
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    lock_path(layout.failures).unlink(missing_ok=True)
    return partial


# ------------------------------------------------------------------------------------------ summary
def _read_items(paths) -> list[dict] | None:
    """The items of the status files, or None if any is missing (its job failed or did not run)."""
    items = []
    for p in paths:
        if not Path(p).exists():
            return None
        items.extend(read_status(p)["items"])
    return items


def job_error(log: Path) -> str | None:
    """The one-line cause a failed ``wsi`` job wrote last to its log."""
    if not log.exists():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if ": error: " in line]
    return lines[-1].strip() if lines else None


def _where(stage: str, logs: list[Path], name: str, log: Path) -> str:
    """`` (log: ...)`` for a job's log that holds something; else the SLURM log the plugin kept, if any."""
    if log.exists() and log.stat().st_size:
        return f" (log: {log})"
    slurm_log = _slurm_log(stage, name if len(logs) > 1 else "")
    return f" (SLURM log: {slurm_log})" if slurm_log else ""


def _slurm_log(rule: str, wildcards: str) -> Path | None:
    """The newest log snakemake-executor-plugin-slurm kept for a failed job of ``rule`` (it keeps only those):
    where a job that failed before its ``wsi`` command ran left its cause."""
    folder = Path(".snakemake") / "slurm_logs" / f"rule_{rule}" / wildcards
    logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return logs[-1] if logs else None


def _counts(items: list[dict]) -> str:
    """``6 done, 1 skipped, 1 failed`` (statuses that occur, in this order)."""
    counts = Counter(item["status"] for item in items)
    return ", ".join(f"{counts[s]} {s}" for s in ("done", "skipped", "failed") if counts[s]) or "no slides"


def executor_errors(snakemake_logs) -> dict[Path, str]:
    """``{a failed job's log: the message Snakemake gave for it}`` from Snakemake's own log of the run (a path or
    a list of them, as Snakemake hands ``onerror``): what an executor knows and the job's ``wsi`` log cannot
    (sbatch refused it; SLURM says it was cancelled)."""
    errors: dict[Path, str] = {}
    paths = [snakemake_logs] if isinstance(snakemake_logs, (str, Path)) else list(snakemake_logs or [])
    lines = [line for p in paths if Path(p).is_file() for line in Path(p).read_text(errors="replace").splitlines()]
    message = log = None
    for line in lines + [""]:
        if line.startswith("Error in rule "):
            message = log = None
        elif line.startswith("    message: "):
            message = line.split(": ", 1)[1].strip()
        elif line.startswith("    log: "):
            log = line.split(": ", 1)[1].split(" (check log file")[0].split(", ")[0].strip()
        elif not line.startswith(" ") and message and log:
            errors.setdefault(Path(log).resolve(), message)
            message = log = None
    return errors


def summary(plan: Plan, executor_errors: dict[Path, str] | None = None) -> tuple[str, list[str]]:
    """The end-of-run summary (one screen) and the slides of this cohort that failed. ``executor_errors`` (from
    :func:`executor_errors`) name the cause of jobs that failed before their ``wsi`` command wrote one."""
    layout, run, config = plan.layout, plan.run, plan.config
    batches = list(plan.batches)
    jobs = {
        "tile": ([layout.status("tile", b) for b in batches], [layout.log("tile", b) for b in batches]),
        "extract": ([layout.status("extract", plan_encoder(config))], [layout.log("extract", plan_encoder(config))]),
        "train": ([layout.status("train", run)], [layout.log("train", run)]),
        "predict": ([layout.status("predict", run)], [layout.log("predict", run)]),
        "heatmap": ([layout.status("heatmap", b, run) for b in batches],
                    [layout.log("heatmap", b, run) for b in batches]),
    }
    stages = [s for s in STAGES if s != "train" or config["mode"] == "train"]
    if config["mode"] == "features":
        stages = ["tile", "extract"]
    lines = [f"wsi: summary of {layout.out.resolve()} ({len(plan.slides)} slides, mode {config['mode']})"]
    for stage in stages:
        statuses, logs = jobs[stage]
        items = _read_items(statuses)
        if items is not None:
            text = _counts(items) if stage != "train" else f"model run {layout.run_dir(run)}"
        else:
            # only the jobs whose status is missing: a finished batch's log says nothing about the one cut off
            unfinished = [(Path(s).stem, log) for s, log in zip(statuses, logs) if not Path(s).exists()]
            text = "not run"
            if len(unfinished) < len(statuses):  # some of its jobs finished: the others were cut off or never ran
                text = f"did not finish: {format_ids(n for n, _ in unfinished)}"
            started = [(name, log) for name, log in unfinished if log.exists()]
            if started:
                text = f"did not finish: {format_ids(n for n, _ in started)}{_where(stage, logs, *started[0])}"
            errors = [(name, log, e) for name, log in unfinished if (e := job_error(log))]
            errors += [(name, log, f"{name}: {e}") for name, log in unfinished
                       if not job_error(log) and (e := (executor_errors or {}).get(log.resolve()))]
            if errors:
                name, log, error = errors[0]
                text = f"failed: {error}" + ("" if str(log) in error else _where(stage, logs, name, log))
            if stage == "train" and (layout.run_dir(run) / "run.json").exists():
                text += (f"; the previous model run {layout.run_dir(run)} is unchanged and usable (predictions "
                         "and report, if any, are from it)")
        lines.append(f"  {stage:<8} {text}")
    if config["mode"] != "features":
        report = layout.report
        lines.append(f"  {'report':<8} {report if report.exists() else 'not written'}")
    failed = [r for r in read_failures(layout.out) if r["slide_id"] in plan.slides or r["stage"] == "train"]
    slides = sorted({r["slide_id"] for r in failed})
    if failed:
        lines.append(f"failed slides: {len(slides)} (each with its stage and cause in {layout.failures}):")
        for r in failed[:SHOWN_FAILURES]:
            lines.append(f"  {r['slide_id']} [{r['stage']}]: {r['cause']}")
        if len(failed) > SHOWN_FAILURES:
            lines.append(f"  ... and {len(failed) - SHOWN_FAILURES} more rows")
    return "\n".join(lines), slides


def plan_encoder(config: dict) -> str:
    """The key of the features this run extracts: their array in each store and their export folder."""
    return encoder_key(feature_set_of(config["extract"]))


def finish(plan: Plan, *, success: bool, snakemake_log=None) -> None:
    """Print the summary; exit 1 when slides failed, unless ``allow_failed_slides``. ``snakemake_log``:
    Snakemake's log of the run, for causes only the executor knows."""
    text, failed = summary(plan, executor_errors(snakemake_log))
    print(text, file=sys.stderr)
    if not success:
        print("wsi: exit status 1: a job failed (its cause is above; re-run the same command once fixed)",
              file=sys.stderr)
    elif failed and not plan.config["allow_failed_slides"]:
        print(f"wsi: exit status 1: {len(failed)} slide(s) failed: {format_ids(failed)} (set allow_failed_slides: "
              "true to exit 0 when some slides fail)", file=sys.stderr)
        raise SystemExit(1)
