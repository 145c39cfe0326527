"""Comparing representations (rep_similarity), feature families across SAE widths, pair labels of
matched features, and steering with SAE decoder directions (seed 003's plan)."""


include: "compare_inputs.smk"


rule rep_similarity:
    input:
        unpack(repsim_inputs),
    output:
        measures=f"{CMP}/{{analysis}}/measures.parquet",
        summary=f"{CMP}/{{analysis}}/summary.json",
        page=f"{REP}/repsim-{{analysis}}.html",
    log:
        "logs/rep_similarity/{analysis}.log",
    benchmark:
        "benchmarks/rep_similarity/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("rep_similarity"),
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        sources=repsim_sources,
        runtime=RUNTIME,
    script:
        "../scripts/rep_similarity.py"


rule label_pairs:
    input:
        unpack(match_inputs),
        matches=f"{GEO}/{{analysis}}/matches.parquet",
    output:
        pairs=f"{GEO}/{{analysis}}/pairs.parquet",
        redundant=f"{GEO}/{{analysis}}/redundant.parquet",
        page=f"{REP}/pairs-{{analysis}}.html",
    log:
        "logs/label_pairs/{analysis}.log",
    benchmark:
        "benchmarks/label_pairs/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("match_features"),
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        sae_a=match_sae_a,
        sae_b=match_sae_b,
        runtime=RUNTIME,
    script:
        "../scripts/label_pairs.py"


rule feature_families:
    input:
        unpack(families_inputs),
    output:
        families=f"{CMP}/{{analysis}}/families.parquet",
        summary=f"{CMP}/{{analysis}}/families.json",
        page=f"{REP}/families-{{analysis}}.html",
        links=f"{REP}/families-{{analysis}}.links.js",
    log:
        "logs/feature_families/{analysis}.log",
    benchmark:
        "benchmarks/feature_families/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("feature_families"),
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        match=families_match,
    script:
        "../scripts/feature_families.py"


rule sae_steer:
    input:
        unpack(steer_inputs),
    output:
        steer=f"{CMP}/{{analysis}}/steer.parquet",
        info=f"{CMP}/{{analysis}}/steer.json",
        page=f"{REP}/steer-{{analysis}}.html",
    log:
        "logs/sae_steer/{analysis}.log",
    benchmark:
        "benchmarks/sae_steer/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("sae_steer"),
    conda:
        ENV_TORCH
    threads: 1
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        analysis=analysis_params,
        model=steer_model_params,
        sae=steer_sae_params,
        hookpoint=steer_hookpoint,
        runtime=RUNTIME,
    script:
        "../scripts/sae_steer.py"
