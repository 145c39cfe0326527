"""Comparing representations (rep_similarity), feature families across SAE widths, pair labels of
matched features, and steering with SAE decoder directions (seed 003's plan)."""

CMP = f"{R}/compare"


def _source_layer(s):
    return s["layer"] if s.get("layer") is not None else layer_of(s["model"])


def repsim_sources(wildcards):
    """Canonical source specs: model, layer, sae, codes part, and the paths they read."""
    a = ANALYSES[wildcards.analysis]
    out = []
    for s in a["sources"]:
        layer = _source_layer(s)
        if s.get("sae"):
            path = codes_path(s["model"], a["dataset"], s["sae"])
            layer = layer_of(config["saes"][s["sae"]]["model"])
        else:
            path = f"{R}/activations/{s['model']}/{a['dataset']}/layer_{layer}/manifest.json"
        out.append(
            {
                "model": s["model"],
                "layer": int(layer),
                "sae": s.get("sae"),
                "codes": s.get("codes"),
                "path": path,
                "tokens": tokens_path(s["model"], a["dataset"]),
            }
        )
    return out


def repsim_inputs(wildcards):
    specs = repsim_sources(wildcards)
    return {
        "sources": [s["path"] for s in specs],
        "tokens": sorted({s["tokens"] for s in specs}),
    }


def _match_of(wildcards):
    return ANALYSES[ANALYSES[wildcards.analysis]["match"]]


def families_inputs(wildcards):
    m = _match_of(wildcards)
    return {
        "matches": f"{GEO}/{m['name']}/matches.parquet",
        "codes_a": codes_path(m["a"]["model"], m["dataset"], m["a"]["sae"]),
        "codes_b": codes_path(m["b"]["model"], m["dataset"], m["b"]["sae"]),
        "tokens": tokens_path(m["a"]["model"], m["dataset"]),
    }


def families_match(wildcards):
    return _match_of(wildcards)


def steer_model(a):
    return a.get("model") or config["saes"][a["sae"]]["model"]


def steer_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    out = {"sae_files": sae_files(a["sae"]), "lm": model_files(steer_model(a))}
    if a.get("features") is None:
        out["codes"] = codes_path(steer_model(a), a["dataset"], a["sae"])
    return out


def steer_model_params(wildcards):
    return sfc.model_spec(config, steer_model(ANALYSES[wildcards.analysis]))


def steer_sae_params(wildcards):
    return sfc.sae_spec(config, ANALYSES[wildcards.analysis]["sae"])


def compare_pages():
    pages = [f"{REP}/repsim-{a['name']}.html" for a in analyses_of("rep_similarity")]
    pages += [
        f"{REP}/families-{a['name']}.html" for a in analyses_of("feature_families")
    ]
    pages += [f"{REP}/pairs-{a['name']}.html" for a in analyses_of("match_features")]
    pages += [f"{REP}/steer-{a['name']}.html" for a in analyses_of("sae_steer")]
    return pages


for _a in analyses_of("sae_steer"):
    if _a.get("features") is None and not _a.get("dataset"):
        sys.exit(
            f"saeflow: config error: analyses {_a['name']}.features = null: choosing features "
            "by frequency needs a `dataset` (or list `features`)"
        )
for _a in analyses_of("feature_families"):
    if ANALYSES.get(_a["match"], {}).get("type") != "match_features":
        sys.exit(
            f"saeflow: config error: analyses {_a['name']}.match = {_a['match']!r}: "
            "no match_features analysis of that name"
        )


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
        ENV_ANALYSIS
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
        ENV_ANALYSIS
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
    log:
        "logs/feature_families/{analysis}.log",
    benchmark:
        "benchmarks/feature_families/{analysis}.tsv"
    wildcard_constraints:
        analysis=_names("feature_families"),
    conda:
        ENV_ANALYSIS
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
    retries: 2
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
        runtime=RUNTIME,
    script:
        "../scripts/sae_steer.py"
