"""Paths, config slices and input functions shared by the rules.

Each rule receives only the slice of config that it uses as `params`, so a change to one analysis
invalidates only that analysis' jobs (Snakemake's params rerun trigger).
"""

import re

R = "results"
ENV_TORCH = "../envs/torch.yaml"
ENV_ANALYSIS = "../envs/analysis.yaml"
ENV_REPORT = "../envs/report.yaml"
NEVER = "(?!x)x"

RUNTIME = config["runtime"]
ORGANISM = config.get("organism")
ANALYSES = {a["name"]: a for a in config.get("analyses", [])}


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


def acts_path(model, dataset):
    return f"{R}/activations/{model}/{dataset}/layer_{layer_of(model)}/manifest.json"


def codes_path(model, dataset, sae):
    return f"{R}/codes/{model}/{dataset}/{sae}/manifest.json"


def metrics_path(model, dataset, sae):
    return f"{R}/metrics/{model}/{dataset}/{sae}.json"


def model_files(model):
    """Local model folders are inputs (so a retrained organism invalidates); hub ids are not."""
    spec = sfc.model_spec(config, model)
    if config["models"][model].get("source") == "organism":
        return [spec["path"]]
    return [spec["path"]] if Path(spec["path"]).is_dir() else []


def sae_files(sae):
    spec = sfc.sae_spec(config, sae)
    if config["saes"][sae].get("source") == "organism":
        return [spec["path"]]
    if "repo" not in spec and Path(spec["path"]).exists():
        return [spec["path"]]
    return []


def model_params(wildcards):
    return sfc.model_spec(config, wildcards.model)


def loader_params(wildcards):
    """Only what loading the tokenizer needs, so a layer change does not re-tokenize."""
    spec = sfc.model_spec(config, wildcards.model)
    return {
        k: spec[k] for k in ("path", "revision", "trust_remote_code", "chat_template")
    }


def dataset_params(wildcards):
    return sfc.dataset_spec(config, wildcards.dataset)


def sae_params(wildcards):
    return sfc.sae_spec(config, wildcards.sae)


def sae_train_params(wildcards):
    return config["saes"][wildcards.sae]["train"]


def analysis_params(wildcards):
    return ANALYSES[wildcards.analysis]


def sae_train_inputs(wildcards):
    spec = config["saes"][wildcards.sae]
    return [acts_path(spec["model"], ds) for ds in spec["train"]["datasets"]]


def metrics_targets():
    out = []
    for sae, spec in config.get("saes", {}).items():
        for ds in spec.get("eval_datasets", []):
            out.append(metrics_path(spec["model"], ds, sae))
    return out
