# Report: one self-contained OUT/report.html over the cohort (table, metrics, ROC, heatmap thumbnails).


rule report:
    input:
        tiles=tile_status,
        heatmaps=heatmap_status,
        predictions=OUT / "predictions" / RUN / "predictions.csv",
    output:
        html=report(
            OUT / "report.html", caption="../docs/report.rst", category="Report"
        ),
    log:
        OUT / "logs" / "report.log",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        out=OUT,
        run=RUN,
        cfg=stage_config("labels", "mode", "model_dir", "extract", "mil", "heatmap"),
    shell:
        "wsi report --out {params.out:q} --model-run {params.run:q} --config-json {params.cfg} > {log:q} 2>&1"
