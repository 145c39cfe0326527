"""Activations of every hook point a model needs on a dataset, captured in one forward pass.

One `cache_activations` job per (model, dataset) writes layer_{L}/{hook}/ shards for every hook
point of the model (saeflow.hooks.model_hookpoints) and the set manifest last; a local
`publish_hookpoint` job per hook point gives its folder the manifest that downstream rules take.
"""


localrules:
    publish_hookpoint,


rule cache_activations:
    input:
        tokens=f"{R}/tokens/{{model}}/{{dataset}}.parquet",
        model=model_inputs,
    output:
        manifest=f"{R}/activations/{{model}}/{{dataset}}/manifest.json",
    log:
        "logs/cache_activations/{model}/{dataset}.log",
    benchmark:
        "benchmarks/cache_activations/{model}/{dataset}.tsv"
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        model=model_params,
        hookpoints=hookpoints_params,
        activations=ACTIVATIONS,
        runtime=RUNTIME,
    script:
        "../scripts/cache_activations.py"


rule publish_hookpoint:
    input:
        set=f"{R}/activations/{{model}}/{{dataset}}/manifest.json",
    output:
        manifest=f"{R}/activations/{{model}}/{{dataset}}/layer_{{layer}}/{{hook}}/manifest.json",
    log:
        "logs/publish_hookpoint/{model}/{dataset}/layer_{layer}/{hook}.log",
    benchmark:
        "benchmarks/publish_hookpoint/{model}/{dataset}/layer_{layer}/{hook}.tsv"
    wildcard_constraints:
        hook=HOOK_NAMES,
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/publish_hookpoint.py"
