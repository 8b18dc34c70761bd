"""The per-slide loop of every stage, written once, with one failure policy.

For each slide, in order: skip it if it failed an earlier stage (it has nothing for this one; its row in
``failures.csv`` already says why and what to do), skip it if its result is already complete, run the stage,
then record the outcome: a failure row (slide, stage, source, one-line cause) or the removal of a stale one.
Any exception of one slide is that slide's failure; the others carry on. ``KeyboardInterrupt`` and
``SystemExit`` end the loop. :func:`run_slides` is that loop; a stage whose slides run in parallel (extraction,
on Dask) records the same outcomes through :class:`StageRun` as its futures end.

>>> import tempfile
>>> out = tempfile.mkdtemp()
>>> def work(slide_id):
...     if slide_id == "b":
...         raise ValueError("unreadable")
>>> summary = run_slides(out, "tile", {"a": "a.svs", "b": "b.svs"}, work)
>>> summary.done, summary.failed
(['a'], {'b': 'ValueError: unreadable'})
>>> run_slides(out, "heatmap", {"a": "a.zarr", "b": "b.zarr"}, work).skipped
{'b': 'failed at tile'}
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .errors import WsiError
from .failures import clear_failure, read_failures, record_failure

# Stages whose failure leaves a slide with nothing for the next one. A later stage skips such a slide instead
# of failing it again with advice that does not apply, until the earlier stage passes and clears its row.
EARLIER_STAGES = {
    "tile": (),
    "extract": ("tile",),
    "train": ("tile", "extract"),
    "predict": ("tile", "extract"),
    "heatmap": ("tile", "extract", "predict"),
}


@dataclass
class StageSummary:
    """What one run of a stage did, the same for every stage: per slide (done, skipped and why, failed and why,
    what it returned), the cohort files it wrote and the lines it has for the user. The CLI prints it and
    writes :meth:`items` into the job's status file."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # slide id -> why
    failed: dict[str, str] = field(default_factory=dict)    # slide id -> one-line cause
    results: dict[str, object] = field(default_factory=dict)  # slide id -> what ``work`` returned (done slides)
    details: dict[str, dict] = field(default_factory=dict)  # slide id -> more fields of its status item
    outputs: dict[str, object] = field(default_factory=dict)  # what it is ("predictions") -> the file it wrote
    messages: list[str] = field(default_factory=list)       # lines for stdout (train: its metrics)
    warnings: list[str] = field(default_factory=list)       # lines for stderr
    unit: str = "slide_id"  # what ``done`` names: slides, or (train) the model run

    def items(self) -> list[dict]:
        """One entry per slide (or model run), as status files record them."""
        def item(name: str, status: str, cause: str | None = None) -> dict:
            return {self.unit: name, "status": status, **({"cause": cause} if cause else {}),
                    **self.details.get(name, {})}

        return ([item(s, "done") for s in self.done]
                + [item(s, "skipped", why) for s, why in self.skipped.items()]
                + [item(s, "failed", why) for s, why in self.failed.items()])


def failed_earlier(out_dir, stage: str, slide_ids) -> dict[str, str]:
    """``{slide_id: earlier stage}`` for the slides with a ``failures.csv`` row of a stage before ``stage``."""
    rows = {r["slide_id"]: r["stage"] for r in read_failures(out_dir) if r["stage"] in EARLIER_STAGES[stage]}
    return {s: rows[s] for s in slide_ids if s in rows}


def cause_of(error: BaseException) -> str:
    return error.one_line() if isinstance(error, WsiError) else f"{type(error).__name__}: {error}"


class StageRun:
    """One stage's outcomes over a cohort, recorded as the slides end, in whatever order: :func:`run_slides`
    drives it one slide after another; extraction drives it from its Dask futures.

    Slides that failed an earlier stage are skipped from the start; :meth:`todo` lists the rest.
    """

    def __init__(self, out_dir, stage: str, sources: Mapping[str, object]):
        self.out_dir, self.sources = out_dir, sources
        self.summary = StageSummary(stage)
        for slide_id, earlier in failed_earlier(out_dir, stage, sources).items():
            self.summary.skipped[slide_id] = f"failed at {earlier}"

    def todo(self) -> list[str]:
        return [s for s in self.sources if s not in self.summary.skipped]

    def skip(self, slide_id: str, why: str) -> None:
        self.summary.skipped[slide_id] = why

    def fail(self, slide_id: str, error: BaseException) -> None:
        """A failure row (slide, stage, source, one-line cause) and the cause on stderr; a slide's first
        failure is its cause, later ones (its other tasks) are dropped."""
        if slide_id in self.summary.failed:
            return
        stage = self.summary.stage
        self.summary.failed[slide_id] = cause_of(error)
        record_failure(self.out_dir, slide_id, stage, self.sources[slide_id], self.summary.failed[slide_id])
        print(f"wsi {stage}: {slide_id}: {self.summary.failed[slide_id]}", file=sys.stderr, flush=True)

    def done(self, slide_id: str, result: object = None) -> None:
        clear_failure(self.out_dir, slide_id, self.summary.stage)
        self.summary.done.append(slide_id)
        self.summary.results[slide_id] = result


def run_slides(out_dir, stage: str, sources: Mapping[str, object], work: Callable[[str], object], *,
               is_done: Callable[[str], bool] | None = None) -> StageSummary:
    """Run ``work(slide_id)`` for each slide of ``sources`` (``{slide_id: the file or store it reads}``, named
    in failure rows) and return what happened to each, with what ``work`` returned for the done ones."""
    run = StageRun(out_dir, stage, sources)
    for slide_id in run.todo():
        try:  # deciding whether a slide is done reads its result, which may be damaged: that fails it too
            if is_done is not None and is_done(slide_id):
                run.skip(slide_id, "up to date")
                continue
            result = work(slide_id)
        except Exception as e:  # one slide's failure, whatever it is, must not stop the cohort
            run.fail(slide_id, e)
            continue
        run.done(slide_id, result)
    return run.summary
