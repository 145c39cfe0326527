"""Feature geometry: top-activating examples, cross-SAE matching, decoder UMAP and Mapper graphs.

All four write `reports/geometry-{analysis}.html` (dashboards and decoder UMAPs also their
on-demand shards in `reports/geometry-{analysis}.data/`), so each rule is constrained to the
analysis names of its own type."""


rule top_examples:
    input:
        unpack(top_examples_inputs),
    output:
        examples=f"{GEO}/{{analysis}}/examples.parquet",
        index=f"{GEO}/{{analysis}}/feature_index.parquet",
        page=f"{R}/reports/geometry-{{analysis}}.html",
        page_data=directory(f"{R}/reports/geometry-{{analysis}}.data"),
    log:
        "logs/top_examples/{analysis}.log",
    benchmark:
        "benchmarks/top_examples/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("top_examples"),
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        analysis=analysis_params,
        model=analysis_model_params,
        sae=geo_sae_params,
        runtime=RUNTIME,
        families=dashboard_families,
    script:
        "../scripts/top_examples.py"


rule match_features:
    input:
        unpack(match_inputs),
    output:
        matches=f"{GEO}/{{analysis}}/matches.parquet",
        summary=f"{GEO}/{{analysis}}/summary.json",
        page=f"{R}/reports/geometry-{{analysis}}.html",
    log:
        "logs/match_features/{analysis}.log",
    benchmark:
        "benchmarks/match_features/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("match_features"),
    conda:
        ENV_TORCH
    threads: 2
    resources:
        gpu=1,
        mem_mb=16000,
    params:
        analysis=analysis_params,
        sae_a=match_sae_a,
        sae_b=match_sae_b,
        runtime=RUNTIME,
    script:
        "../scripts/match_features.py"


rule decoder_umap:
    input:
        unpack(decoder_umap_inputs),
    output:
        embedding=f"{GEO}/{{analysis}}/embedding.parquet",
        page=f"{R}/reports/geometry-{{analysis}}.html",
        page_data=directory(f"{R}/reports/geometry-{{analysis}}.data"),
    log:
        "logs/decoder_umap/{analysis}.log",
    benchmark:
        "benchmarks/decoder_umap/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("decoder_umap"),
    conda:
        ENV_TORCH
    threads: 2
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        saes=decoder_umap_saes,
        models=decoder_umap_models,
    script:
        "../scripts/decoder_umap.py"


rule mapper_graph:
    input:
        unpack(mapper_inputs),
    output:
        graph=f"{GEO}/{{analysis}}/graph.json",
        baseline=f"{GEO}/{{analysis}}/baseline.json",
        page=f"{R}/reports/geometry-{{analysis}}.html",
    log:
        "logs/mapper_graph/{analysis}.log",
    benchmark:
        "benchmarks/mapper_graph/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("mapper"),
    conda:
        ENV_TORCH
    threads: 1
    resources:
        mem_mb=8000,
    params:
        analysis=analysis_params,
        runtime=RUNTIME,
    script:
        "../scripts/mapper_graph.py"
