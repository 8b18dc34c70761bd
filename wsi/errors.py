"""Errors every stage raises, and the cohort's ``failures.csv``.

A :class:`WsiError` prints as one line: which file, what went wrong, what to do. Stages raise it for bad
input; the per-slide loops catch it, record one ``failures.csv`` row (slide, stage, cause) and go on with
the other slides.
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
SHOWN_IDS = 8  # slide ids quoted in one error message


def format_ids(ids) -> str:
    """Up to a few ids, comma-separated, then "and N more"."""
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:SHOWN_IDS])
    return shown + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")


class WsiError(Exception):
    """A problem with one input, reported as ``<path>: <cause> (<hint>)``."""

    def __init__(self, path: str | os.PathLike | None, cause: str, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.cause = cause
        self.hint = hint
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.path}: {self.cause}" if self.path else self.cause
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class SlideError(WsiError):
    """The slide file cannot be opened or read, or lacks what tiling needs (MPP, tissue)."""


class StoreError(WsiError):
    """A per-slide store is missing, incomplete, corrupt, or lacks the group a stage needs."""


class ConfigError(WsiError):
    """A configuration value, labels table or model file is wrong."""


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
