"""SAE training (organism or any model), sparse coding of cached activations, and SAE metrics."""

if ORGANISM_SAES_TOPK or MODEL_SAES_TOPK:

    rule train_sae:
        input:
            acts=sae_train_inputs,
        output:
            directory(f"{R}/organism/saes/{{sae}}"),
        log:
            "logs/train_sae/{sae}.log",
        benchmark:
            "benchmarks/train_sae/{sae}.tsv"
        wildcard_constraints:
            sae=_names_regex(ORGANISM_SAES_TOPK),
        conda:
            ENV_TORCH
        threads: 1
        resources:
            mem_mb=8000,
        params:
            train=sae_train_params,
            seed=RUNTIME["seed"],
        script:
            "../scripts/train_sae.py"

    # The same rule for SAEs with a train section on any other model.
    use rule train_sae as train_model_sae with:
        output:
            directory(f"{R}/saes/{{sae}}"),
        wildcard_constraints:
            sae=_names_regex(MODEL_SAES_TOPK),


if ORGANISM_SAES_TEMPORAL or MODEL_SAES_TEMPORAL:

    rule train_temporal_sae:
        input:
            acts=sae_train_inputs,
        output:
            directory(f"{R}/organism/saes/{{sae}}"),
        log:
            "logs/train_temporal_sae/{sae}.log",
        benchmark:
            "benchmarks/train_temporal_sae/{sae}.tsv"
        wildcard_constraints:
            sae=_names_regex(ORGANISM_SAES_TEMPORAL),
        conda:
            ENV_TORCH
        threads: 1
        resources:
            mem_mb=8000,
        params:
            train=sae_train_params,
            seed=RUNTIME["seed"],
        script:
            "../scripts/train_temporal_sae.py"

    use rule train_temporal_sae as train_model_temporal_sae with:
        output:
            directory(f"{R}/saes/{{sae}}"),
        wildcard_constraints:
            sae=_names_regex(MODEL_SAES_TEMPORAL),


rule encode_sae:
    input:
        acts=acts_input,
        sae=sae_inputs,
    output:
        manifest=f"{R}/codes/{{model}}/{{dataset}}/{{sae}}/manifest.json",
    log:
        "logs/encode_sae/{model}/{dataset}/{sae}.log",
    benchmark:
        "benchmarks/encode_sae/{model}/{dataset}/{sae}.tsv"
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        sae=sae_params,
        runtime=RUNTIME,
        encode=encode_params,
    script:
        "../scripts/encode_sae.py"


rule sae_metrics:
    input:
        acts=acts_input,
        codes=f"{R}/codes/{{model}}/{{dataset}}/{{sae}}/manifest.json",
        tokens=f"{R}/tokens/{{model}}/{{dataset}}.parquet",
        sae=sae_inputs,
        model=model_inputs,
    output:
        f"{R}/metrics/{{model}}/{{dataset}}/{{sae}}.json",
    log:
        "logs/sae_metrics/{model}/{dataset}/{sae}.log",
    benchmark:
        "benchmarks/sae_metrics/{model}/{dataset}/{sae}.tsv"
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        sae=sae_params,
        model=model_params,
        runtime=RUNTIME,
        metrics=METRICS,
    script:
        "../scripts/sae_metrics.py"
