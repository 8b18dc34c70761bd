# Tile: one job per slide -> OUT/stores/<slide_id>.zarr (+ OUT/qc/<slide_id>.png); the job's status file is
# what Snakemake tracks, so a slide that fails is recorded (status, failures.csv) without stopping the cohort.


rule tile:
    input:
        slide_inputs,
    output:
        status=OUT / "status" / "tile" / "{slide}.json",
    log:
        OUT / "logs" / "tile" / "{slide}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        slide=lambda w: slide_files()[w.slide],
        out=OUT,
        cfg=stage_config("slide", "tissue", "tiling"),
    shell:
        "wsi tile {params.slide:q} --out {params.out:q} --config-json {params.cfg} --status {output.status:q}"
        " --no-progress > {log:q} 2>&1"
