# MIL: cross-validated training on the labels table (mode=train), then the fold ensemble predicts every
# slide: OUT/predictions/<run>/predictions.csv and scores/<run> in each store.
# Training tracks a status file, not the run's run.json: a training that fails must not let Snakemake delete
# the run.json of the previous, complete run (the library swaps a new run in only once it is whole).


rule train:
    input:
        features=LAYOUT.status("extract", ENCODER_KEY),
        labels=config["labels"] or [],
    output:
        status=LAYOUT.status("train", RUN),
    log:
        LAYOUT.log("train", RUN),
    threads: config["resources"]["train"]["threads"]  # scaled down to --cores; Dask sizes itself to them
    resources:
        **job_resources("train"),
    params:
        cfg=stage_config_file("train"),
        out=LAYOUT.out,
    shell:
        "$WSI_PYTHON -m wsi.cli train --out {params.out:q} --config {params.cfg:q} --status {output.status:q}"
        " --log {log:q}"


rule predict:
    input:
        features=LAYOUT.status("extract", ENCODER_KEY),
        run=model_input,
        labels=config["labels"] or [],
    output:
        predictions=LAYOUT.predictions_csv(RUN),
        status=LAYOUT.status("predict", RUN),
    log:
        LAYOUT.log("predict", RUN),
    threads: config["resources"]["predict"]["threads"]
    resources:
        **job_resources("predict"),
    params:
        cfg=stage_config_file("predict"),
        out=LAYOUT.out,
        model=MODEL_DIR,
    shell:
        "$WSI_PYTHON -m wsi.cli predict --out {params.out:q} --model {params.model:q} --config {params.cfg:q}"
        " --status {output.status:q} --log {log:q}"
