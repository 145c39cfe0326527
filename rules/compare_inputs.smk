"""Paths, config slices and input functions of rules/compare.smk (and its config checks)."""

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
            path = acts_path(s["model"], a["dataset"], layer=layer)
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
    return canonical(out)


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
    if a.get("dataset"):
        out["codes"] = codes_path(steer_model(a), a["dataset"], a["sae"])
        out["tokens"] = tokens_path(steer_model(a), a["dataset"])
    return out


def steer_model_params(wildcards):
    return canonical(sfc.model_spec(config, steer_model(ANALYSES[wildcards.analysis])))


def steer_sae_params(wildcards):
    return canonical(sfc.sae_spec(config, ANALYSES[wildcards.analysis]["sae"]))


def compare_pages():
    pages = [f"{REP}/repsim-{a['name']}.html" for a in analyses_of("rep_similarity")]
    pages += [
        f"{REP}/families-{a['name']}.html" for a in analyses_of("feature_families")
    ]
    pages += [f"{REP}/pairs-{a['name']}.html" for a in analyses_of("match_features")]
    pages += [f"{REP}/steer-{a['name']}.html" for a in analyses_of("sae_steer")]
    return pages


def steer_hookpoint(wildcards):
    return canonical(
        sfh.sae_hookpoint(config, ANALYSES[wildcards.analysis]["sae"]).as_dict()
    )
