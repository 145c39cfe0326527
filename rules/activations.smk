"""Residual-stream activations at the configured layer, in resumable shards."""


rule cache_activations:
    input:
        tokens=f"{R}/tokens/{{model}}/{{dataset}}.parquet",
        model=model_inputs,
    output:
        manifest=f"{R}/activations/{{model}}/{{dataset}}/layer_{{layer}}/manifest.json",
    log:
        "logs/cache_activations/{model}/{dataset}/layer_{layer}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{dataset}/layer_{layer}.tsv"
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        model=model_params,
        activations=ACTIVATIONS,
        runtime=RUNTIME,
    script:
        "../scripts/cache_activations.py"
