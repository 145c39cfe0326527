"""Feature geometry: top-activating examples, cross-SAE matching, decoder UMAP and Mapper graphs.

All four write `reports/geometry-{analysis}.html`, so each rule is constrained to the analysis
names of its own type."""

GEO = f"{R}/geometry"


def _geo_codes(model, dataset, sae, codes):
    if codes == "activations" or sae is None:
        return acts_path(model, dataset)
    return codes_path(model, dataset, sae)


def top_examples_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    return {
        "codes": codes_path(a["model"], a["dataset"], a["sae"]),
        "tokens": tokens_path(a["model"], a["dataset"]),
        "sae_files": sae_files(a["sae"]),
        "model_files": model_files(a["model"]),
    }


def geo_sae_params(wildcards):
    return sfc.sae_spec(config, ANALYSES[wildcards.analysis]["sae"])


def match_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    out = {}
    for side in ("a", "b"):
        s = a[side]
        out[f"codes_{side}"] = codes_path(s["model"], a["dataset"], s["sae"])
        out[f"tokens_{side}"] = tokens_path(s["model"], a["dataset"])
    return out


def match_sae_a(wildcards):
    return sfc.sae_spec(config, ANALYSES[wildcards.analysis]["a"]["sae"])


def match_sae_b(wildcards):
    return sfc.sae_spec(config, ANALYSES[wildcards.analysis]["b"]["sae"])


def _as_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def decoder_umap_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    out = {
        "matches": [f"{GEO}/{m}/matches.parquet" for m in _as_list(a.get("match"))],
        "indexes": [
            f"{GEO}/{t}/feature_index.parquet" for t in _as_list(a.get("top_examples"))
        ],
        "sae_files": [f for s in a["saes"] for f in sae_files(s)],
        "model_files": [
            f for s in a["saes"] for f in model_files(config["saes"][s]["model"])
        ],
    }
    if config["umap_warmup"]:
        out["numba_warmup"] = NUMBA_WARM
    return out


def decoder_umap_saes(wildcards):
    return {s: sfc.sae_spec(config, s) for s in ANALYSES[wildcards.analysis]["saes"]}


def decoder_umap_models(wildcards):
    return {
        s: sfc.model_spec(config, config["saes"][s]["model"])
        for s in ANALYSES[wildcards.analysis]["saes"]
    }


def mapper_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    return {
        "points": _geo_codes(a["model"], a["dataset"], a.get("sae"), a.get("codes")),
        "tokens": tokens_path(a["model"], a["dataset"]),
    }


def _names(kind):
    return _names_regex([a["name"] for a in analyses_of(kind)])


rule top_examples:
    input:
        unpack(top_examples_inputs),
    output:
        examples=f"{GEO}/{{analysis}}/examples.parquet",
        index=f"{GEO}/{{analysis}}/feature_index.parquet",
        page=f"{R}/reports/geometry-{{analysis}}.html",
    log:
        "logs/top_examples/{analysis}.log",
    benchmark:
        "benchmarks/top_examples/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("top_examples"),
    retries: 2
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
    retries: 2
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


def geometry_pages():
    kinds = ("top_examples", "match_features", "decoder_umap", "mapper")
    return [
        f"{R}/reports/geometry-{a['name']}.html" for k in kinds for a in analyses_of(k)
    ]
