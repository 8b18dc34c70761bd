"""The cohort's ``failures.csv``: one row per slide and stage that failed (slide, stage, source, cause, time).

The per-slide loops (:mod:`wsi.runner`) add a row when a slide fails and drop it once the slide passes; the
summary, the report and the viewer read them. Parallel workflow jobs share the file, so every change is a
locked read-modify-write, written through tmp + rename.
"""

from __future__ import annotations

import csv
import fcntl
import io
import os
import time
from pathlib import Path

from .atomic import write_text
from .layout import Layout

FAILURE_COLUMNS = ("slide_id", "stage", "source", "cause", "time")


def failures_path(out_dir: str | os.PathLike) -> Path:
    return Layout(out_dir).failures


def lock_path(path: Path) -> Path:
    """The lock file beside ``failures.csv``; only removed when no job can hold it (at a workflow's start)."""
    return path.with_name(path.name + ".lock")


def _locked_rewrite(path: Path, update) -> None:
    """Read the CSV rows, apply ``update(rows) -> rows`` and write back, holding an exclusive lock.

    Per-slide Snakemake jobs run in parallel and share one ``failures.csv``; the lock file keeps their
    read-modify-write cycles from interleaving, and tmp + rename keeps the CSV whole if a job is killed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path(path), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        rows = update(rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text(path, buf.getvalue())


def record_failure(out_dir, slide_id: str, stage: str, source, cause: str) -> None:
    """Add (or replace) the failure row of ``slide_id`` at ``stage``."""
    row = {"slide_id": slide_id, "stage": stage, "source": str(source), "cause": " ".join(str(cause).split()),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def update(rows):
        return [r for r in rows if (r["slide_id"], r["stage"]) != (slide_id, stage)] + [row]

    _locked_rewrite(failures_path(out_dir), update)


def clear_failure(out_dir, slide_id: str, stage: str) -> None:
    """Drop a stale failure row once ``slide_id`` has passed ``stage``."""
    path = failures_path(out_dir)
    if not path.exists():
        return
    _locked_rewrite(path, lambda rows: [r for r in rows if (r["slide_id"], r["stage"]) != (slide_id, stage)])


def read_failures(out_dir) -> list[dict]:
    path = failures_path(out_dir)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
