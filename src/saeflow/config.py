"""Config loading, schema validation, semantic checks and the per-rule config slices.

Every check runs before any job, fails with one line naming the key and the value, and needs no
network: a hub model's `config.json` is consulted only when it is already cached locally (otherwise
the layer is checked again when the job loads the model).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from saeflow.errors import ConfigError
from saeflow.organism.corpus import CORPORA

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = ROOT / "schemas" / "config.schema.yaml"
RESULTS = "results"
ORGANISM_MODELS = f"{RESULTS}/organism/models"
ORGANISM_SAES = f"{RESULTS}/organism/saes"
ORGANISM_CORPUS = f"{RESULTS}/organism/corpus"
CODE_KINDS = ("pred", "novel", "total", "activations")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML config file, turning parser errors into one line naming the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}:{where} is not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}"
        )
    return data


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def schema_check(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Validate against the JSON schema and report the most relevant error in one line."""
    import jsonschema

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        key = _key_path(error.absolute_path)
        value = json.dumps(error.instance, default=str)
        if len(value) > 80:
            value = value[:77] + "..."
        raise ConfigError(f"config key {key} = {value}: {error.message.splitlines()[0][:200]}")


def apply_defaults(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Fill schema defaults in place (the same way `snakemake.utils.validate` does)."""
    from snakemake.utils import validate

    validate(config, str(schema_path), set_default=True)


def load_config(path: str | os.PathLike, *, check_files: bool = True) -> dict[str, Any]:
    """Read, validate and semantically check a config file (for notebooks and tests)."""
    config = read_yaml(path)
    prepare(config, Path(path).resolve().parent, check_files=check_files)
    return config


def prepare(config: dict[str, Any], config_dir: Path, *, check_files: bool = True) -> None:
    """Schema check, defaults, then the semantic checks; raises ConfigError on the first problem."""
    schema_check(config)
    apply_defaults(config)
    config["_config_dir"] = str(config_dir)
    check_semantics(config, config_dir, check_files=check_files)


def _need(config: dict[str, Any], section: str, name: Any, key: str) -> None:
    if name not in config.get(section, {}):
        known = ", ".join(sorted(config.get(section, {}))) or "none"
        raise ConfigError(f"{key} = {name!r}: no such entry in {section} (known: {known})")


def model_n_layers(config: dict[str, Any], name: str) -> int | None:
    """Number of blocks of a model, from the organism config or a locally available config.json."""
    spec = config["models"][name]
    if spec.get("source") == "organism":
        return int(config["organism"]["base_lm"]["num_layers"])
    cfg_path = _local_hf_config(spec["hf_name"], spec.get("revision"), config)
    if cfg_path is None:
        return None
    hf_cfg = json.loads(Path(cfg_path).read_text())
    hf_cfg = hf_cfg.get("text_config", hf_cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if key in hf_cfg:
            return int(hf_cfg[key])
    return None


def _local_hf_config(hf_name: str, revision: str | None, config: dict[str, Any]) -> str | None:
    local = resolve_path(hf_name, config)
    if Path(local).is_dir():
        path = Path(local) / "config.json"
        return str(path) if path.exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(hf_name, "config.json", revision=revision)
    return found if isinstance(found, str) else None


def resolve_path(path: str, config: dict[str, Any]) -> str:
    """A local path relative to the config file (kept relative to the working dir when possible)."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    base = Path(config.get("_config_dir", "."))
    candidate = base / p
    if not candidate.exists() and not Path(path).exists():
        return str(candidate) if base != Path(".") else path
    if not candidate.exists():
        return path
    try:
        return os.path.relpath(candidate)
    except ValueError:
        return str(candidate)


def check_semantics(config: dict[str, Any], config_dir: Path, *, check_files: bool = True) -> None:
    """Cross-references, layer ranges and file sources; one line per failure."""
    models = config.get("models", {})
    for name, spec in models.items():
        key = f"models.{name}"
        if spec.get("source") == "organism":
            if "organism" not in config:
                raise ConfigError(
                    f"{key}.source = 'organism' but the config has no organism section"
                )
            if spec["organism"] not in ("base", "chat"):
                raise ConfigError(f"{key}.organism = {spec['organism']!r}: must be base or chat")
        elif "hf_name" not in spec:
            raise ConfigError(
                f"{key}: needs hf_name (a hub id or local folder) or source: organism"
            )
        n_layers = model_n_layers(config, name)
        if n_layers is not None and not 0 <= spec["layer"] < n_layers:
            raise ConfigError(
                f"{key}.layer = {spec['layer']}: "
                f"the model has {n_layers} layers (0..{n_layers - 1})"
            )
    for name, spec in config.get("datasets", {}).items():
        key = f"datasets.{name}"
        if spec["source"] == "organism":
            if "organism" not in config:
                raise ConfigError(
                    f"{key}.source = 'organism' but the config has no organism section"
                )
            if spec.get("corpus") not in CORPORA:
                raise ConfigError(
                    f"{key}.corpus = {spec.get('corpus')!r}: one of {', '.join(CORPORA)}"
                )
        elif spec["source"] == "file" and check_files:
            from saeflow.data import check_file_source

            check_file_source(name, spec, config_dir)
    for name, spec in config.get("saes", {}).items():
        key = f"saes.{name}"
        _need(config, "models", spec["model"], f"{key}.model")
        if spec.get("source") == "organism":
            if "train" not in spec:
                raise ConfigError(f"{key}: an organism SAE needs a train section")
            for ds in spec["train"]["datasets"]:
                _need(config, "datasets", ds, f"{key}.train.datasets")
        elif "path" not in spec and "repo" not in spec:
            raise ConfigError(f"{key}: needs path (local folder/file) or repo + path (hub)")
        for ds in spec.get("eval_datasets", []):
            _need(config, "datasets", ds, f"{key}.eval_datasets")
    seen: set[str] = set()
    for i, analysis in enumerate(config.get("analyses", [])):
        key = f"analyses[{i}]"
        name = analysis["name"]
        if name in seen:
            raise ConfigError(f"{key}.name = {name!r}: analysis names must be unique")
        seen.add(name)
        for field in ("model", "dataset", "sae", "target", "control"):
            if analysis.get(field) is not None:
                section = {"model": "models", "sae": "saes"}.get(field, "datasets")
                _need(config, section, analysis[field], f"{key}.{field}")
        for field, section in (("models", "models"), ("saes", "saes")):
            for ref in analysis.get(field, []):
                _need(config, section, ref, f"{key}.{field}")
        for side in ("a", "b"):
            if isinstance(analysis.get(side), dict):
                _need(config, "models", analysis[side].get("model"), f"{key}.{side}.model")
                _need(config, "saes", analysis[side].get("sae"), f"{key}.{side}.sae")
        for field, kind in (("match", "match_features"), ("top_examples", "top_examples")):
            refs = analysis.get(field) if analysis["type"] == "decoder_umap" else None
            for ref in [refs] if isinstance(refs, str) else refs or []:
                found = [a for a in config["analyses"] if a["name"] == ref]
                if not found or found[0]["type"] != kind:
                    raise ConfigError(f"{key}.{field} = {ref!r}: no {kind} analysis of that name")
        if analysis["type"] in ("umap", "similarity") and analysis.get("codes") in (
            "pred",
            "novel",
        ):
            sae = config["saes"][analysis["sae"]]
            if sae["format"] != "temporal":
                raise ConfigError(
                    f"{key}.codes = {analysis['codes']!r}: needs a temporal SAE, "
                    f"but saes.{analysis['sae']} is {sae['format']}"
                )
    from saeflow.hooks import prepare_hooks

    prepare_hooks(config)


def model_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What a job needs to load a model: its local folder or hub id, and its loading options."""
    spec = dict(config["models"][name])
    if spec.get("source") == "organism":
        path = f"{ORGANISM_MODELS}/{spec['organism']}"
    else:
        path = resolve_path(spec["hf_name"], config)
    return {
        "name": name,
        "path": path,
        "revision": spec.get("revision"),
        "trust_remote_code": bool(spec.get("trust_remote_code", False)),
        "layer": int(spec["layer"]),
        "batch_size": int(spec.get("batch_size", 32)),
        "chat_template": spec.get("chat_template"),
    }


def sae_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What `saeflow.load_sae` needs; an organism SAE resolves to the folder its rule writes."""
    spec = {k: v for k, v in config["saes"][name].items() if k not in ("train", "eval_datasets")}
    spec["name"] = name
    if spec.get("source") == "organism":
        spec["path"] = f"{ORGANISM_SAES}/{name}"
    elif "repo" not in spec:
        spec["path"] = resolve_path(spec["path"], config)
    return spec


def dataset_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    spec = dict(config["datasets"][name])
    if spec["source"] == "file":
        spec["path"] = resolve_path(spec["path"], config)
    return spec


def analyses_of(config: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [a for a in config.get("analyses", []) if a["type"] == kind]


def analysis(config: dict[str, Any], name: str) -> dict[str, Any]:
    for entry in config.get("analyses", []):
        if entry["name"] == name:
            return entry
    raise ConfigError(f"analyses: no analysis named {name!r}")


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the user wrote it plus defaults, without internal keys (for the index page)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
