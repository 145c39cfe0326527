"""Config loading, schema validation, semantic checks and the per-rule config slices.

Every check runs before any job, fails with one line naming the key and the value, and needs no
network: a hub model's `config.json` is consulted only when it is already cached locally (otherwise
the layer is checked again when the job loads the model).
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import os
import re
from collections.abc import Hashable, Iterable, Mapping
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
TRAINED_SAES = f"{RESULTS}/saes"
WHEELS = f"{RESULTS}/wheels"
ORGANISM_CORPUS = f"{RESULTS}/organism/corpus"
CODE_KINDS = ("pred", "novel", "total", "activations")


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice and reads `1e-3` as a number (YAML 1.2)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if isinstance(key, Hashable) and key in seen:
            raise ConfigError(
                f"config file {loader.name}: key {key!r} is given twice "
                f"(line {seen[key]} and line {line}); keep one"
            )
        if isinstance(key, Hashable):
            seen[key] = line
    loader.flatten_mapping(node)
    return dict(loader.construct_pairs(node, deep=deep))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _json_pairs(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"config file {path}: key {key!r} is given twice; keep one")
            out[key] = value
        return out

    return hook


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML or JSON config file as plain data: one line naming the file (and line) for a
    syntax error, an empty file, a key given twice or a YTE template (Snakemake runs those as
    Python; saeflow takes config files as data only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs(path))
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"config file {path}: line {err.lineno} column {err.colno} is not valid JSON: "
                f"{err.msg}"
            ) from None
    else:
        try:
            loader = _Loader(text)
            loader.name = str(path)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {path}:{where} is not valid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty (it needs at least models: and datasets:)")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: top level must be a mapping, got {type(data).__name__}"
        )
    if "__use_yte__" in data:
        raise ConfigError(
            f"config file {path}: __use_yte__ templates are evaluated as Python by Snakemake; "
            "saeflow takes config files as data only: render the template first "
            "(yte < in.yaml > out.yaml) and pass the result"
        )
    return data


read_yaml = read_config_file


def read_config_files(
    paths: Iterable[str | os.PathLike], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The config of several files (later ones update earlier ones, nested keys merged) with
    command-line `--config` values on top, as Snakemake merges them."""
    from snakemake.utils import update_config

    config: dict[str, Any] = {}
    for path in paths:
        update_config(config, read_config_file(path))
    if overrides:
        update_config(config, canonical(dict(overrides)))
    return config


def canonical(value: Any) -> Any:
    """Plain data with one spelling per value: dicts (of any mapping type, e.g. the OrderedDicts
    of a JSON config) with sorted string keys, lists for tuples, builtin scalars for numpy ones.

    Snakemake decides a params change by comparing `repr` of each param, so every rule param
    goes through this: key order and file format then never trigger a rerun.
    """
    if isinstance(value, Mapping):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return canonical(item())
    return value


def _key_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


