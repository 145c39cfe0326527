"""Analyses on the sparse codes and activations: diffing, UMAP, similarity and MFA."""


rule diff_stats:
    input:
        unpack(diffing_inputs),
    output:
        features=f"{R}/diffing/{{analysis}}/features.parquet",
        summary=f"{R}/diffing/{{analysis}}/summary.json",
    log:
        "logs/diff_stats/{analysis}.log",
    benchmark:
        "benchmarks/diff_stats/{analysis}.tsv"
    conda:
        ENV_ANALYSIS
    threads: 1
    resources:
        mem_mb=4000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
        context_lengths=diffing_context_lengths,
    script:
        "../scripts/diff_stats.py"


rule umap_warmup:
    output:
        NUMBA_WARM,
    log:
        "logs/umap_warmup.log",
    benchmark:
        "benchmarks/umap_warmup.tsv"
    conda:
        ENV_ANALYSIS
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/umap_warmup.py"


rule umap:
    input:
        unpack(umap_inputs),
    output:
        embedding=f"{R}/umap/{{analysis}}/embedding.parquet",
        results=f"{R}/umap/{{analysis}}/results.json",
    log:
        "logs/umap/{analysis}.log",
    benchmark:
        "benchmarks/umap/{analysis}.tsv"
    conda:
        ENV_ANALYSIS
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/umap_embed.py"


rule similarity:
    input:
        codes=code_source,
        tokens=analysis_tokens,
    output:
        manifest=f"{R}/similarity/{{analysis}}/manifest.json",
    log:
        "logs/similarity/{analysis}.log",
    benchmark:
        "benchmarks/similarity/{analysis}.tsv"
    conda:
        ENV_ANALYSIS
    threads: 1
    resources:
        mem_mb=4000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/similarity.py"


rule mfa_init:
    input:
        acts=analysis_acts,
    output:
        centroids=f"{R}/mfa/{{analysis}}/init/centroids.safetensors",
        info=f"{R}/mfa/{{analysis}}/init/init.json",
    log:
        "logs/mfa_init/{analysis}.log",
    benchmark:
        "benchmarks/mfa_init/{analysis}.tsv"
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/mfa_init.py"


rule fit_mfa:
    input:
        acts=analysis_acts,
        centroids=f"{R}/mfa/{{analysis}}/init/centroids.safetensors",
    output:
        model=f"{R}/mfa/{{analysis}}/model.safetensors",
        config=f"{R}/mfa/{{analysis}}/model.json",
        nll=f"{R}/mfa/{{analysis}}/nll.parquet",
        posteriors=f"{R}/mfa/{{analysis}}/posteriors.parquet",
    log:
        "logs/fit_mfa/{analysis}.log",
    benchmark:
        "benchmarks/fit_mfa/{analysis}.tsv"
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/fit_mfa.py"


rule mfa_interpret:
    input:
        model=f"{R}/mfa/{{analysis}}/model.safetensors",
        acts=analysis_acts,
        tokens=analysis_tokens,
    output:
        contexts=f"{R}/mfa/{{analysis}}/top_contexts.parquet",
        subspace=f"{R}/mfa/{{analysis}}/subspace.parquet",
        summary=f"{R}/mfa/{{analysis}}/interpret.json",
    log:
        "logs/mfa_interpret/{analysis}.log",
    benchmark:
        "benchmarks/mfa_interpret/{analysis}.tsv"
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/mfa_interpret.py"


rule mfa_steer:
    input:
        model=f"{R}/mfa/{{analysis}}/model.safetensors",
        lm=analysis_model_files,
    output:
        steer=f"{R}/mfa/{{analysis}}/steer.parquet",
        info=f"{R}/mfa/{{analysis}}/steer.json",
    log:
        "logs/mfa_steer/{analysis}.log",
    benchmark:
        "benchmarks/mfa_steer/{analysis}.tsv"
    conda:
        ENV_TORCH
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
        model=analysis_model_params,
    script:
        "../scripts/mfa_steer.py"


rule report_mfa:
    input:
        nll=f"{R}/mfa/{{analysis}}/nll.parquet",
        contexts=f"{R}/mfa/{{analysis}}/top_contexts.parquet",
        subspace=f"{R}/mfa/{{analysis}}/subspace.parquet",
        summary=f"{R}/mfa/{{analysis}}/interpret.json",
        config=f"{R}/mfa/{{analysis}}/model.json",
        steer=f"{R}/mfa/{{analysis}}/steer.parquet",
        steer_info=f"{R}/mfa/{{analysis}}/steer.json",
    output:
        html=f"{R}/reports/mfa-{{analysis}}.html",
    log:
        "logs/report_mfa/{analysis}.log",
    benchmark:
        "benchmarks/report_mfa/{analysis}.tsv"
    localrule: True
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/report_mfa.py"
