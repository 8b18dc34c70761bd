# Extract: one cohort job that owns the Dask cluster (local, SLURM or an address: config cluster.kind) and
# writes features/<encoder> into every complete store, plus OUT/features/<encoder>/<slide_id>.h5 exports.


rule extract:
    input:
        tile_status,
    output:
        status=LAYOUT.status("extract", ENCODER_KEY),
    log:
        LAYOUT.log("extract", ENCODER_KEY),
    threads: config["resources"]["extract"]["threads"]  # scaled down to --cores; Dask sizes itself to them
    resources:
        **job_resources("extract"),
    params:
        cfg=stage_config_file("extract"),
        out=LAYOUT.out,
    shell:
        "$WSI_PYTHON -m wsi.cli extract --out {params.out:q} --config {params.cfg:q} --status {output.status:q}"
        " --log {log:q}"
