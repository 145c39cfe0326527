"""Offline interactive HTML reports (plotly.js shipped once beside the pages) and the index.

A page's on-demand detail sits in `{page}.data/` beside it (script-tag shards that work from
file://). The cheap report rules run on the submit host under SLURM (localrules)."""


localrules:
    report_umap,
    report_diffing,
    report_similarity,
    report_metrics,
    report_index,


rule report_umap:
    input:
        embedding=f"{R}/umap/{{analysis}}/embedding.parquet",
        results=f"{R}/umap/{{analysis}}/results.json",
        tokens=analysis_tokens,
    output:
        page=f"{REP}/umap-{{analysis}}.html",
        data=directory(f"{REP}/umap-{{analysis}}.data"),
    log:
        "logs/report_umap/{analysis}.log",
    benchmark:
        "benchmarks/report_umap/{analysis}.tsv"
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        analysis=analysis_params,
    script:
        "../scripts/report_umap.py"


rule report_diffing:
    input:
        features=f"{R}/diffing/{{analysis}}/features.parquet",
        summary=f"{R}/diffing/{{analysis}}/summary.json",
    output:
        page=f"{REP}/diffing-{{analysis}}.html",
        data=directory(f"{REP}/diffing-{{analysis}}.data"),
    log:
        "logs/report_diffing/{analysis}.log",
    benchmark:
        "benchmarks/report_diffing/{analysis}.tsv"
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        analysis=analysis_params,
        neuronpedia=neuronpedia_of,
        models=diffing_models_info,
    script:
        "../scripts/report_diffing.py"


rule report_similarity:
    input:
        similarity=f"{R}/similarity/{{analysis}}/manifest.json",
        tokens=similarity_tokens,
    output:
        f"{REP}/similarity-{{analysis}}.html",
    log:
        "logs/report_similarity/{analysis}.log",
    benchmark:
        "benchmarks/report_similarity/{analysis}.tsv"
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        analysis=analysis_params,
    script:
        "../scripts/report_similarity.py"


rule report_metrics:
    input:
        metrics=metrics_targets(),
    output:
        f"{REP}/metrics-saes.html",
    log:
        "logs/report_metrics.log",
    benchmark:
        "benchmarks/report_metrics.tsv"
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        title="SAE metrics",
    script:
        "../scripts/report_metrics.py"


rule report_index:
    input:
        pages=report_pages(),
    output:
        index=f"{REP}/index.html",
        site=report(
            directory(f"{R}/report_site"),
            htmlindex="index.html",
            category="Reports",
            labels={"page": "interactive reports"},
        ),
    log:
        "logs/report_index.log",
    benchmark:
        "benchmarks/report_index.tsv"
    conda:
        ENV_REPORT
    threads: 1
    resources:
        mem_mb=2000,
    params:
        config=sfc.public_config(config),
    script:
        "../scripts/report_index.py"
