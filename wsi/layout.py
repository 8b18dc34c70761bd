"""Every path under the output folder, named once.

The library, the CLI and the Snakefile (``pipelines/common.smk``) all build output paths through
:class:`Layout`, so a folder is renamed here or nowhere. Layout knows folders and file names only: which run
a config trains (:func:`wsi.config.run_name`) and which store keys exist (:mod:`wsi.keys`) are decided
elsewhere.

=========================================  ===========================================================
path under OUT                             what
=========================================  ===========================================================
``stores/<slide>.zarr``                    the per-slide store (contract in :mod:`wsi.store`)
``qc/<slide>.png``                         thumbnail with the tissue outline and the QC flags
``qc.csv``                                 slide quality control, one row per slide (:mod:`wsi.qc`)
``features/<encoder key>/<slide>.h5``      CLAM/TRIDENT-style feature export
``models/<run>/``                          a complete model run (``run.json`` last); built as
                                           ``models/.<run>.partial-*`` and swapped in whole
``predictions/<run>/predictions.csv``      slide-level predictions of a run
``heatmaps/<run>/<slide>/``                overlays, GeoJSON, pyramidal TIFF
``report.html``                            the run report
``failures.csv``                           one row per failed slide and stage
``status/<stage>/[<run>/]<name>.json``     what a workflow job did; Snakemake tracks these
``logs/<stage>/[<run>/]<name>.log``        one log per workflow job
``logs/<stage>/workers/``                  the SLURM Dask worker jobs' output (``cluster.kind: slurm``)
``.wsi/jobs/<name>-<digest>.<ext>``        a job's config and slide list, named by their content
=========================================  ===========================================================
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    out: Path

    def __init__(self, out: str | os.PathLike):
        object.__setattr__(self, "out", Path(out))

    # ---------------------------------------------------------------- per slide
    @property
    def stores_dir(self) -> Path:
        return self.out / "stores"

    def store(self, slide_id: str) -> Path:
        return self.stores_dir / f"{slide_id}.zarr"

    def store_ids(self) -> list[str]:
        """The slide ids that have a store folder (complete or not), sorted."""
        return sorted(p.name[:-len(".zarr")] for p in self.stores_dir.glob("*.zarr"))

    def qc(self, slide_id: str) -> Path:
        return self.out / "qc" / f"{slide_id}.png"

    def features_h5(self, encoder_key: str, slide_id: str) -> Path:
        return self.out / "features" / encoder_key / f"{slide_id}.h5"

    def heatmap_dir(self, run: str, slide_id: str) -> Path:
        return self.out / "heatmaps" / run / slide_id

    # ---------------------------------------------------------------- model runs
    @property
    def models_dir(self) -> Path:
        return self.out / "models"

    def run_dir(self, run: str) -> Path:
        return self.models_dir / run

    def partial_run(self, run: str, kind: str = "partial") -> Path:
        """A fresh ``models/.<run>.<kind>-<8 hex>``: a training of ``run`` being built (``partial``), or the
        complete run it replaces on its way out (``old``)."""
        return self.models_dir / f".{run}.{kind}-{uuid.uuid4().hex[:8]}"

    def partial_runs(self, run: str) -> list[Path]:
        """Leftovers of a training of ``run`` that was killed: ``.<run>.partial-*`` and ``.<run>.old-*``."""
        if not self.models_dir.is_dir():
            return []
        return sorted(p for kind in ("partial", "old") for p in self.models_dir.glob(f".{run}.{kind}-*"))

    def predictions_csv(self, run: str) -> Path:
        return self.out / "predictions" / run / "predictions.csv"

    def predictions_csvs(self) -> list[Path]:
        """Every run's ``predictions.csv`` that exists, sorted by run."""
        return sorted(self.out.glob(str(self.predictions_csv("*").relative_to(self.out))))

    # ---------------------------------------------------------------- cohort files
    @property
    def report(self) -> Path:
        return self.out / "report.html"

    @property
    def failures(self) -> Path:
        return self.out / "failures.csv"

    @property
    def qc_csv(self) -> Path:
        return self.out / "qc.csv"

    # ---------------------------------------------------------------- workflow bookkeeping
    def status(self, stage: str, name: str, run: str | None = None) -> Path:
        return self.out / "status" / stage / (run or "") / f"{name}.json"

    def log(self, stage: str, name: str, run: str | None = None) -> Path:
        return self.out / "logs" / stage / (run or "") / f"{name}.log"

    def worker_logs(self, stage: str) -> Path:
        """Where a stage's SLURM Dask worker jobs write ``wsi-worker-<job id>.out/.err``."""
        return self.out / "logs" / stage / "workers"

    @property
    def jobs_dir(self) -> Path:
        return self.out / ".wsi" / "jobs"

    def job_file(self, name: str, text: str, ext: str) -> Path:
        """``.wsi/jobs/<name>-<digest>.<ext>``: a file a job reads (its config, its slides), named by its
        content, so a Snakemake param holding the path changes exactly when the content does."""
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        return self.jobs_dir / f"{name}-{digest}.{ext}"
