# Shared helpers of the wsi workflow: the slide list, output paths and the config each stage runs with.
import json
import shlex
from pathlib import Path

from wsi.slide import dicom_files, expand_slide_paths, slide_id_from_path
from wsi.store import encoder_key

OUT = Path(config["out_dir"])
ENCODER_KEY = encoder_key(config["extract"]["encoder"])
RUN = (
    Path(config["model_dir"]).name
    if config["mode"] == "predict" and config.get("model_dir")
    else config["mil"]["run_name"] or f"{config['mil']['model']}_{ENCODER_KEY}"
)
MODEL_DIR = (
    Path(config["model_dir"])
    if config["mode"] == "predict" and config.get("model_dir")
    else OUT / "models" / RUN
)

if config.get("demo") and (
    Path(config["slides_dir"]).name != "slides"
    or Path(config["labels"] or "").resolve()
    != Path(config["slides_dir"]).parent.resolve() / "labels.csv"
):
    raise ValueError(
        "demo mode writes <folder>/slides and <folder>/labels.csv: set slides_dir and labels so"
    )
if config["mode"] == "train" and not config.get("labels"):
    raise ValueError(
        "mode=train needs a labels table: set labels=<csv> (slide_id,label[,patient_id])"
    )
if config["mode"] == "predict" and not config.get("model_dir"):
    raise ValueError("mode=predict needs model_dir=<OUT/models/<run>> of a trained run")


def slide_files(wildcards=None):
    """{slide_id: path}; in demo mode the slides come from the demo_data checkpoint."""
    if config.get("demo"):
        checkpoints.demo_data.get()
    folder = Path(config["slides_dir"])
    return (
        {slide_id_from_path(p): str(p) for p in expand_slide_paths([folder])}
        if folder.exists()
        else {}
    )


def slide_inputs(wildcards):
    """The slide's file, or every file of a DICOM slide folder: the tile job's inputs, so that a changed file
    re-tiles the slide (Snakemake does not look inside a folder given as an input for newer files).
    """
    path = Path(slide_files()[wildcards.slide])
    return [str(p) for p in dicom_files(path)] if path.is_dir() else [str(path)]


def stage_config(*sections):
    """The config sections a stage depends on, as a shell-quoted JSON argument for `wsi --config-json`.

    Passed as a rule param, so changing one of these parameters re-runs that stage and those after it.
    """
    return shlex.quote(json.dumps({s: config[s] for s in sections}, sort_keys=True))


def tile_status(wildcards=None):
    return [str(OUT / "status" / "tile" / f"{s}.json") for s in slide_files()]


def heatmap_status(wildcards=None):
    return [str(OUT / "status" / "heatmap" / RUN / f"{s}.json") for s in slide_files()]


def final_targets(wildcards=None):
    if config["mode"] == "features":
        return [str(OUT / "status" / "extract" / f"{ENCODER_KEY}.json")]
    return [str(OUT / "report.html")]


if config.get("demo"):

    checkpoint demo_data:
        output:
            slides=directory(config["slides_dir"]),
            labels=config["labels"],
        log:
            OUT / "logs" / "demo_data.log",
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
            "wsi demo-data {params.folder} --n-slides {params.n} --seed {params.seed} {params.field} > {log} 2>&1"
