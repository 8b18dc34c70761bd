"""Status files: what a workflow job did, with the wsi version and the config it ran with.

The Snakemake rules track these small JSON files instead of the stores themselves: a job that finishes
writes one (tmp + rename) even when some slides failed, so one bad slide never stops the cohort; the
failures are in the file, in ``OUT/failures.csv`` and in the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import __version__
from .atomic import write_json


def write_status(path, stage: str, items: list[dict], config: dict | None = None) -> Path:
    doc = {"stage": stage, "wsi_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "items": items, "config": config}
    return write_json(path, doc)


def read_status(path) -> dict:
    return json.loads(Path(path).read_text())
