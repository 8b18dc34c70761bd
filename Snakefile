# wsi workflow: slides -> tiles -> features -> (train) -> predict -> heatmaps -> report.
# Parameters: configs/default.yaml (validated by configs/schema.yaml), overridden with --configfile / --config.
# Each rule calls the thin `wsi <stage>` CLI (through this interpreter); the logic lives in the wsi library.
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")


# Defaults from the workflow's own folder, so `snakemake -s <wsi>/Snakefile` works from any directory.
configfile: Path(workflow.basedir) / "configs" / "default.yaml"


validate(config, "configs/schema.yaml")


# With cluster.kind=slurm the cohort jobs start their Dask workers through dask-jobqueue, so they run
# on the submit host rather than holding an allocation themselves.
if config["cluster"]["kind"] == "slurm":

    localrules:
        extract,
        train,
        predict,


include: "pipelines/common.smk"
include: "pipelines/tile.smk"
include: "pipelines/extract.smk"
include: "pipelines/mil.smk"
include: "pipelines/heatmap.smk"
include: "pipelines/report.smk"


rule all:
    default_target: True
    input:
        final_targets,
