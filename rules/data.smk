"""Datasets from the hub, local files or the organism, and their tokenization per model."""


rule fetch_dataset:
    input:
        unpack(dataset_inputs),
    output:
        f"{R}/data/{{dataset}}.parquet",
    log:
        "logs/fetch_dataset/{dataset}.log",
    benchmark:
        "benchmarks/fetch_dataset/{dataset}.tsv"
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=4000,
    params:
        name=dataset_name,
        spec=dataset_params,
        config_dir=".",
        seed=RUNTIME["seed"],
    script:
        "../scripts/fetch_dataset.py"


rule tokenize:
    input:
        data=f"{R}/data/{{dataset}}.parquet",
        model=model_inputs,
    output:
        f"{R}/tokens/{{model}}/{{dataset}}.parquet",
    log:
        "logs/tokenize/{model}/{dataset}.log",
    benchmark:
        "benchmarks/tokenize/{model}/{dataset}.tsv"
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=4000,
    params:
        model=loader_params,
        spec=dataset_params,
    script:
        "../scripts/tokenize_dataset.py"
