# Report: one self-contained OUT/report.html over the cohort (table, metrics, ROC, heatmap thumbnails).


rule report:
    input:
        tiles=tile_status,
        heatmaps=heatmap_status,
        predictions=LAYOUT.predictions_csv(RUN),
    output:
        html=report(LAYOUT.report, caption="../docs/report.rst", category="Report"),
    log:
        LAYOUT.log("report", "report"),
    threads: config["resources"]["report"]["threads"]
    resources:
        **job_resources("report"),
    params:
        cfg=stage_config_file("report"),
        out=LAYOUT.out,
        run=RUN,
    shell:
        "$WSI_PYTHON -m wsi.cli report --out {params.out:q} --model-run {params.run:q} --config {params.cfg:q}"
        " --log {log:q}"
