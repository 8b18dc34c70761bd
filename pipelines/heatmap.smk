# Heatmaps: one job per batch of `slides_per_job` slides, from the per-tile scores of the model run ->
# OUT/heatmaps/<run>/<slide_id>/. Slides that failed an earlier stage are skipped, not failed again.


rule heatmap:
    input:
        predictions=LAYOUT.predictions_csv(RUN),
        tiles=batch_tile_status,
    output:
        status=LAYOUT.status("heatmap", "{batch}", RUN),
    log:
        LAYOUT.log("heatmap", "{batch}", RUN),
    threads: config["resources"]["heatmap"]["threads"]
    resources:
        **job_resources("heatmap"),
    params:
        slides=batch_args("heatmap"),
        cfg=stage_config_file("heatmap"),
        out=LAYOUT.out,
        run=RUN,
    shell:
        "$WSI_PYTHON -m wsi.cli heatmap @{params.slides:q} --out {params.out:q} --model-run {params.run:q}"
        " --config {params.cfg:q} --status {output.status:q} --log {log:q}"
