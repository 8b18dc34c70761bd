# Heatmaps: one job per slide from the per-tile scores of the model run -> OUT/heatmaps/<run>/<slide_id>/.


rule heatmap:
    input:
        predictions=OUT / "predictions" / RUN / "predictions.csv",
    output:
        status=OUT / "status" / "heatmap" / RUN / "{slide}.json",
    log:
        OUT / "logs" / "heatmap" / RUN / "{slide}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        out=OUT,
        run=RUN,
        cfg=stage_config("slide", "heatmap"),
    shell:
        "wsi heatmap --out {params.out:q} --model-run {params.run:q} {wildcards.slide:q}"
        " --config-json {params.cfg} --status {output.status:q} --no-progress > {log:q} 2>&1"
