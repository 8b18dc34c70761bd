# Extract: one cohort job that owns the Dask cluster (local, SLURM or an address: config cluster.kind) and
# writes features/<encoder> into every complete store, plus OUT/features/<encoder>/<slide_id>.h5 exports.


rule extract:
    input:
        tile_status,
    output:
        status=OUT / "status" / "extract" / f"{ENCODER_KEY}.json",
    log:
        OUT / "logs" / "extract" / f"{ENCODER_KEY}.log",
    threads: 16  # scaled down to --cores; the Dask cluster sizes itself to the machine
    resources:
        mem_mb=16000,
        runtime=720,
    params:
        out=OUT,
        cfg=stage_config("slide", "extract", "cluster"),
    shell:
        "wsi extract --out {params.out:q} --config-json {params.cfg} --status {output.status:q}"
        " --no-progress > {log:q} 2>&1"
