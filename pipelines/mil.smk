# MIL: cross-validated training on the labels table (mode=train), then the fold ensemble predicts every
# slide: OUT/predictions/<run>/predictions.csv and scores/<run> in each store.


rule train:
    input:
        features=OUT / "status" / "extract" / f"{ENCODER_KEY}.json",
        labels=config["labels"] or [],
    output:
        run=OUT / "models" / RUN / "run.json",
    log:
        OUT / "logs" / "train" / f"{RUN}.log",
    threads: 16  # scaled down to --cores; the Dask cluster sizes itself to the machine
    resources:
        mem_mb=16000,
        runtime=720,
    params:
        out=OUT,
        cfg=stage_config("labels", "extract", "cluster", "mil"),
    shell:
        "wsi train --out {params.out:q} --config-json {params.cfg} --no-progress > {log:q} 2>&1"


rule predict:
    input:
        features=OUT / "status" / "extract" / f"{ENCODER_KEY}.json",
        run=MODEL_DIR / "run.json",
    output:
        predictions=OUT / "predictions" / RUN / "predictions.csv",
        status=OUT / "status" / "predict" / f"{RUN}.json",
    log:
        OUT / "logs" / "predict" / f"{RUN}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        out=OUT,
        model=MODEL_DIR,
        cfg=stage_config("extract", "cluster", "mil"),
    shell:
        "wsi predict --out {params.out:q} --model {params.model:q} --config-json {params.cfg}"
        " --status {output.status:q} --no-progress > {log:q} 2>&1"
