# Tile: one job per batch of `slides_per_job` slides -> OUT/stores/<slide_id>.zarr (+ OUT/qc/<slide_id>.png), with
# slide QC (tiling.qc, flag by default: blur, folds, bubbles) run on the way and its rows added to OUT/qc.csv.
# The job's status file is what Snakemake tracks, so a slide that fails is recorded (status, failures.csv)
# without failing the job; slides already tiled with the same file and parameters are not redone.


rule tile:
    input:
        batch_slides,
    output:
        status=LAYOUT.status("tile", "{batch}"),
    log:
        LAYOUT.log("tile", "{batch}"),
    threads: config["resources"]["tile"]["threads"]
    resources:
        **job_resources("tile"),
    params:
        slides=batch_args("tile"),
        cfg=stage_config_file("tile"),
        out=LAYOUT.out,
    shell:
        "$WSI_PYTHON -m wsi.cli tile @{params.slides:q} --out {params.out:q} --config {params.cfg:q}"
        " --status {output.status:q} --log {log:q}"