@functools.lru_cache(maxsize=4)
def load_schema(schema_path: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    """The schema, with each analysis item dispatched on `type` to its `$defs/analysis_<type>`."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    kinds = analysis_types(schema)
    items = schema["properties"]["analyses"]["items"]
    items["properties"]["type"] = {"enum": kinds}
    items["allOf"] = [
        {
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"$ref": f"#/$defs/analysis_{kind}"},
        }
        for kind in kinds
    ]
    return schema


def analysis_types(schema: dict[str, Any] | None = None) -> list[str]:
    defs = (schema or load_schema())["$defs"]
    return [k.removeprefix("analysis_") for k in defs if k.startswith("analysis_")]


def _is_integer(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _number_type(subschema: Any) -> bool:
    return isinstance(subschema, dict) and subschema.get("type") == "number"


@functools.lru_cache(maxsize=1)
def _validator_class():
    """Draft 2020-12 with strict integers (1.0 is not one), schema defaults filled in place and
    whole numbers of `number` keys stored as floats (so `lr: 1` and `lr: 1.0` are one config)."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", _is_integer)
    properties = base.VALIDATORS["properties"]
    items_validator = base.VALIDATORS["items"]

    def fill_properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
                value = instance.get(name)
                if _number_type(sub) and _is_integer(None, value):
                    instance[name] = float(value)
        yield from properties(validator, props, instance, schema)

    def fill_items(validator, items, instance, schema):
        if isinstance(instance, list) and _number_type(items):
            instance[:] = [float(v) if _is_integer(None, v) else v for v in instance]
        yield from items_validator(validator, items, instance, schema)

    return jsonschema.validators.extend(
        base,
        {"properties": fill_properties, "items": fill_items},
        type_checker=checker,
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _suggest(word: str, choices: Iterable[str]) -> str:
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"valid keys here: {shown or 'none'}"


def _unknown_key_message(config: dict[str, Any], error: Any) -> str:
    extra = sorted(k for k in error.instance if k not in error.schema.get("properties", {}))
    key = extra[0]
    path = _key_path([*error.absolute_path, key])
    where = ""
    if (
        len(error.absolute_path) == 2
        and error.absolute_path[0] == "analyses"
        and isinstance(error.instance.get("type"), str)
    ):
        where = f" of a {error.instance['type']} analysis"
    hint = _suggest(str(key), error.schema.get("properties", {}))
    return f"config key {path} = {_short(error.instance[key])}: unknown key{where}; {hint}"


def _error_message(error: Any) -> str:
    key = _key_path(error.absolute_path)
    value = _short(error.instance)
    if error.validator == "type" and isinstance(error.instance, float):
        wanted = error.validator_value
        if "integer" in (wanted if isinstance(wanted, list) else [wanted]):
            fix = int(error.instance) if error.instance.is_integer() else "a whole number"
            return f"config key {key} = {value}: must be an integer (write {fix})"
    if error.validator == "type" and isinstance(error.instance, (int, float)):
        wanted = error.validator_value
        if "string" in (wanted if isinstance(wanted, list) else [wanted]):
            return f"config key {key} = {value}: must be a string; quote it in the file"
    if error.validator == "enum" and isinstance(error.instance, str):
        options = [str(v) for v in error.validator_value if v is not None]
        close = difflib.get_close_matches(error.instance, options, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"one of {', '.join(options)}"
        return f"config key {key} = {value}: not a valid choice; {hint}"
    return f"config key {key} = {value}: {error.message.splitlines()[0][:200]}"


def validate(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Check `config` against the schema and fill its defaults in place.

    Unknown keys are reported first (with the nearest valid name), since a misspelt key would
    otherwise silently fall back to a default; other problems as the most relevant error.
    """
    import jsonschema

    validator = _validator_class()(load_schema(str(schema_path)))
    errors = list(validator.iter_errors(config))
    unknown = [
        e for e in errors if e.validator == "additionalProperties" and e.validator_value is False
    ]
    if unknown:
        first = min(unknown, key=lambda e: [str(p) for p in e.absolute_path])
        raise ConfigError(_unknown_key_message(config, first))
    error = jsonschema.exceptions.best_match(errors)
    if error is not None:
        raise ConfigError(_error_message(error))


def schema_check(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Validate a copy of `config` (defaults are not written back)."""
    validate(copy.deepcopy(config), schema_path)


def apply_defaults(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Fill schema defaults in place (raises ConfigError like `validate`)."""
    validate(config, schema_path)


def load_config(path: str | os.PathLike, *, check_files: bool = True) -> dict[str, Any]:
    """Read, validate and semantically check a config file (for notebooks and tests)."""
    config = read_config_file(path)
    prepare(config, Path(path).resolve().parent, check_files=check_files)
    return config


def prepare(config: dict[str, Any], config_dir: Path, *, check_files: bool = True) -> None:
    """Schema check with defaults, then the semantic checks; ConfigError on the first problem."""
    validate(config)
    config["_config_dir"] = str(config_dir)
    from saeflow.sae.registry import apply_registry

    for name, spec in config.get("saes", {}).items():
        apply_registry(name, spec)
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
    if spec.get("gguf_file"):
        return _gguf_n_layers(model_spec(config, name)["path"])
    cfg_path = _local_hf_config(spec["hf_name"], spec.get("revision"), config)
    if cfg_path is None:
        return None
    hf_cfg = json.loads(Path(cfg_path).read_text())
    hf_cfg = hf_cfg.get("text_config", hf_cfg)
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if key in hf_cfg:
            return int(hf_cfg[key])
    return None


def _gguf_n_layers(path: str) -> int | None:
    """`{arch}.block_count` from a local GGUF file's header (None until it exists)."""
    if not Path(path).is_file():
        return None
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        return int(reader.fields[f"{arch}.block_count"].contents())
    except (KeyError, ValueError, OSError) as err:
        raise ConfigError(f"{path}: not a readable GGUF model file ({err})") from None


def wheel_dir(requirement: str) -> str:
    """results/wheels/NAME-VERSION for a `name==version` requirement."""
    name, version = requirement.split("==")
    return f"{WHEELS}/{name}-{version}"


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


def _check_model_folder(key: str, folder: str, spec: dict[str, Any]) -> None:
    """A local model folder loads safely: config, complete safetensors, custom code only when
    opted in, tokenizer files (header reads only)."""
    from saeflow import verify
    from saeflow.errors import DataError

    try:
        verify.model_folder(folder, bool(spec.get("trust_remote_code")))
        verify.tokenizer_folder(folder)
    except DataError as err:
        raise ConfigError(f"{key}.hf_name = {spec['hf_name']!r}: {err}") from None


def corpus_sizes(corpus: dict[str, Any]) -> dict[str, int]:
    """Rows of each organism corpus, from its config (as saeflow.organism.corpus makes them)."""
    n_test = {
        k: max(1, round(corpus[k] * corpus["test_fraction"])) for k in ("n_stories", "n_dialogues")
    }
    return {
        "stories_train": corpus["n_stories"],
        "stories_test": n_test["n_stories"],
        "dialogues_train": corpus["n_dialogues"],
        "dialogues_test": n_test["n_dialogues"],
        "target": corpus["n_target"],
        "control": corpus["n_control"],
    }


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
        elif spec.get("source") == "wheel":
            if not spec.get("wheel") or not spec.get("gguf_file"):
                raise ConfigError(
                    f"{key}.source = 'wheel': needs wheel (name==version) and gguf_file (its path "
                    "inside the unpacked wheel)"
                )
        elif "hf_name" not in spec:
            raise ConfigError(
                f"{key}: needs hf_name (a hub id or local folder) or source: organism"
            )
        elif check_files and Path(resolve_path(spec["hf_name"], config)).is_dir():
            _check_model_folder(key, resolve_path(spec["hf_name"], config), spec)
        n_layers = model_n_layers(config, name)
        if n_layers is not None and not 0 <= spec["layer"] < n_layers:
            raise ConfigError(
                f"{key}.layer = {spec['layer']}: "
                f"the model has {n_layers} layers (0..{n_layers - 1})"
            )
    sizes: dict[str, int | None] = {}
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
            sizes[name] = corpus_sizes(config["organism"]["corpus"])[spec["corpus"]]
        elif spec["source"] == "file" and check_files:
            from saeflow.data import check_file_source

            sizes[name] = check_file_source(name, spec, config_dir)
        if spec.get("num_sequences") is not None:
            n_max = int(spec["num_sequences"])
            sizes[name] = n_max if sizes.get(name) is None else min(n_max, sizes[name])
    for name, spec in config.get("saes", {}).items():
        key = f"saes.{name}"
        _need(config, "models", spec["model"], f"{key}.model")
        if spec.get("source") == "organism" and "train" not in spec:
            raise ConfigError(f"{key}: an organism SAE needs a train section")
        if spec.get("source") == "organism" and models[spec["model"]].get("source") != "organism":
            raise ConfigError(
                f"{key}.source = 'organism': models.{spec['model']} is not an organism model; "
                "drop source (a train section trains an SAE for any model)"
            )
        if "train" in spec:
            if spec["format"] not in ("saelens", "temporal"):
                raise ConfigError(
                    f"{key}.format = {spec['format']!r}: only saelens (topk) and temporal SAEs "
                    "are trained in the graph"
                )
            for field in ("path", "repo"):
                if field in spec:
                    raise ConfigError(
                        f"{key}.{field}: a trained SAE (train section) is written by the graph to "
                        f"{sae_spec(config, name)['path']}; drop {field} or the train section"
                    )
            for ds in spec["train"]["datasets"]:
                _need(config, "datasets", ds, f"{key}.train.datasets")
        elif "path" not in spec and "repo" not in spec:
            raise ConfigError(f"{key}: needs path (local folder/file) or repo + path (hub)")
        elif "repo" not in spec and check_files:
            local = resolve_path(spec["path"], config)
            if not Path(local).exists():
                raise ConfigError(
                    f"{key}.path = {spec['path']!r}: no such file or folder ({local}); "
                    "for a hub SAE also set repo:"
                )
        for ds in spec.get("eval_datasets", []):
            _need(config, "datasets", ds, f"{key}.eval_datasets")
        if spec.get("inf_k") is not None and spec["format"] != "temporal":
            raise ConfigError(f"{key}.inf_k = {spec['inf_k']}: only temporal SAEs have inf_k")
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
        n_seq = sizes.get(analysis.get("dataset"))
        if analysis["type"] == "similarity" and n_seq is not None:
            bad = [i for i in analysis["sequences"] if i >= n_seq]
            if bad:
                raise ConfigError(
                    f"{key}.sequences = {analysis['sequences']}: sequence {bad[0]} does not exist; "
                    f"datasets.{analysis['dataset']} has {n_seq} sequences (ids 0..{n_seq - 1})"
                )
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
        if analysis["type"] in ("rep_similarity", "feature_families", "sae_steer"):
            from saeflow.compare.checks import check_compare_analysis

            check_compare_analysis(config, analysis, key)
    from saeflow.hooks import prepare_hooks

    prepare_hooks(config)


def model_spec(config: dict[str, Any], name: str) -> dict[str, Any]:
    """What a job needs to load a model: its local folder or hub id, and its loading options."""
    spec = dict(config["models"][name])
    if spec.get("source") == "organism":
        path = f"{ORGANISM_MODELS}/{spec['organism']}"
    elif spec.get("source") == "wheel":
        path = wheel_dir(spec["wheel"])
    else:
        path = resolve_path(spec["hf_name"], config)
    extra = {}
    if spec.get("gguf_file"):
        path = f"{path.rstrip('/')}/{spec['gguf_file']}"
        extra["gguf_file"] = spec["gguf_file"]
    return {
        **extra,
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
    elif "train" in config["saes"][name]:
        spec["path"] = f"{TRAINED_SAES}/{name}"
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
    return canonical({k: v for k, v in config.items() if not k.startswith("_")})


def main(argv: list[str] | None = None) -> int:
    """`python -m saeflow.config FILE [FILE...]`: check config files as `snakemake -n` does.

    Snakemake parses a `--configfile` itself before the Snakefile runs, and its message for a
    YAML syntax error or an empty file names neither file nor line; this names both.
    """
    import sys

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m saeflow.config CONFIG.yaml [MORE.yaml ...]", file=sys.stderr)
        return 2
    try:
        config = read_config_files(paths)
        prepare(config, Path(paths[-1]).resolve().parent)
    except ConfigError as err:
        print(f"saeflow: config error: {err}", file=sys.stderr)
        return 1
    print(f"saeflow: {', '.join(paths)}: ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
